"""SMMF: Square-Matricized Momentum Factorization (Park & Lee, AAAI 2025, arXiv 2412.08894).

Each parameter is viewed as its most nearly square n̂×m̂ matrix (Algorithm 2). The first moment
M is kept as a rank-1 factorization of |M| (a row and a column vector) plus the sign of each
element; the second moment V as a rank-1 factorization of V. A step decompresses both, folds in
the gradient, compresses them again and updates the weight with the *uncompressed*
M_t / (sqrt(V_t) + eps) ("decompression → compression", Algorithm 1).

State per parameter of N elements: four fp32 vectors (2·(n̂ + m̂) floats) and the sign, one bit
per element (``sign_bits=1``, what the paper's memory tables count) or one byte
(``sign_bits=8``, the official code's ``torch.bool``).

Two implementations give the same updates: a pure-torch one (CPU, meta and fallback) that walks
each parameter in row blocks so its temporaries stay bounded, and fused Triton kernels
(``memprof.optim._smmf_triton``), used on CUDA when Triton imports.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.optim.optimizer import Optimizer, ParamsT

__all__ = ["SMMF", "square_matricize"]

# The torch path updates a parameter in blocks of whole rows of about this many elements, so its
# full-size temporaries are bounded (4 fp32 blocks of 4 MiB) whatever the parameter's size.
_CHUNK_ELEMENTS = 1 << 20


def square_matricize(numel: int) -> tuple[int, int]:
    """Algorithm 2: the (n̂, m̂) with n̂·m̂ = numel, n̂ ≥ m̂ and n̂ − m̂ smallest.

    A prime numel gives (numel, 1): nothing is saved, and the rank-1 factorization is exact.
    """
    for cols in range(math.isqrt(numel), 0, -1):
        if numel % cols == 0:
            return numel // cols, cols
    return 0, 1  # numel == 0


@functools.cache
def _triton_kernels() -> ModuleType | None:
    try:
        from memprof.optim import _smmf_triton
    except ImportError:
        return None
    return _smmf_triton


class SMMF(Optimizer):
    """SMMF: square-matricized rank-1 factored moments with a sign bitmap.

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate η (default: 1e-3).
        beta: first-moment coefficient β₁, or ``None`` for no first moment (default: 0.9).
        eps: added to sqrt(V) in the denominator (default: 1e-8).
        weight_decay: weight-decay coefficient c (default: 0).
        decay_rate: γ in β₂,t = 1 − t^γ, in [-1, 0] (default: -0.5; the paper recommends -0.8
            for Transformers).
        growth_rate: λ in β₁,t = β₁·λ^(t−1), in [0, 1] (default: 0.999).
        vector_reshape: square-matricize and factorize tensors with one non-singleton axis
            too; ``False`` keeps full moments for them (default: True).
        weight_decay_mode: ``"adamw"`` multiplies W by 1 − η·c (Algorithm 7), ``"adam"`` adds
            c·W to the gradient (Algorithm 6) (default: "adamw").
        sign_bits: 1 packs the signs 8 per byte; 8 stores one ``torch.bool`` per element
            (default: 1). Both give identical updates.
        implementation: ``"auto"`` (Triton on CUDA when it imports, else torch), ``"torch"``
            or ``"triton"`` (default: "auto").

    State dtype: the factor vectors are fp32 whatever the parameter dtype (fp64 for fp64
    parameters): a row sum over thousands of elements needs more precision than bf16 has, and
    the vectors are tiny.
    """

    state_roles: dict[str, str] = {
        "row_m": "factor",
        "col_m": "factor",
        "row_v": "factor",
        "col_v": "factor",
        "sign": "sign",
        "exp_avg": "moment",
        "exp_avg_sq": "moment",
        "step": "other",
        "shape": "other",
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta: float | None = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        # Paper ambiguity (digest §1.9): the code's signature says -0.5, its docstring -0.8. We
        # choose -0.5: the signature's value, and the one most of the paper's configs use.
        decay_rate: float = -0.5,
        growth_rate: float = 0.999,
        vector_reshape: bool = True,
        # Paper ambiguity (digest §1.7): the code defaults to 'adamw', Appendix L says the experiments
        # use Adam's decay (Algorithm 6). Paper error: in the appendix M listing (and the official
        # repository) 'adam' mode binds `grad = grad.add(params, ...)` to a local, and the update
        # reads `params.grad` again, so the decay is discarded: Algorithm 6 runs had no decay. We
        # choose 'adamw': the code's default, the only mode in which the released code decays, and
        # the decoupled decay memprof's other optimizers use. 'adam' implements Algorithm 6 as written.
        weight_decay_mode: Literal["adam", "adamw"] = "adamw",
        *,
        sign_bits: Literal[1, 8] = 1,
        implementation: Literal["auto", "torch", "triton"] = "auto",
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr}")
        if beta is not None and not 0.0 <= beta <= 1.0:
            raise ValueError(f"Invalid beta: {beta}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if not -1.0 <= decay_rate <= 0.0:
            raise ValueError(f"Invalid decay_rate: {decay_rate}")
        if not 0.0 <= growth_rate <= 1.0:
            raise ValueError(f"Invalid growth_rate: {growth_rate}")
        if not isinstance(vector_reshape, bool):
            raise ValueError(f"Invalid vector_reshape: {vector_reshape!r}")
        if weight_decay_mode not in ("adam", "adamw"):
            raise ValueError(f"Invalid weight_decay_mode: {weight_decay_mode!r}")
        if sign_bits not in (1, 8):
            raise ValueError(f"Invalid sign_bits: {sign_bits!r}")
        if implementation not in ("auto", "torch", "triton"):
            raise ValueError(f"Invalid implementation: {implementation!r}")
        if implementation == "triton" and importlib.util.find_spec("triton") is None:
            raise ValueError("Invalid implementation: 'triton' (triton is not installed)")
        defaults = dict(
            lr=lr,
            beta=beta,
            eps=eps,
            weight_decay=weight_decay,
            decay_rate=decay_rate,
            growth_rate=growth_rate,
            vector_reshape=vector_reshape,
            weight_decay_mode=weight_decay_mode,
            sign_bits=sign_bits,
            implementation=implementation,
        )
        super().__init__(params, defaults)
        # Launch tables of the Triton path, reused between steps (not optimizer state)
        self._triton_plans: dict[tuple, Any] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._triton_plans = {}

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        dtype = torch.promote_types(p.dtype, torch.float32)
        # Steps taken so far (t − 1 before this step); a Python int, so it adds no tensor bytes
        state["step"] = 0
        if not group["vector_reshape"] and sum(d > 1 for d in p.shape) == 1:
            # vector_reshape=False: a vector (exactly one axis longer than 1, the code's
            # `len(grad.squeeze().shape) == 1`) keeps full moments, as the official `_adam` path.
            # Paper ambiguity (digest §1.8): the code keeps them in the parameter dtype. We choose
            # fp32 so that bf16 vectors get the same arithmetic as the factorized path.
            if group["beta"] is not None:
                # First moment M_t, full size
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            # Second moment V_t, full size
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            return
        rows, cols = square_matricize(p.numel())
        # (n̂, m̂) of Algorithm 2, the view of the flattened parameter, computed once
        state["shape"] = (rows, cols)
        if group["beta"] is not None:
            # r_M: row sums of |M_t| (n̂,)
            state["row_m"] = torch.zeros(rows, dtype=dtype, device=p.device)
            # c_M: column sums of |M_t| (m̂,)
            state["col_m"] = torch.zeros(cols, dtype=dtype, device=p.device)
            # S_M: 1 where M_t ≥ 0, flat in row-major order; 8 per uint8 (bit k of byte j is
            # element 8j + k) or one bool per element.
            # Paper ambiguity (digest §2.1, §6.1): the memory tables count 1 bit per sign, the
            # released code stores a bool. sign_bits chooses; 1 (the paper's count) by default.
            if group["sign_bits"] == 1:
                state["sign"] = torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8, device=p.device)
            else:
                state["sign"] = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        # r_V: row sums of V_t (n̂,)
        state["row_v"] = torch.zeros(rows, dtype=dtype, device=p.device)
        # c_V: column sums of V_t (m̂,)
        state["col_v"] = torch.zeros(cols, dtype=dtype, device=p.device)

    def _use_triton(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        choice = group["implementation"]
        # Fake tensors (memprof estimate) take the torch path: a Triton kernel has no fake implementation.
        if choice == "torch" or (choice == "auto" and (not p.is_cuda or is_fake(p))):
            return False
        kernels = _triton_kernels()
        if kernels is None:
            if choice == "triton":
                raise RuntimeError("SMMF implementation='triton' needs triton, which does not import")
            return False
        reason = kernels.unsupported(p)
        if reason is not None and choice == "triton":
            raise RuntimeError(f"SMMF implementation='triton' cannot update this parameter: {reason}")
        return reason is None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta = group["beta"]
            fused: list[tuple[torch.Tensor, dict[str, Any], float, float]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SMMF does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state, group)
                state["step"] += 1
                t = state["step"]
                # Algorithm 8: β₁,t = β₁·λ^(t−1) (AdamNC), β₂,t = 1 − t^γ (Adafactor); no bias
                # correction (Algorithm 1 has none). Paper error (digest §1.6): with λ < 1 the
                # "growth rate" shrinks β₁,t; we implement the formula as written.
                beta1 = 0.0 if beta is None else beta * group["growth_rate"] ** (t - 1)
                beta2 = 1.0 - t ** group["decay_rate"]
                if "shape" not in state:
                    _dense_update(p, state, group, beta1, beta2)
                elif self._use_triton(p, group):
                    fused.append((p, state, beta1, beta2))
                else:
                    _factored_update(p, state, group, beta1, beta2)
            if fused:
                kernels = _triton_kernels()
                assert kernels is not None
                kernels.smmf_step(fused, group, self._triton_plans)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the saved dtype of every state tensor.

        ``torch.optim.Optimizer`` casts all state of a floating-point parameter to its dtype, which
        would turn the sign bytes into floats and the fp32 factors of a bf16 parameter into bf16.
        """
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for param_id, p in zip(saved_group["params"], group["params"]):
                for key, value in state_dict["state"].get(param_id, {}).items():
                    if torch.is_tensor(value):
                        self.state[p][key] = value.to(device=p.device)


