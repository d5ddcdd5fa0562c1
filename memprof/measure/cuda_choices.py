"""A CUDA run's kernel choices, for an estimate made on fake CPU tensors (no GPU here).

Three choices change what a training step allocates, and all are made from the tensors' device:

* ``F.scaled_dot_product_attention``: on CUDA it runs flash attention (fp16/bf16, no mask) or the
  memory-efficient kernel (fp32 or a mask), which save the output and a log-sum-exp for backward;
  on CPU with dropout it falls back to the math path, which saves the attention matrix and its
  dropout mask (GPT-2 batch 4 × 512: 1.8 GiB more). ``like_cuda`` routes the call to
  the CUDA kernels' own ops, whose meta implementations give their shapes on fake CPU tensors; under
  ``--amp`` it first casts the call's tensors as CUDA autocast does (``memprof.measure.cuda_autocast``).
* ``F.dropout`` in training: CUDA runs the fused ``native_dropout``, which saves a 1-byte mask;
  CPU multiplies by a noise tensor of the input's dtype and saves it (4 bytes per element in fp32;
  GPT-2 batch 4 × 512: 118 MiB more). ``like_cuda`` routes it to ``native_dropout``.
* torch.optim's foreach default (``memprof.optim.adapters.pin_implementation``): foreach on CUDA,
  single-tensor on CPU; ``memprof.optim.adapters.resolving_for`` makes it resolve for CUDA.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from memprof.measure.cuda_autocast import in_lower_precision
from memprof.measure.trackers import replaced

FLASH_DTYPES = (torch.float16, torch.bfloat16)


_CPU_DROPOUT = F.dropout


@contextlib.contextmanager
def like_cuda() -> Iterator[None]:
    """Run attention and dropout through the kernels a CUDA device would pick.

    ``torch.nn.functional``'s two functions are replaced for the duration, where transformers and
    ``nn.Dropout`` look them up at each call (a mode that intercepts every torch function instead costs
    a fifth of an estimate's time); code that bound them by name before keeps the CPU choice."""
    with replaced(F, "scaled_dot_product_attention", _cuda_attention), replaced(F, "dropout", _cuda_dropout):
        yield


def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    if not training or p == 0.0 or inplace:
        return _CPU_DROPOUT(input, p, training, inplace)
    return torch.ops.aten.native_dropout(input, p, True)[0]


def _cuda_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    if torch.is_autocast_enabled(query.device.type):  # under --amp: CUDA autocast's cast of the call's tensors
        query, key, value, attn_mask = in_lower_precision(query, key, value, attn_mask)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    if attn_mask is None and query.dtype in FLASH_DTYPES and query.shape[-1] <= 256:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, return_debug_mask=False, scale=scale)
        return out[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            attn_mask.logical_not(), -math.inf)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, torch.is_grad_enabled(), dropout_p, is_causal, scale=scale)
    return out[0]


@contextlib.contextmanager
def masks_read_as_on_real_data() -> Iterator[None]:
    """Let transformers read an attention mask's values on fake tensors as it does on real ones.

    On a real run transformers drops an all-ones padding mask (memprof's batches have no padding)
    and calls SDPA with ``is_causal``; on a fake tensor it cannot read the values, so it builds a
    4-D mask that the attention kernel then saves for backward (GPT-2 batch 4 × 512: 4 MiB per
    layer). Treating fake tensors as readable makes its ``.all()`` a host read, which the estimate
    answers with its placeholder (true): the decision a real run takes on memprof's batches.
    """
    try:
        masking = importlib.import_module("transformers.masking_utils")
    except ImportError:  # an older transformers: nothing to let through
        masking = None
    original = getattr(masking, "is_tracing", None)
    if original is None:
        yield
        return
    from torch._subclasses.fake_tensor import is_fake

    def is_tracing(tensor=None) -> bool:
        return original(tensor) and not (tensor is not None and is_fake(tensor))

    with replaced(masking, "is_tracing", is_tracing):
        yield
