"""AdaMeM: Adafactor with momentum kept only in the gradient's top-r subspace.

Vyas, Morwani, Kakade, "AdaMeM: Memory Efficient Momentum for Adafactor", WANT@ICML 2024
(https://openreview.net/forum?id=fZqMVTz7K5). Notes on every choice the paper leaves open:
``docs/optimizers/adamem.md`` and ``/work/shared/papers/adamem-digest.md`` (cited as "digest §x").
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["AdaMeM"]


class AdaMeM(torch.optim.Optimizer):
    r"""AdaMeM (Vyas, Morwani, Kakade, 2024).

    For a gradient matrix :math:`G \in \mathbb{R}^{m \times n}` (:math:`m \le n`) with projector
    :math:`P \in \mathbb{R}^{m \times r}` (top-r left singular vectors of :math:`G`, refreshed every
    ``update_proj_gap`` steps)::

        R = Pᵀ G;  S = G − P R                      # low-rank part, residual (S ⟂ span P)
        M ← β1 M + (1−β1) R                         # momentum only in the subspace
        N1 = M̂ / (√V̂(M) + ε)                        # two-sided Adafactor of the momentum (Alg 3)
        N2 = S / (√(colmean EMA S²) + ε)            # one-sided Adafactor of the residual (Alg 4)
        W ← W(1 − η λ) − η (P N1 + δ N2)

    Which parameters are projected: a parameter with two or more dimensions, seen as the matrix
    ``(shape[0], prod(shape[1:]))`` (a conv kernel is (out, in·kh·kw)), whose group has an integer
    ``rank`` smaller than the matrix's short side, and whose short side is at least
    ``full_rank_min_dim``. Every other parameter (1-D, small, or in a group with ``rank=None``)
    stays full-rank and runs plain Adafactor without momentum, factored for matrices, as the
    paper trains its unprojected first and last layers. To reproduce the paper's main setting,
    put the embedding and output head in a param group with ``rank=None``.

    State is kept in the parameter's dtype (fp32 or bf16, like ``torch.optim.Adam``); the SVD runs
    in fp32. Per projected m×n matrix it is b·((m+n)·r + r + 2n) bytes, b = bytes per element.

    Args:
        params: parameters or param groups to optimize.
        lr: step size η (default: 1e-3; the paper sweeps 3.16e-4 … 1e-2).
        betas: (β1, β2): momentum decay and Adafactor second-moment decay (default: (0.9, 0.95)).
        eps: added to the square root of the second moment (default: 1e-8).
        weight_decay: decoupled weight decay λ (default: 0.01).
        rank: rank r of the momentum subspace; ``None`` keeps a group full-rank (default: 128).
        update_proj_gap: steps T between SVD refreshes of the projector (default: 200).
        delta: relative step size δ of the residual update (default: 1.0; the paper sweeps 0.5, 1).
        full_rank_min_dim: matrices whose short side is below this stay full-rank (default: 0).
    """

    state_roles: dict[str, str] = {
        "step": "other",
        "proj": "projection",
        "exp_avg": "moment",
        "exp_avg_sq_row": "factor",
        "exp_avg_sq_col": "factor",
        "os_exp_avg_sq_col": "factor",
        "exp_avg_sq": "moment",
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        rank: int | None = 128,
        update_proj_gap: int = 200,
        delta: float = 1.0,
        full_rank_min_dim: int = 0,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid betas[0]: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas[1]: {betas[1]}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"Invalid rank: {rank}")
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise ValueError(f"Invalid update_proj_gap: {update_proj_gap}")
        if not 0.0 <= delta:
            raise ValueError(f"Invalid delta: {delta}")
        if isinstance(full_rank_min_dim, bool) or not isinstance(full_rank_min_dim, int) or full_rank_min_dim < 0:
            raise ValueError(f"Invalid full_rank_min_dim: {full_rank_min_dim}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            delta=delta,
            full_rank_min_dim=full_rank_min_dim,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _is_projected(p: Tensor, group: dict[str, Any]) -> bool:
        if p.dim() < 2 or group["rank"] is None:
            return False
        short = min(p.shape[0], p.numel() // p.shape[0])
        # A rank at or above the short side leaves no residual: nothing to save, and the
        # one-sided step would only normalise round-off, so such matrices stay full-rank.
        return group["rank"] < short and short >= group["full_rank_min_dim"]

    @staticmethod
    def _wide(t: Tensor) -> Tensor:
        """``t`` as an m×n matrix view with m ≤ n (transposed when shape[0] is the long side).

        ``view``, not ``reshape``: the parameter is updated through it, so it must never be a copy.
        """
        mat = t.view(t.shape[0], -1)
        return mat.T if mat.shape[0] > mat.shape[1] else mat

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            # Steps taken for this parameter (a Python int: no device tensor, no sync)
            state["step"] = 0
            if self._is_projected(p, group):
                m, n = self._wide(p).shape
                r = group["rank"]
                # P: top-r left singular vectors of the gradient (m×r), filled at the first step
                state["proj"] = torch.zeros(m, r, dtype=p.dtype, device=p.device)
                # M: momentum of Pᵀ G (r×n)
                state["exp_avg"] = torch.zeros(r, n, dtype=p.dtype, device=p.device)
                # Adafactor row statistic of M² (r): EMA of row sums
                state["exp_avg_sq_row"] = torch.zeros(r, dtype=p.dtype, device=p.device)
                # Adafactor column statistic of M² (n): EMA of column sums
                state["exp_avg_sq_col"] = torch.zeros(n, dtype=p.dtype, device=p.device)
                # One-sided Adafactor statistic of the residual S² (n): EMA of column sums
                state["os_exp_avg_sq_col"] = torch.zeros(n, dtype=p.dtype, device=p.device)
            elif p.dim() >= 2:
                rows = p.shape[0]
                # Adafactor row statistic of G² (shape[0]): EMA of row sums of the (rows × rest) view
                state["exp_avg_sq_row"] = torch.zeros(rows, dtype=p.dtype, device=p.device)
                # Adafactor column statistic of G² (prod(shape[1:])): EMA of column sums
                state["exp_avg_sq_col"] = torch.zeros(p.numel() // rows, dtype=p.dtype, device=p.device)
            else:
                # Unfactored second moment of a vector (or scalar) parameter
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            vec_params: list[Tensor] = []
            vec_grads: list[Tensor] = []
            vec_sqs: list[Tensor] = []
            vec_bc2: list[float] = []
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaMeM does not support sparse gradients")
                state = self._init_state(p, group)
                state["step"] += 1
                if "proj" in state:
                    self._step_projected(p, state, group)
                elif "exp_avg_sq_row" in state:
                    self._step_factored(p, state, group)
                else:
                    vec_params.append(p)
                    vec_grads.append(p.grad)
                    vec_sqs.append(state["exp_avg_sq"])
                    vec_bc2.append(1.0 - beta2 ** state["step"])
            if vec_params:
                self._step_vectors(vec_params, vec_grads, vec_sqs, vec_bc2, group)
        return loss

    @staticmethod
    def _factored_denominator(
        row: Tensor, col: Tensor, bias_correction2: float, eps: float, out: Tensor
    ) -> Tensor:
        """√(R Cᵀ / 1ᵀR / bc2) + ε into ``out``: Alg 3's rank-1 second moment, bias-corrected."""
        total = row.sum().clamp_(min=torch.finfo(row.dtype).tiny)  # all-zero rows: 0/tiny, not 0/0
        torch.outer(row, col, out=out)
        return out.div_(total * bias_correction2).sqrt_().add_(eps)

    def _step_projected(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, t = group["lr"], group["eps"], state["step"]
        grad = self._wide(p.grad.contiguous())
        proj, exp_avg = state["proj"], state["exp_avg"]
        row, col, os_col = state["exp_avg_sq_row"], state["exp_avg_sq_col"], state["os_exp_avg_sq_col"]

        # Paper error (digest §1.3.4): Alg 2 refreshes P when t mod T = 0 with t starting at 1, so P
        # would be undefined for t < T. We refresh at t = 1, T+1, 2T+1, …, GaLore's schedule, because
        # it defines P at the first step and keeps every interval exactly T steps long.
        if (t - 1) % group["update_proj_gap"] == 0:
            # Full thin SVD of the current gradient in fp32, as the paper and GaLore do; transient
            # m×m + m×n (+ an fp32 copy of G for bf16). Paper ambiguity (digest §1.3.6): M, R and C
            # are kept as they are when P changes (GaLore does not rotate or reset them either).
            u = torch.linalg.svd(grad.float(), full_matrices=False)[0]
            proj.copy_(u[:, : proj.shape[1]])

        # Paper error (digest §1.3.5): the paper uses G = −∇ and adds the update; we use G = +∇ and
        # subtract it, which is the same step.
        low = torch.mm(proj.T, grad)  # R = Pᵀ G (r×n)
        residual = torch.addmm(grad, proj, low, alpha=-1.0)  # S = G − P R (m×n, the one full-size transient)
        # Paper error (digest §1.3.1): Alg 1 says M ∈ R^{n×r}; M has the shape of Pᵀ G, r×n.
        exp_avg.lerp_(low, 1.0 - beta1)
        # Alg 3 as written: the low-rank second moment is built from the momentum M, not from R.
        # Paper ambiguity (digest §1.3.8): Alg 3 uses sums; V̂ = R Cᵀ / 1ᵀR is scale-consistent.
        row.lerp_(torch.linalg.vector_norm(exp_avg, dim=1).square_(), 1.0 - beta2)
        col.lerp_(torch.linalg.vector_norm(exp_avg, dim=0).square_(), 1.0 - beta2)
        # Paper error (digest §1.3.3): Alg 4 as printed keeps a row statistic and divides by a
        # shape that does not fit; Claim 3.1 and the "r + n + n" memory count need a per-column
        # statistic on the unprojected side, so S is scaled on the right and stays ⟂ span P.
        os_col.lerp_(torch.linalg.vector_norm(residual, dim=0).square_(), 1.0 - beta2)

        # Paper ambiguity (digest §1.3.7): bias correction and ε are "not described"; we use Adam's
        # 1/(1−β1ᵗ) on M, 1/(1−β2ᵗ) on each second moment and ε outside the square root, because ε =
        # 1e-8 is Adam's value and the factored V̂ carries the (1−β2ᵗ) bias exactly once.
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        n1 = self._factored_denominator(row, col, bias_correction2, eps, out=low)
        n1.reciprocal_().mul_(exp_avg)  # N1 = M / (√V̂ + ε), before 1/(1−β1ᵗ)
        # Alg 4: V̂ = column mean of the EMA of S² (the "/m" turns the sum into a mean).
        os_denom = os_col.div(residual.shape[0] * bias_correction2).sqrt_().add_(eps)
        residual.mul_(os_denom.reciprocal_().mul_(group["delta"]))  # δ N2
        # Paper error (digest §1.3.2): line 11 adds the r×n N1 to the m×n W; the low-rank update is
        # P N1 (no GaLore-style scale α: the paper sweeps α only for GaLore, δ only for AdaMeM).
        update = residual.addmm_(proj, n1, alpha=1.0 / bias_correction1)
        # Paper ambiguity (digest §1.5): weight decay 0.01 is used but its form is not stated; we
        # decay decoupled (AdamW), before the update, as torch.optim.AdamW does.
        if group["weight_decay"] != 0:
            p.mul_(1.0 - lr * group["weight_decay"])
        self._wide(p).add_(update, alpha=-lr)

    def _step_factored(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Full-rank matrix: Alg 3's factored Adafactor on G² itself, no momentum."""
        beta2 = group["betas"][1]
        lr, eps = group["lr"], group["eps"]
        grad = p.grad.reshape(p.shape[0], -1)
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        # Paper ambiguity (digest §1.6): unprojected layers get "Adafactor" (the paper's baseline,
        # without momentum, m + n state), with the same β2, ε and bias correction as the low-rank part.
        row.lerp_(torch.linalg.vector_norm(grad, dim=1).square_(), 1.0 - beta2)
        col.lerp_(torch.linalg.vector_norm(grad, dim=0).square_(), 1.0 - beta2)
        denom = self._factored_denominator(
            row, col, 1.0 - beta2 ** state["step"], eps, out=torch.empty_like(grad)
        )
        if group["weight_decay"] != 0:
            p.mul_(1.0 - lr * group["weight_decay"])
        p.view(p.shape[0], -1).addcdiv_(grad, denom, value=-lr)

    @staticmethod
    def _step_vectors(
        params: list[Tensor],
        grads: list[Tensor],
        sqs: list[Tensor],
        bias_corrections2: list[float],
        group: dict[str, Any],
    ) -> None:
        """Vectors and scalars: unfactored Adafactor (RMSProp with bias correction), no momentum."""
        beta2 = group["betas"][1]
        lr = group["lr"]
        # Paper ambiguity (digest §1.6): 1-D parameters are not discussed; they get the plain
        # Adafactor the paper uses for unprojected layers, unfactored because a vector has one side.
        torch._foreach_lerp_(sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
        denoms = torch._foreach_div(sqs, bias_corrections2)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, group["eps"])
        if group["weight_decay"] != 0:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(params, grads, denoms, -lr)