def _decay(group: dict[str, Any]) -> tuple[bool, float]:
    """Weight decay as (add c·W to G: Algorithm 6, factor to scale W by: Algorithm 7)."""
    wd = group["weight_decay"]
    if wd == 0.0:
        return False, 1.0
    if group["weight_decay_mode"] == "adam":
        return True, 1.0
    # Paper error (digest §1.7): Algorithm 7 has W ← W − c·W; the official code (and AdamW)
    # scale it by lr. We scale by lr: without it a usual c = 0.01 shrinks W by 1% every step.
    return False, 1.0 - group["lr"] * wd


def _dense_update(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], beta1: float, beta2: float) -> None:
    """vector_reshape=False on a vector: the same update with full-size M and V."""
    lr = group["lr"]
    adam_decay, decay = _decay(group)
    grad = p.grad
    if adam_decay:
        # Algorithm 6: G_t ← G_t + c·W_{t−1}, in the state dtype (p.grad is left untouched)
        grad = grad.to(state["exp_avg_sq"].dtype, copy=True).add_(p, alpha=group["weight_decay"])
    if decay != 1.0:
        p.mul_(decay)
    exp_avg_sq = state["exp_avg_sq"]
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    if group["beta"] is None:
        p.addcdiv_(grad, denom, value=-lr)
    else:
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        p.addcdiv_(exp_avg, denom, value=-lr)


