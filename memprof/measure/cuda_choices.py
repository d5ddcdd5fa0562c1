"""A CUDA run's kernel choices, for an estimate made on fake CPU tensors (no GPU here).

Two choices change what a training step allocates, and both are made from the tensors' device:

* ``F.scaled_dot_product_attention``: on CUDA it runs flash attention (fp16/bf16, no mask) or the
  memory-efficient kernel (fp32 or a mask), which save the output and a log-sum-exp for backward;
  on CPU with dropout it falls back to the math path, which saves the attention matrix and its
  dropout mask (GPT-2 batch 4 × 512: 1.8 GiB more). ``attention_like_cuda`` routes the call to
  the CUDA kernels' own ops, whose meta implementations give their shapes on fake CPU tensors.
* torch.optim's foreach default (``memprof.optim.adapters.pin_implementation``): foreach on CUDA,
  single-tensor on CPU; ``memprof.optim.adapters.resolving_for`` makes it resolve for CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FLASH_DTYPES = (torch.float16, torch.bfloat16)


class attention_like_cuda(TorchFunctionMode):
    """Run ``scaled_dot_product_attention`` through the kernel a CUDA device would pick."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _cuda_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _cuda_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
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
