"""AdaMeM: Adafactor with momentum kept only in the gradient's top-r subspace.

Vyas, Morwani, Kakade, "AdaMeM: Memory Efficient Momentum for Adafactor", WANT@ICML 2024
(https://openreview.net/forum?id=fZqMVTz7K5). Notes on every choice the paper leaves open:
``docs/optimizers.md`` (the paper digest's sections are cited as "digest §x").
"""

from __future__ import annotations

from fnmatch import fnmatchcase
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
    paper trains its unprojected first and last layers. Given ``(name, param)`` pairs (as from
    ``model.named_parameters()``), parameters whose qualified name matches ``full_rank`` stay
    full-rank too: they are moved to a copy of their group with ``rank=None``, and each group keeps
    its names in ``param_names`` (torch's key). The paper's main setting is
    ``full_rank=("wte", "lm_head")`` on GPT-2 and ``("embed_tokens", "lm_head")`` on LLaMA.

    State is kept in the parameter's dtype (fp32 or bf16, like ``torch.optim.Adam``); the SVD runs
    in fp32. Per projected m×n matrix it is b·((m+n)·r + r + 2n) bytes, b = bytes per element.
    A step batches the matrices of one shape; a batch never holds more elements than the param
    group's largest matrix, so the step's transient stays about one such residual plus r×n buffers.

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
        full_rank: name patterns of parameters kept full-rank; needs named parameters (default: ()).
            A pattern is a dotted run of name parts, each an ``fnmatch`` pattern: ``"wte"`` matches
            ``transformer.wte.weight``, ``"h.0"`` matches ``h.0.attn.c_attn.weight`` but not
            ``h.10.…``, and ``"h.*.mlp"`` matches every block's MLP. A single string is one pattern.
    """

    whole_model_rule = ("it steps the matrices of one shape from every block together, in batches of up to the "
                        "largest matrix's elements: a batch's transient grows with the depth and may overtake "
                        "another's beyond the probes")  # memprof.measure.depth
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
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        rank: int | None = 128,
        update_proj_gap: int = 200,
        delta: float = 1.0,
        full_rank_min_dim: int = 0,
        full_rank: tuple[str, ...] | str = (),
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
        full_rank = self._patterns(full_rank)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            delta=delta,
            full_rank_min_dim=full_rank_min_dim,
            full_rank=full_rank,
        )
        super().__init__(params, defaults)
        # A pattern that selects nothing is almost always a typo; fail rather than silently project.
        names = [name for group in self.param_groups for name in group.get("param_names", ())]
        if full_rank and not any(self._matches(name, full_rank) for name in names):
            raise ValueError(f"Invalid full_rank: {full_rank} matches no parameter name")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; ``(name, param)`` pairs matching ``full_rank`` go to a ``rank=None`` copy.

        Names are split off here rather than left to ``torch.optim.Optimizer`` (which accepts pairs
        only from torch 2.6) and kept in ``param_names``, the key torch itself uses.
        """
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        pairs = [p for p in params if isinstance(p, tuple)]
        patterns = self._patterns(param_group.get("full_rank", self.defaults["full_rank"]))
        if not pairs:
            if patterns:
                raise ValueError(f"Invalid full_rank: {patterns} needs (name, param) pairs (model.named_parameters())")
            super().add_param_group({**param_group, "params": params})
            return
        if len(pairs) != len(params):
            raise ValueError("Invalid params: give all parameters with names or none")
        full = [self._matches(name, patterns) for name, _ in pairs]
        for keep_full, overrides in ((False, {}), (True, {"rank": None})):
            chosen = [pair for pair, is_full in zip(pairs, full) if is_full == keep_full]
            if chosen:
                names, tensors = zip(*chosen)
                group = {**param_group, **overrides, "full_rank": patterns}
                super().add_param_group({**group, "params": list(tensors), "param_names": list(names)})

    @staticmethod
    def _patterns(full_rank: Any) -> tuple[str, ...]:
        """``full_rank`` as a tuple of patterns (a lone string is one); ValueError when malformed."""
        patterns = (full_rank,) if isinstance(full_rank, str) else full_rank
        if not isinstance(patterns, (tuple, list)) or not all(
            isinstance(pattern, str) and all(pattern.split(".")) for pattern in patterns
        ):
            raise ValueError(f"Invalid full_rank: {full_rank!r}")
        return tuple(patterns)

    @staticmethod
    def _matches(name: str, patterns: tuple[str, ...]) -> bool:
        """Whether some pattern's dot-separated parts fnmatch a contiguous run of the name's parts."""
        parts = name.split(".")
        for pattern in patterns:
            want = pattern.split(".")
            for start in range(len(parts) - len(want) + 1):
                if all(fnmatchcase(part, w) for part, w in zip(parts[start:], want)):
                    return True
        return False

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
        """Perform a single optimization step.

        No host-device sync outside the SVD refresh: projected matrices of one shape, dtype,
        device and step run as one batch (per matrix only the four m×n GEMM/elementwise kernels),
        and every vector-sized op runs as one batched or ``torch._foreach_*`` kernel.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            projected: dict[tuple[Any, ...], list[Tensor]] = {}
            factored: list[Tensor] = []
            vectors: list[Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaMeM does not support sparse gradients")
                state = self._init_state(p, group)
                state["step"] += 1
                if "proj" in state:
                    self._refresh_projector(p, state, group)
                    key = (p.shape[0], p.numel() // p.shape[0], p.dtype, p.device, state["step"])
                    projected.setdefault(key, []).append(p)
                elif "exp_avg_sq_row" in state:
                    factored.append(p)
                else:
                    vectors.append(p)
            # Batches never hold more elements than the group's largest matrix, so the step's
            # transient stays that of one matrix (one m×n residual or denominator), as unbatched.
            matrices = factored + [p for same_shape in projected.values() for p in same_shape]
            budget = max((p.numel() for p in matrices), default=0)
            for same_shape in projected.values():
                for batch in self._batches(same_shape, budget):
                    self._step_projected(batch, group)
            for batch in self._batches(factored, budget):
                self._step_factored(batch, group)
            if vectors:
                self._step_vectors(vectors, group)
        return loss

    @staticmethod
    def _batches(params: list[Tensor], budget: int) -> list[list[Tensor]]:
        """Consecutive runs of ``params`` whose total numel is at most ``budget`` (at least one each)."""
        batches: list[list[Tensor]] = []
        size = 0
        for p in params:
            if batches and size + p.numel() <= budget:
                batches[-1].append(p)
                size += p.numel()
            else:
                batches.append([p])
                size = p.numel()
        return batches

    @staticmethod
    def _stack(tensors: list[Tensor]) -> Tensor:
        """``torch.stack``, but a view (no copy) for a single tensor. Read it; never write it."""
        return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

    @staticmethod
    def _times_proj(proj: Tensor, x: Tensor, tall: bool) -> tuple[Tensor, Tensor]:
        """GEMM operands of P·X in the parameter's own layout: (P, X), or (Xᵀ, Pᵀ) for a tall one.

        Working in the parameter's layout keeps the m×n residual and the weight update contiguous
        and coalesced; only the small factors are read transposed, which GEMMs do for free.
        """
        return (x.T, proj.T) if tall else (proj, x)

    def _refresh_projector(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        # Paper error (digest §1.3.4): Alg 2 refreshes P when t mod T = 0 with t starting at 1, so P
        # would be undefined for t < T. We refresh at t = 1, T+1, 2T+1, …, GaLore's schedule, because
        # it defines P at the first step and keeps every interval exactly T steps long.
        if (state["step"] - 1) % group["update_proj_gap"] == 0:
            # Full thin SVD of the current gradient in fp32, as the paper and GaLore do; transient
            # m×m + m×n (+ an fp32 copy of G for bf16). Paper ambiguity (digest §1.3.6): M, R and C
            # are kept as they are when P changes (GaLore does not rotate or reset them either).
            # The SVD syncs with the host on CUDA; it runs once every T steps.
            grad = self._wide(p.grad.contiguous())
            u = torch.linalg.svd(grad.float(), full_matrices=False)[0]
            state["proj"].copy_(u[:, : state["proj"].shape[1]])

    def _step_projected(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Projected matrices of one shape, dtype, device and step, as one batch of k."""
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        states = [self.state[p] for p in params]
        t = states[0]["step"]
        rows, cols = params[0].shape[0], params[0].numel() // params[0].shape[0]
        tall = rows > cols  # the paper's m×n matrix (m ≤ n) is the transpose of the parameter's
        m, r = states[0]["proj"].shape
        n = max(rows, cols)
        projs = [s["proj"] for s in states]
        low = params[0].new_empty(len(params), r, n)  # R = Pᵀ G (k×r×n), later N1
        residual = params[0].new_empty(len(params), rows, cols)  # S = G − P R, in the parameter's layout
        # Paper error (digest §1.3.5): the paper uses G = −∇ and adds the update; we use G = +∇ and
        # subtract it, which is the same step.
        for proj, p, low_i, res_i in zip(projs, params, low, residual):
            grad = p.grad.reshape(rows, cols)
            torch.mm(proj.T, grad.T if tall else grad, out=low_i)
            torch.addmm(grad, *self._times_proj(proj, low_i, tall), alpha=-1.0, out=res_i)

        # Paper error (digest §1.3.1): Alg 1 says M ∈ R^{n×r}; M has the shape of Pᵀ G, r×n.
        exp_avgs = [s["exp_avg"] for s in states]
        torch._foreach_lerp_(exp_avgs, list(low.unbind(0)), 1.0 - beta1)
        exp_avg = self._stack(exp_avgs)
        # Alg 3 as written: the low-rank second moment is built from the momentum M, not from R.
        # Paper ambiguity (digest §1.3.8): Alg 3 uses sums; V̂ = R Cᵀ / 1ᵀR is scale-consistent.
        # Paper error (digest §1.3.3): Alg 4 as printed keeps a row statistic and divides by a
        # shape that does not fit; Claim 3.1 and the "r + n + n" memory count need a per-column
        # statistic on the unprojected side, so S is scaled on the right and stays ⟂ span P.
        sums = [
            torch.linalg.vector_norm(exp_avg, dim=2),  # rows of M
            torch.linalg.vector_norm(exp_avg, dim=1),  # columns of M
            torch.linalg.vector_norm(residual, dim=2 if tall else 1),  # columns of S (m×n view)
        ]
        torch._foreach_mul_(sums, sums)
        stats = [[s[key] for s in states] for key in ("exp_avg_sq_row", "exp_avg_sq_col", "os_exp_avg_sq_col")]
        torch._foreach_lerp_(
            [v for stat in stats for v in stat], [v for total in sums for v in total.unbind(0)], 1.0 - beta2
        )
        row, col, os_col = (self._stack(stat) for stat in stats)

        # Paper ambiguity (digest §1.3.7): bias correction and ε are "not described"; we use Adam's
        # 1/(1−β1ᵗ) on M, 1/(1−β2ᵗ) on each second moment and ε outside the square root, because ε =
        # 1e-8 is Adam's value and the factored V̂ carries the (1−β2ᵗ) bias exactly once.
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        # √(R Cᵀ / 1ᵀR / bc2) + ε, Alg 3's rank-1 second moment; all-zero rows give 0/tiny, not 0/0.
        total = row.sum(dim=1, keepdim=True).clamp_(min=torch.finfo(row.dtype).tiny).mul_(bias_correction2)
        n1 = torch.mul((row / total).unsqueeze(2), col.unsqueeze(1), out=low).sqrt_().add_(eps)
        n1 = torch.div(exp_avg, n1, out=n1)  # N1 = M / (√V̂ + ε), before 1/(1−β1ᵗ)
        # Alg 4: V̂ = column mean of the EMA of S² (the "/m" turns the sum into a mean).
        os_denom = os_col.div(m * bias_correction2).sqrt_().add_(eps)

        # Paper error (digest §1.3.2): line 11 adds the r×n N1 to the m×n W; the low-rank update is
        # P N1 (no GaLore-style scale α: the paper sweeps α only for GaLore, δ only for AdaMeM).
        # Paper ambiguity (digest §1.5): weight decay 0.01 is used but its form is not stated; we
        # decay decoupled (AdamW), before the update, as torch.optim.AdamW does (GEMM's beta).
        decay = 1.0 - lr * group["weight_decay"]
        for proj, p, n1_i, res_i, os_i in zip(projs, params, n1, residual, os_denom):
            weight = p.view(rows, cols)
            weight.addmm_(*self._times_proj(proj, n1_i, tall), beta=decay, alpha=-lr / bias_correction1)
            weight.addcdiv_(res_i, os_i.unsqueeze(1) if tall else os_i, value=-lr * group["delta"])  # δ N2

    def _step_factored(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Full-rank matrices: Alg 3's factored Adafactor on G² itself, no momentum."""
        beta2 = group["betas"][1]
        lr, eps = group["lr"], group["eps"]
        states = [self.state[p] for p in params]
        grads = [p.grad.reshape(p.shape[0], -1) for p in params]
        rows = [s["exp_avg_sq_row"] for s in states]
        cols = [s["exp_avg_sq_col"] for s in states]
        # Paper ambiguity (digest §1.6): unprojected layers get "Adafactor" (the paper's baseline,
        # without momentum, m + n state), with the same β2, ε and bias correction as the low-rank part.
        sums = [torch.linalg.vector_norm(g, dim=1) for g in grads] + [torch.linalg.vector_norm(g, dim=0) for g in grads]
        torch._foreach_mul_(sums, sums)
        torch._foreach_lerp_(rows + cols, sums, 1.0 - beta2)
        # √(R Cᵀ / 1ᵀR / bc2) + ε; 1ᵀR is the L1 norm, R ≥ 0; all-zero rows give 0/tiny, not 0/0.
        totals = torch._foreach_norm(rows, 1)
        torch._foreach_clamp_min_(totals, torch.finfo(rows[0].dtype).tiny)
        torch._foreach_mul_(totals, [1.0 - beta2 ** s["step"] for s in states])
        denoms = [torch.outer(a, c) for a, c in zip(torch._foreach_div(rows, totals), cols)]
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        if group["weight_decay"] != 0:
            # W - lr wd W, not W * (1 - lr wd): torch._foreach_mul_ on CPU rounds the factor to a
            # bf16/fp16 parameter's dtype first (1 - 3e-3 becomes 0.99609375); alpha stays fp32.
            torch._foreach_add_(params, params, alpha=-lr * group["weight_decay"])
        torch._foreach_addcdiv_([p.view(p.shape[0], -1) for p in params], grads, denoms, -lr)

    def _step_vectors(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Vectors and scalars: unfactored Adafactor (RMSProp with bias correction), no momentum."""
        beta2 = group["betas"][1]
        lr = group["lr"]
        grads = [p.grad for p in params]
        sqs = [self.state[p]["exp_avg_sq"] for p in params]
        # Paper ambiguity (digest §1.6): 1-D parameters are not discussed; they get the plain
        # Adafactor the paper uses for unprojected layers, unfactored because a vector has one side.
        torch._foreach_lerp_(sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
        denoms = torch._foreach_div(sqs, [1.0 - beta2 ** self.state[p]["step"] for p in params])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, group["eps"])
        if group["weight_decay"] != 0:
            # W - lr wd W: exact in bf16 too, as in _step_factored
            torch._foreach_add_(params, params, alpha=-lr * group["weight_decay"])
        torch._foreach_addcdiv_(params, grads, denoms, -lr)