def _rows_per_chunk(rows: int, cols: int) -> int:
    # Whole rows, and a multiple of 8 elements so each block starts on a sign byte.
    align = 8 // math.gcd(cols, 8)
    return min(rows, max(align, _CHUNK_ELEMENTS // cols // align * align))


def _normalize(row: torch.Tensor, col: torch.Tensor) -> None:
    """Algorithm 4: divide r by its sum when n̂ ≤ m̂, else c."""
    # Paper ambiguity (digest §1.3): for n̂ = m̂ the code divides c, Algorithm 4 r. We follow the
    # paper; the product r ⊗ c is the same.
    vec = row if row.numel() <= col.numel() else col
    total = vec.sum()
    # Zero-sum guard, as the official code: an all-zero matrix keeps all-zero factors.
    vec.div_(torch.where(total == 0, 1.0, total))


def _factored_update(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], beta1: float, beta2: float) -> None:
    """Algorithm 1 for one parameter, in blocks of whole rows of the n̂×m̂ view.

    Per block: V̂ and M̂ are decompressed into scratch, the gradient folded in, the new row sums
    written straight into the state (those old rows are no longer needed), the column sums
    accumulated, the signs rewritten and the weight updated (W_t is rounded to its dtype once).
    Paper ambiguity (digest §2.4): Appendix G says U is computed in place, the code allocates
    several full-size fp32 tensors. We bound every temporary by the block size.
    """
    rows, cols = state["shape"]
    if rows == 0:
        return
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    adam_decay, decay = _decay(group)
    has_m = "sign" in state
    dtype, device = state["row_v"].dtype, p.device

    weight = p if p.is_contiguous() else p.contiguous()
    w_rows, g_rows = weight.view(rows, cols), p.grad.reshape(rows, cols)
    block_rows = _rows_per_chunk(rows, cols)
    # One scratch allocation per parameter step, reused by every block: V, M (then U), ±β₁, G + c·W.
    scratch = torch.empty(2 + has_m + adam_decay, block_rows, cols, dtype=dtype, device=device)
    new_cols = torch.zeros(2, cols, dtype=dtype, device=device)
    if has_m:
        sign = state["sign"]
        if sign.dtype not in (torch.uint8, torch.bool):
            raise TypeError(f"SMMF sign state must be uint8 or bool, got {sign.dtype}")
        signs = _Signs(sign, rows, cols, block_rows * cols, device)

    # memprof estimate: every block allocates and frees the same temporaries (their sizes depend on m̂
    # alone), so the first block gives the step's memory trace; a fake tensor has no values to update, and
    # walking a 7B model's ~7,000 blocks costs minutes of fake ops.
    starts = range(0, block_rows if is_fake(p) else rows, block_rows)
    # Views are taken only where a block is not the whole tensor (each view is an op: ~0.3 ms on fake tensors).
    for r0 in starts:
        r1 = min(rows, r0 + block_rows)
        g, w = _part(g_rows, r0, r1), _part(w_rows, r0, r1)
        v, m, *extra = (_part(t, 0, r1 - r0) for t in scratch)
        if adam_decay:
            # Algorithm 6: G_t ← G_t + c·W_{t−1}, computed in the state dtype
            g = extra[-1].copy_(g).add_(w, alpha=wd)

        # V_t = β₂,t·(r_V ⊗ c_V) + (1 − β₂,t)·G², then its row and column sums
        row_v = _part(state["row_v"], r0, r1)
        torch.outer(row_v, state["col_v"], out=v)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        torch.sum(v, 1, out=row_v)
        new_cols[1].add_(v.sum(0))
        # Paper ambiguity (digest §1.5): Algorithm 1 has M/sqrt(V + eps), the official code
        # M/(sqrt(V) + eps). We choose the code's form because the paper's results come from it
        # and eps = 1e-8 then means what it means in Adam.
        denom = v.sqrt_().add_(eps)
        if not has_m:
            # beta=None: U = G/(sqrt(V) + eps), no first moment and no sign. Paper error (digest
            # §1.8): the appendix M listing garbles this branch; we follow the repository's.
            _apply_update(w, g, denom, m, lr, decay)
            continue

        # M_t = β₁,t·(S ∘ (r_M ⊗ c_M)) + (1 − β₁,t)·G, with S = ±1 from the sign bits
        row_m = _part(state["row_m"], r0, r1)
        torch.outer(row_m, state["col_m"], out=m)
        signed_beta = extra[0].copy_(signs.unpack(r0, r1))
        m.mul_(signed_beta.mul_(2.0 * beta1).sub_(beta1)).add_(g, alpha=1.0 - beta1)
        # Paper error (digest §1.3): Algorithm 4 sets S = 1 where M ≥ 0, the code where M > 0.
        # We follow the paper; the two differ only where M_t is exactly 0.
        signs.pack(m, r0, r1)
        torch.linalg.vector_norm(m, 1, dim=1, out=row_m)
        new_cols[0].add_(torch.linalg.vector_norm(m, 1, dim=0))
        # The update uses the uncompressed M_t and V_t
        _apply_update(w, m, denom, m, lr, decay)

    state["col_v"].copy_(new_cols[1])
    _normalize(state["row_v"], state["col_v"])
    if has_m:
        state["col_m"].copy_(new_cols[0])
        _normalize(state["row_m"], state["col_m"])
    if weight is not p:
        p.copy_(weight)


def _apply_update(w: torch.Tensor, num: torch.Tensor, denom: torch.Tensor, out: torch.Tensor, lr: float, decay: float) -> None:
    """W_t = decay·W_{t−1} − η·num/denom, rounded to W's dtype once (``out`` is scratch)."""
    if decay == 1.0:
        w.addcdiv_(num, denom, value=-lr)
    else:
        w.copy_(torch.div(num, denom, out=out).mul_(-lr).add_(w, alpha=decay))


def _part(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``t[start:stop]`` along the first axis; ``t`` itself where that is all of it (no op)."""
    return t if start == 0 and stop == t.shape[0] else t[start:stop]


class _Signs:
    """The sign state S of one parameter, read and written a block of whole rows at a time: as 0/1 per
    element (``sign_bits=8``), or packed 8 per byte (bit k of byte j is flat element 8j + k) through one
    scratch of a block's bits."""

    def __init__(self, sign: torch.Tensor, rows: int, cols: int, block: int, device: torch.device) -> None:
        self.cols = cols
        if sign.dtype == torch.bool:
            self.sign, self.bits = sign.view(rows, cols), None
            return
        self.sign = sign
        # Row j holds the 8 bits of byte j of the block; blocks start on a byte (``_rows_per_chunk``)
        self.bits = torch.empty((block + 7) // 8, 8, dtype=torch.uint8, device=device)
        self.shifts = torch.arange(8, dtype=torch.uint8, device=device)

    def unpack(self, r0: int, r1: int) -> torch.Tensor:
        """S for rows [r0, r1) as 0/1, shaped like the rows."""
        if self.bits is None:
            return _part(self.sign, r0, r1)
        size, b0, bits = self._block(r0, r1)
        torch.bitwise_right_shift(_part(self.sign, b0, b0 + len(bits)).unsqueeze(1), self.shifts, out=bits)
        bits.bitwise_and_(1)
        if bits.numel() == size:
            return bits.view(-1, self.cols)
        return bits.view(-1)[:size].view(-1, self.cols)

    def pack(self, m: torch.Tensor, r0: int, r1: int) -> None:
        """Write S = (M ≥ 0) for rows [r0, r1) (``m``)."""
        if self.bits is None:
            torch.ge(m, 0, out=_part(self.sign, r0, r1))
            return
        size, b0, bits = self._block(r0, r1)
        if bits.numel() == size:
            torch.ge(m, 0, out=bits.view_as(m))
        else:
            flat = bits.view(-1)
            torch.ge(m.view(-1), 0, out=flat[:size])
            flat[size:].zero_()  # bits past the last element of a partial final byte
        torch.sum(bits.bitwise_left_shift_(self.shifts), 1, dtype=torch.uint8, out=_part(self.sign, b0, b0 + len(bits)))

    def _block(self, r0: int, r1: int) -> tuple[int, int, torch.Tensor]:
        """The block's element count, its first sign byte and its rows of bits."""
        size = (r1 - r0) * self.cols
        return size, r0 * self.cols // 8, _part(self.bits, 0, (size + 7) // 8)
