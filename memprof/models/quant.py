"""QLoRA's quantized frozen base (``--lora …,quant=nf4|int8``), in the layout bitsandbytes documents.

Analytic: neither library that runs these layouts is used. bitsandbytes needs CUDA and torchao is not
installed here, so memprof quantizes and dequantizes in torch, with the storage bitsandbytes keeps and the
temporaries its matmul makes:

* ``nf4`` (QLoRA, Dettmers et al. 2023; bitsandbytes' ``quantize_4bit`` with ``blocksize=64`` and
  ``compress_statistics=True``, as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True)`` asks): each weight a 4-bit index into the 16 NormalFloat values,
  packed two per byte (``quant_codes``, uint8); one absmax per block of 64 weights, itself quantized to 8
  bits (``quant_absmax``, uint8) with one fp32 scale per 256 of them (``quant_absmax_scale``) and one fp32
  offset, their mean (``quant_absmax_offset``): double quantization; the 16 code values (``quant_table``,
  fp32, one per layer as ``quantize_4bit`` makes it). Not counted: bitsandbytes' 256-value dynamic map for
  the absmax codes, one shared table of 1 KiB (memprof's absmax codes are linear).
* ``int8`` (LLM.int8, bitsandbytes' ``Int8Params``): an int8 code per weight (``quant_codes``) and an fp32
  absmax per output row (``quant_row_scale``); outlier columns (``llm_int8_threshold``) are chosen per batch
  at matmul time and stored nowhere, so they are not modelled.

Every linear layer is quantized (transformers' ``Conv1D`` too) except the output head (transformers'
integration keeps it, and a tied head is the embedding); LoRA's adapters stay in fp32 beside them. As
bitsandbytes' ``MatMul4Bit`` does, a quantized layer dequantizes its whole weight into the compute dtype for
the matmul, frees it, saves nothing for backward but the codes, and dequantizes again for the input's
gradient. The dequantization is one custom op (``memprof::dequantize``): a tracker sees its output alone,
as it would see the CUDA kernel's; on CUDA its torch implementation works in chunks of ``CHUNK`` weights,
whose scratch the allocator shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from memprof.errors import UsageError
from memprof.lora import FLAG
from memprof.taxonomy import ADAPTER_PREFIX, QUANT_PREFIX

if TYPE_CHECKING:
    from memprof.models.base import BuiltModel

NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
"""The 16 NormalFloat values (QLoRA, appendix E; bitsandbytes' ``get_4bit_type("nf4")``)."""
BLOCK = 64
"""Weights per absmax block (bitsandbytes' 4-bit default)."""
NESTED_BLOCK = 256
"""Absmax values per fp32 scale in the double quantization (bitsandbytes' ``quantize_blockwise`` of the absmax)."""
CHUNK = 1 << 20
"""Weights the torch implementation (de)quantizes at a time: it bounds the scratch a CUDA run shows."""
INIT_STD = 0.02
"""Standard deviation of the normal weights each layer is quantized from (GPT-2's and LLaMA's init)."""


def storage_bytes(kind: str, rows: int, columns: int) -> dict[str, int]:
    """Bytes of each storage tensor one quantized ``rows`` × ``columns`` weight keeps (the documented layout)."""
    n = rows * columns
    if kind == "int8":
        return {"codes": n, "row_scale": 4 * rows}
    blocks = -(-n // BLOCK)
    return {"codes": (n + 1) // 2, "absmax": blocks, "absmax_scale": 4 * -(-blocks // NESTED_BLOCK),
            "absmax_offset": 4, "table": 4 * len(NF4_TABLE)}


# -- the two layouts as custom ops: a tracker sees their outputs, not the torch implementation's scratch ---------
@torch.library.custom_op("memprof::quantize", mutates_args=())
def quantize(weight: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The storage tensors of ``weight`` (rows × columns) quantized as ``kind`` (``storage_bytes``' order)."""
    if kind == "int8":
        scale = weight.detach().abs().amax(dim=1).float().clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round(weight.detach().float() / scale[:, None] * 127).to(torch.int8)
        return [codes, scale]
    flat = weight.detach().reshape(-1)
    n, blocks = flat.numel(), -(-flat.numel() // BLOCK)
    table = torch.tensor(NF4_TABLE, device=weight.device)
    middles = (table[1:] + table[:-1]) / 2
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=weight.device)
    for first in range(0, n, CHUNK):
        part = flat[first:first + CHUNK].float()
        part = torch.cat([part, part.new_zeros(-part.numel() % BLOCK)]).view(-1, BLOCK)
        peak = part.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        absmax[first // BLOCK:first // BLOCK + peak.numel()] = peak
        index = torch.bucketize(part / peak[:, None], middles).view(-1)
        packed = (index[0::2] << 4 | index[1::2]).to(torch.uint8)
        codes[first // 2:first // 2 + packed.numel()] = packed[:codes.numel() - first // 2]
    offset = absmax.mean().reshape(1)
    centred = torch.cat([absmax - offset, absmax.new_zeros(-blocks % NESTED_BLOCK)]).view(-1, NESTED_BLOCK)
    scale = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    absmax_codes = (torch.round(centred / scale[:, None] * 127) + 128).to(torch.uint8).view(-1)[:blocks].clone()
    return [codes, absmax_codes, scale, offset, table]


@quantize.register_fake
def _(weight: torch.Tensor, kind: str) -> list[torch.Tensor]:
    rows, columns = weight.shape
    sizes = storage_bytes(kind, rows, columns)
    if kind == "int8":
        return [weight.new_empty((rows, columns), dtype=torch.int8), weight.new_empty(rows, dtype=torch.float32)]
    return [weight.new_empty(sizes["codes"], dtype=torch.uint8), weight.new_empty(sizes["absmax"], dtype=torch.uint8),
            *(weight.new_empty(sizes[key] // 4, dtype=torch.float32) for key in ("absmax_scale", "absmax_offset", "table"))]


@torch.library.custom_op("memprof::dequantize", mutates_args=())
def dequantize(storage: list[torch.Tensor], rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """The rows × columns weight in ``dtype`` from its quantized storage (either layout)."""
    if len(storage) == 2:  # int8: codes, row scale
        codes, scale = storage
        return (codes.float() * (scale / 127)[:, None]).to(dtype)
    codes, absmax_codes, scale, offset, table = storage
    n = rows * columns
    absmax = ((absmax_codes.float() - 128) / 127 * scale.repeat_interleave(NESTED_BLOCK)[:absmax_codes.numel()]
              + offset)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    for first in range(0, n, CHUNK):
        part = codes[first // 2:(min(n, first + CHUNK) + 1) // 2]
        index = torch.stack([part >> 4, part & 15], dim=1).view(-1)[:min(CHUNK, n - first)]
        peak = absmax[first // BLOCK:first // BLOCK + -(-index.numel() // BLOCK)].repeat_interleave(BLOCK)
        out[first:first + index.numel()] = table[index.long()] * peak[:index.numel()]
    return out.view(rows, columns)


@dequantize.register_fake
def _(storage: list[torch.Tensor], rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    return storage[0].new_empty((rows, columns), dtype=dtype)


class _QuantizedMatmul(torch.autograd.Function):
    """``x @ W.T + b`` with W dequantized for the product and again for the input's gradient (``MatMul4Bit``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer  # the codes, as bitsandbytes keeps them (ctx.tensors): weights, not saved activations
        return nn.functional.linear(x, layer.dequantized(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized(grad.dtype) if ctx.needs_input_grad[0] else None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer kept quantized: its storage tensors are parameters ``quant_*`` without gradients
    (``memprof.taxonomy.weight_component`` reads them as ``quant codes`` and ``quant scales``)."""

    def __init__(self, kind: str, storage: list[torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        self.quantized_numel = in_features * out_features  # the weights it stands for (a parameter count)
        for key, tensor in zip(storage_bytes(kind, 1, 1), storage):
            self.register_parameter(f"{QUANT_PREFIX}{key}", nn.Parameter(tensor, requires_grad=False))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def storage(self) -> list[torch.Tensor]:
        return [getattr(self, f"{QUANT_PREFIX}{key}") for key in storage_bytes(self.kind, 1, 1)]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.memprof.dequantize(self.storage(), self.out_features, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


def apply(built: "BuiltModel", kind: str, device: torch.device) -> None:
    """Quantize every linear layer of ``built.model`` (built on the meta device, adapters injected) but its
    output head, one layer at a time from fresh weights on ``device``, then materialise the rest there."""
    from memprof.models import lora

    model = built.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [(name, m) for name, m in model.named_modules()
              if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m is not head
              and not any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))]
    if not layers:
        raise UsageError(f"{FLAG} quant={kind}: {built.name} has no linear layer to quantize besides its output head; "
                         "QLoRA's layouts are those of linear layers (drop quant=)")
    quantized = 0
    for name, layer in layers:
        conv1d = type(layer).__name__ == "Conv1D"  # transformers' Conv1D keeps its weight transposed
        columns, rows = layer.weight.shape if conv1d else layer.weight.shape[::-1]
        with torch.no_grad():
            weight = torch.empty(rows, columns, device=device).normal_(0.0, INIT_STD)
            storage = torch.ops.memprof.quantize(weight, kind)
        del weight
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, QuantizedLinear(kind, storage, columns, rows, layer.bias))
        quantized += rows * columns
    _materialise_rest(model, device)
    lora.materialise_adapters(model)
    stored = sum(sum(storage_bytes(kind, m.out_features, m.in_features).values())
                 for m in model.modules() if isinstance(m, QuantizedLinear))
    built.config["lora"]["quant"] = {"kind": kind, "layers": len(layers), "quantized_parameters": quantized,
                                     "storage_bytes": stored}
    built.notes.append(_note(kind, len(layers), quantized, stored))


def _note(kind: str, layers: int, quantized: int, stored: int) -> str:
    layout = ("4-bit NF4 codes two per byte, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmax and an "
              "fp32 offset (double quantization), the 16-value table" if kind == "nf4"
              else "int8 codes and an fp32 absmax per row (outlier columns, chosen per batch, not modelled)")
    return (f"analytic: QLoRA base quantized to {kind} in the layout bitsandbytes documents ({layout}); bitsandbytes "
            "needs CUDA and torchao is not installed, so memprof's torch implementation quantizes and dequantizes "
            f"(each layer's weight dequantized into the compute dtype for its matmul, forward and again in backward, "
            f"as bitsandbytes' MatMul4Bit does): {layers} layers, {quantized:,} weights in {stored:,} B; "
            "the output head is not quantized")


def _materialise_rest(model: nn.Module, device: torch.device) -> None:
    """Give every parameter and buffer still on the meta device storage on ``device``: matrices N(0, 0.02),
    biases 0, other vectors 1 (as ``memprof.strategies.fsdp2.initialise_materialised``); buffers re-created by
    the model's own initialisers (``reset_running_stats``, a Hugging Face model's ``_init_weights``)."""
    init_weights = getattr(model, "_init_weights", None)
    made: dict[int, nn.Parameter] = {}  # a tied parameter (GPT-2's head and embedding) stays one
    with torch.no_grad():
        for module in model.modules():
            for key, param in list(module._parameters.items()):
                if param is None or param.device.type != "meta":
                    continue
                if id(param) not in made:
                    fresh = torch.empty_like(param, device=device)
                    if fresh.ndim >= 2:
                        fresh.normal_(0.0, INIT_STD)
                    else:
                        fresh.fill_(0.0 if key == "bias" else 1.0)
                    made[id(param)] = nn.Parameter(fresh, requires_grad=param.requires_grad)
                module._parameters[key] = made[id(param)]
            meta = [key for key, b in module._buffers.items() if b is not None and b.device.type == "meta"]
            for key in meta:
                module._buffers[key] = torch.zeros_like(module._buffers[key], device=device)
            if meta and hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
            elif meta and init_weights is not None:
                init_weights(module)
