"""Analytic state layouts of optimizers that run only in a CUDA library's kernels, for estimates.

bitsandbytes' and torchao's low-bit optimizers have no fake-tensor implementation. An estimate
runs the model's steps with ``AnalyticLayout`` instead: it allocates, per parameter, the state
tensors the library documents (docs/baselines.md, checked byte for byte on a GPU by
tests/test_baselines.py) under the library's own state keys, so the declared roles apply, and
updates the weights with plain SGD. The record says so: state bytes follow the documented layout;
the step transient is not the library's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

MIN_QUANTIZED = 4096  # both libraries keep smaller tensors' moments unquantized


@dataclass(frozen=True)
class Slot:
    """One state tensor: its key (``a.b`` nests), element count and dtype; ``shared`` ones exist once."""

    path: str
    numel: int
    dtype: torch.dtype
    shared: bool = False


Layout = Callable[[torch.Tensor], list[Slot]]


class AnalyticLayout(torch.optim.Optimizer):
    """Allocates a library's documented state at the first step; the update itself is SGD."""

    def __init__(self, params: Iterable[torch.Tensor], layout: Layout, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})
        self.layout = layout
        self.shared: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    for slot in self.layout(p):
                        self._put(self.state[p], slot, p.device)
                p.add_(p.grad, alpha=-group["lr"])

    def _put(self, state: dict, slot: Slot, device: torch.device) -> None:
        *parents, leaf = slot.path.split(".")
        for key in parents:
            state = state.setdefault(key, {})
        if slot.shared:
            if slot.path not in self.shared:
                self.shared[slot.path] = torch.zeros(slot.numel, dtype=slot.dtype, device=device)
            state[leaf] = self.shared[slot.path]
        else:
            state[leaf] = torch.zeros(slot.numel, dtype=slot.dtype, device=device)


def _blocks(n: int, size: int) -> int:
    return -(-n // size)


def bnb_adam8bit(params: Iterable[torch.Tensor], lr: float = 1e-3, **_: Any) -> AnalyticLayout:
    """bitsandbytes Adam8bit: N >= 4096 keeps two uint8 code tensors and fp32 block maxima per 256
    elements, with two 256-entry fp32 code books shared by every parameter; smaller tensors keep
    fp32 moments (still under state1/state2)."""

    def layout(p: torch.Tensor) -> list[Slot]:
        n = p.numel()
        if n < MIN_QUANTIZED:
            return [Slot("state1", n, torch.float32), Slot("state2", n, torch.float32)]
        return [Slot("state1", n, torch.uint8), Slot("state2", n, torch.uint8),
                Slot("absmax1", _blocks(n, 256), torch.float32), Slot("absmax2", _blocks(n, 256), torch.float32),
                Slot("qmap1", 256, torch.float32, shared=True), Slot("qmap2", 256, torch.float32, shared=True)]

    return AnalyticLayout(params, layout, lr)


def _torchao(block: int, codes_per_byte: int, qmap: int, codes_dtype: torch.dtype) -> Layout:
    def layout(p: torch.Tensor) -> list[Slot]:
        n = p.numel()
        slots = [Slot("step", 1, torch.float32)]
        for moment in ("exp_avg", "exp_avg_sq"):
            if n < MIN_QUANTIZED or n % block:
                slots.append(Slot(moment, n, p.dtype))  # torchao keeps these as zeros_like(p)
                continue
            slots += [Slot(f"{moment}.codes", n // codes_per_byte, codes_dtype),
                      Slot(f"{moment}.scale", n // block, torch.float32)]
            if qmap:
                slots.append(Slot(f"{moment}.qmap", qmap, torch.float32))
        return slots

    return layout


def ao_adamw8bit(params: Iterable[torch.Tensor], lr: float = 1e-3, **_: Any) -> AnalyticLayout:
    """torchao AdamW8bit: uint8 codes, an fp32 scale per 256 elements and a 256-entry qmap per moment."""
    return AnalyticLayout(params, _torchao(256, 1, 256, torch.uint8), lr)


def ao_adamw4bit(params: Iterable[torch.Tensor], lr: float = 1e-3, **_: Any) -> AnalyticLayout:
    """torchao AdamW4bit: two 4-bit codes per byte, an fp32 scale per 128 elements, a 16-entry qmap."""
    return AnalyticLayout(params, _torchao(128, 2, 16, torch.uint8), lr)


def ao_adamw_fp8(params: Iterable[torch.Tensor], lr: float = 1e-3, **_: Any) -> AnalyticLayout:
    """torchao AdamWFp8: one float8_e4m3fn code per element and an fp32 scale per 256, no qmap."""
    return AnalyticLayout(params, _torchao(256, 1, 0, torch.float8_e4m3fn), lr)
