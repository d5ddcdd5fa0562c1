"""Adapprox: Adam with a randomized low-rank second moment of adaptive rank.

Zhao, Li, Gu, Zheng, Kölker, Wang, Yuan, "Adapprox: Adaptive Approximation in Adam Optimization
via Randomized Low-Rank Matrices" (arXiv 2403.14958), Algorithms 1-3 and Section 3.5.
Digest: shared/papers/adapprox-digest.md (section numbers in the comments refer to it).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["Adapprox"]


def _matrix_shape(param: Tensor) -> tuple[int, int] | None:
    """The m x n matrix whose second moment is factored, or None for a dense second moment."""
    # Paper gap (digest §1.4c): only matrices are described. We choose a dense V for tensors
    # with fewer than 2 dims (this is what reproduces Table 2) and view a conv kernel
    # (out, in, kh, kw) as out x (in*kh*kw), the usual fan-out x fan-in matrix.
    if param.dim() < 2:
        return None
    m = param.shape[0]
    n = param.numel() // m if m else 0
    # Our choice: a 1 x n (or m x 1) matrix stays dense: rank 1 is already exact and its
    # factors (m + n floats) would cost more than the dense V (mn floats).
    return (m, n) if min(m, n) >= 2 else None


def _rank_cap(m: int, n: int, ratio: float) -> int:
    """k_max = floor(ratio * min(m, n)), at least 1 (the paper's ratio is 0.25, §1.6)."""
    return max(1, math.floor(ratio * min(m, n)))


def _rank_increment(xi: float, eta: float, omega: float, phi: float, tau: float) -> int:
    """f(xi) of Eq. 14, read as floor(|eta / (exp(omega xi + phi) + tau)|), and at least 1."""
    # Paper error (digest §1.3): at the paper's constants eta / (exp(omega xi + phi) + tau) is
    # about -22.4 for every xi > 0, so read literally the rank would shrink. We choose the
    # absolute value (the extracted |.| brackets) plus floor, i.e. f = 22 for the defaults,
    # because that is what the published constants give; the sigmoid shape the text describes
    # cannot be recovered from them. The floor at 1 guarantees every failed try grows the rank.
    denom = math.exp(min(omega * xi + phi, 700.0)) + tau
    raw = abs(eta / denom) if denom != 0.0 else math.inf
    return max(1, math.floor(min(raw, 2.0**31)))


def _sketch_width(rank: int, oversample: int, m: int, n: int) -> int:
    """Columns of the S-RSI test matrix."""
    # Paper constraint (Algorithm 1): (k + p) <= min(m, n). Paper ambiguity (digest §1.3 iii):
    # Algorithm 2's `p <- min(p, k_max - k_t)` is unclear and would drop oversampling exactly
    # at the rank cap. We choose to cap the sketch width only by min(m, n), afresh every call.
    return min(rank + oversample, m, n)


def _s_rsi(a: Tensor, y: Tensor, rank: int, power_iters: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """S-RSI (Algorithm 1) with a small SVD on a batch: ``A[b] ~ Q[b] U[b]^T``, Q orthonormal, U = A^T Q.

    ``a`` is (B, m, n), ``y`` the (B, n, k + p) Gaussian test matrices, ``scale`` (B, 1, 1) is
    ``||A[b]||_F`` (clamped above 0), kept on the device so no host sync is needed. Also returns the
    singular values of ``Q_s^T A / scale`` (all ``s = k + p`` sketch directions), from which the
    error ``xi`` follows without an m x n residual.
    """
    # Paper ambiguity (digest §1.2a): Eq. 9 says (A A^T)^l A, the loop of Algorithm 1 applies
    # A l times, i.e. (A A^T)^(l-1) A. We follow Algorithm 1 because its cost O(l mn (k+p)) is the
    # one the paper measures. Dividing y by ||A||_F keeps A @ y at the scale of A in fp32
    # (unscaled it grows like sigma_1^2 and can underflow for tiny gradients).
    for _ in range(power_iters):
        q = torch.linalg.qr(torch.bmm(a, y)).Q  # m x width, orthonormal basis of the sketch
        y = torch.bmm(a.mT, q).div_(scale)  # n x width, (Q^T A)^T / ||A||_F
    # Paper error (digest §1.2b): truncating Q by column index makes the p extra columns
    # useless (span(Q[:, :k]) depends only on the first k draws). We choose Halko's small SVD of
    # Q^T A (width x n; here of its transpose y) and keep its top-k left singular vectors,
    # which is what the error bound of Eq. 12 assumes and what makes oversampling count.
    # One batched SVD: its convergence check is the only host sync of a steady-state step.
    _, sigma, vh = torch.linalg.svd(y, full_matrices=False)
    z = vh[:, :rank].mT  # width x rank rotation onto the top-k directions of Q^T A
    return torch.bmm(q, z), torch.bmm(y, z).mul_(scale), sigma


class Adapprox(torch.optim.Optimizer):
    r"""Adapprox: Adam without bias correction, RMS-clipped updates and ``V ~ Q U^T`` of adaptive rank.

    For a parameter viewed as an m x n matrix, step t (from 1) forms the dense
    ``V_t = beta2 max(Q U^T, 0) + (1 - beta2) G_t^2``, refactors it with AS-RSI (Algorithm 2:
    randomized subspace iteration whose rank k is re-selected from ``rank_init`` every
    ``rank_interval`` steps until the relative error ``xi <= xi_thresh`` or ``k = k_max``), then
    ``M^_t = G_t / (sqrt(V_t) + eps)``, ``M^_t /= max(1, RMS(M^_t) / clip_threshold)``,
    ``M_t = beta1 M_{t-1} + (1 - beta1) M^_t`` (skipped when beta1 = 0) and
    ``W_t = W_{t-1} - lr (M_t + weight_decay W_{t-1})``. Optional cosine-similarity guidance
    (Section 3.5) multiplies the applied update by ``1 / (1 - cos(M^_t, M_t) + eps)``.

    State per factored parameter: ``Q`` (m x k) and ``U`` (n x k) in fp32, ``exp_avg`` (the
    parameter's shape and dtype) when beta1 > 0, and host ints ``step`` and ``rank`` (= k).
    Resident bytes: ``4 k (m + n) + [beta1 > 0] * elt * mn`` with k between 1 and
    ``floor(rank_max_ratio * min(m, n))``. Tensors with fewer than 2 dims (and 1 x n matrices)
    keep a dense ``exp_avg_sq`` instead, in fp32 (fp64 for fp64): ``(4 + [beta1 > 0] * elt) * n``
    (``8 n (1 + [beta1 > 0])`` for fp64). Each step also holds
    fp32 buffers for V_t (then the update) and O((m + n)(k + p)) sketches: off rank-search steps,
    same-shaped matrices of equal rank are stacked and refactored together (one launch per op,
    one SVD sync per stack), in stacks no larger than the biggest matrix, so the step transient
    stays that of one parameter.

    Randomness comes from one ``torch.Generator`` per device, seeded with ``seed``; every S-RSI
    call draws an n x (k + p) fp32 Gaussian matrix from it, parameters in group order. The
    generators' states travel in the state dict (``"generators"``), so a resumed run draws what
    the uninterrupted run would have drawn.

    Args:
        params: iterable of parameters or param groups.
        lr: step size alpha (default 3e-4, the paper's GPT-2 peak rate; it uses warmup + cosine).
        betas: (beta1, beta2), default (0.9, 0.999); beta1 = 0 drops the first moment.
        eps: added to sqrt(V) and in the cosine factor (default 1e-8).
        weight_decay: decoupled weight decay lambda, applied as ``lr * lambda`` (default 0.1).
        clip_threshold: d of the RMS update clipping (default 1.0).
        rank_init: k_init, the rank every search starts from (default 1).
        rank_max_ratio: k_max as a fraction of min(m, n) (default 0.25).
        power_iters: l, subspace iterations of S-RSI (default 5).
        oversample: p, extra sketch columns (default 5).
        xi_thresh: target relative Frobenius error of the factorization (default 0.01).
        rank_interval: Delta s, steps between rank searches (default 10).
        rank_growth: (eta, omega, phi, tau) of the rank increment, Eq. 14 (default (200, -10, -2.5, -9)).
        cosine_guidance: apply Section 3.5's cosine factor; needs beta1 > 0 (default False).
        cosine_max_scale: upper bound on the cosine factor (default 10.0; not in the paper).
        seed: seed of the random test matrices (default 0).
    """

    whole_model_rule = ("it steps the matrices of one shape from every block together, in stacks of up to the "
                        "largest matrix's elements: a stack's transient grows with the depth and may overtake "
                        "another's beyond the probes")  # memprof.measure.depth
    state_roles: dict[str, str] = {
        "step": "other",
        "rank": "other",
        "Q": "factor",
        "U": "factor",
        "exp_avg": "moment",
        "exp_avg_sq": "moment",
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        clip_threshold: float = 1.0,
        rank_init: int = 1,
        rank_max_ratio: float = 0.25,
        power_iters: int = 5,
        oversample: int = 5,
        xi_thresh: float = 0.01,
        rank_interval: int = 10,
        rank_growth: tuple[float, float, float, float] = (200.0, -10.0, -2.5, -9.0),
        cosine_guidance: bool = False,
        cosine_max_scale: float = 10.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta1 (betas[0]): {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta2 (betas[1]): {betas[1]}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if not 0.0 < clip_threshold:
            raise ValueError(f"Invalid clip_threshold: {clip_threshold}")
        if not (isinstance(rank_init, int) and rank_init >= 1):
            raise ValueError(f"Invalid rank_init: {rank_init}")
        # Paper constraint (k_init + p) <= k_max (Algorithm 3) cannot hold for small matrices
        # (k_max = 1 for a 4 x 27 conv); we cap k_init and the sketch width per matrix instead.
        if not 0.0 < rank_max_ratio <= 1.0:
            raise ValueError(f"Invalid rank_max_ratio: {rank_max_ratio}")
        if not (isinstance(power_iters, int) and power_iters >= 1):
            raise ValueError(f"Invalid power_iters: {power_iters}")
        if not (isinstance(oversample, int) and oversample >= 0):
            raise ValueError(f"Invalid oversample: {oversample}")
        if not 0.0 <= xi_thresh:
            raise ValueError(f"Invalid xi_thresh: {xi_thresh}")
        if not (isinstance(rank_interval, int) and rank_interval >= 1):
            raise ValueError(f"Invalid rank_interval: {rank_interval}")
        # Eq. 14 states eta > 0 and omega < 0; phi and tau are free offsets.
        if not (
            len(rank_growth) == 4
            and all(math.isfinite(v) for v in rank_growth)
            and rank_growth[0] > 0.0
            and rank_growth[1] < 0.0
        ):
            raise ValueError(f"Invalid rank_growth (eta > 0, omega < 0, phi, tau): {rank_growth}")
        # Section 3.5: the guidance "is effective exclusively when beta1 > 0".
        if cosine_guidance and betas[0] == 0.0:
            raise ValueError(f"Invalid cosine_guidance: {cosine_guidance} needs betas[0] > 0")
        if not 0.0 < cosine_max_scale:
            raise ValueError(f"Invalid cosine_max_scale: {cosine_max_scale}")
        if not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip_threshold=clip_threshold,
            rank_init=rank_init, rank_max_ratio=rank_max_ratio, power_iters=power_iters,
            oversample=oversample, xi_thresh=xi_thresh, rank_interval=rank_interval,
            rank_growth=tuple(rank_growth), cosine_guidance=cosine_guidance,
            cosine_max_scale=cosine_max_scale,
        )
        super().__init__(params, defaults)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        # Generator states from a loaded state dict, by device name, applied on first use
        self._saved_generators: dict[str, Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        """The optimizer's generator for ``device``, created on first use: seeded with ``seed``,
        or in the state a loaded state dict gave it."""
        if device not in self._generators:
            generator = torch.Generator(device=device)
            saved = self._saved_generators.pop(str(device), None)
            self._generators[device] = generator.manual_seed(self.seed) if saved is None else generator.set_state(saved)
        return self._generators[device]

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict plus ``"generators"``: each device's generator state (a CPU uint8 tensor)."""
        state_dict = super().state_dict()
        state_dict["generators"] = {**self._saved_generators, **{str(d): g.get_state() for d, g in self._generators.items()}}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict: ``Q``, ``U`` and ``exp_avg_sq`` keep their dtypes (``torch.optim.Optimizer``
        casts floating state to the parameter's), and the generators continue from its ``"generators"``
        (a state dict without them, from before they were saved, restarts them from ``seed``)."""
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for param_id, param in zip(saved_group["params"], group["params"]):
                saved = state_dict["state"].get(param_id, {})
                dtypes = {"Q": torch.float32, "U": torch.float32, "exp_avg_sq": torch.promote_types(param.dtype, torch.float32)}
                for key, dtype in dtypes.items():
                    if key in saved:
                        self.state[param][key] = saved[key].to(device=param.device, dtype=dtype)
        self._generators = {}
        self._saved_generators = dict(state_dict.get("generators", {}))

    def _init_group(self, group: dict[str, Any]) -> list[Tensor]:
        """Create missing state; return the parameters to update in this group."""
        params = []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("Adapprox does not support sparse gradients")
            state = self.state[param]
            # Lazy state initialization (Algorithm 3, "Initialize")
            if len(state) == 0:
                # Steps taken by this parameter, t in Algorithm 3 (host int)
                state["step"] = 0
                shape = _matrix_shape(param)
                if shape is None:
                    # Dense EMA of squared gradients for vectors (digest §1.4c). Our choice: fp32 (fp64
                    # for fp64), not the parameter dtype: in bf16, v * 0.999 rounds back to v (1 - beta2
                    # is below half an ulp), so the EMA could rise but never decay. Vectors are small.
                    dtype = torch.promote_types(param.dtype, torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                else:
                    m, n = shape
                    rank = min(group["rank_init"], _rank_cap(m, n, group["rank_max_ratio"]))
                    # Current rank k_t (host int); k_0 = k_init
                    state["rank"] = rank
                    # Orthonormal left factor Q_t (m x k), fp32 because QR and SVD need it; Q_0 = 0
                    state["Q"] = torch.zeros(m, rank, dtype=torch.float32, device=param.device)
                    # Paper ambiguity (digest §1.1): U is written n x k, k x n and "U^T". We store
                    # U = A^T Q (n x k) so that V ~ Q U^T = Q Q^T A (Eq. 6); fp32; U_0 = 0
                    state["U"] = torch.zeros(n, rank, dtype=torch.float32, device=param.device)
                if group["betas"][0] > 0.0:
                    # EMA of clipped updates M_t (Algorithm 3), parameter dtype as in torch Adam
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
        return params

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """Update every parameter of ``group`` that has a gradient."""
        params = self._init_group(group)
        dense: dict[tuple, list[Tensor]] = {}
        stacks: dict[tuple, list[Tensor]] = {}
        for param in params:
            state = self.state[param]
            state["step"] += 1
            if "Q" not in state:
                dense.setdefault((param.shape, param.dtype, param.device), []).append(param)
            # Paper error: "(t mod Delta s) = 1" never holds for Delta s = 1. We search when
            # (t - 1) mod Delta s = 0, the same steps t = 1, 11, 21, ... for Delta s = 10.
            elif (state["step"] - 1) % group["rank_interval"] != 0:
                key = (state["Q"].shape[0], state["U"].shape[0], state["rank"], param.device)
                stacks.setdefault(key, []).append(param)
        # Stacks hold at most as many elements as the largest matrix, the step transient of one parameter.
        cap = max((m * n for m, n, _, _ in stacks), default=0)
        chunks = [
            members[i:i + max(1, cap // (m * n))]
            for (m, n, _, _), members in stacks.items()
            for i in range(0, len(members), max(1, cap // (m * n)))
        ]
        slots = {param: (c, i) for c, chunk in enumerate(chunks) for i, param in enumerate(chunk)}
        tests: dict[int, Tensor] = {}
        # Draws follow group order, so stacking leaves the random stream unchanged; a stack is
        # refactored as soon as its last test matrix is drawn, so few test matrices wait at once.
        for param in params:
            state = self.state[param]
            if param in slots:
                c, i = slots[param]
                if i == 0:
                    m, n = state["Q"].shape[0], state["U"].shape[0]
                    width = _sketch_width(state["rank"], group["oversample"], m, n)
                    tests[c] = torch.empty(len(chunks[c]), n, width, dtype=torch.float32, device=param.device)
                # Fresh Gaussian test matrix on every call, as the paper does (no warm start, digest §1.2).
                tests[c][i].normal_(generator=self._generator(param.device))
                if i == len(chunks[c]) - 1:
                    self._apply_updates(chunks[c], self._stacked_directions(chunks[c], tests.pop(c), group), group)
            elif "Q" in state:
                self._apply_updates([param], self._factored_direction(param, state, group).unsqueeze(0), group)
        for members in dense.values():
            self._apply_updates(members, self._dense_directions(members, group), group)

    def _stacked_directions(self, params: list[Tensor], test: Tensor, group: dict[str, Any]) -> Tensor:
        """``G_t / (sqrt(V_t) + eps)`` for same-shaped matrices of one rank off search steps, as a
        fresh fp32 (B, m, n) stack; refactors every V_t at the state's rank with the test matrices ``test``."""
        beta2 = group["betas"][1]
        states = [self.state[param] for param in params]
        m, n, rank = states[0]["Q"].shape[0], states[0]["U"].shape[0], states[0]["rank"]
        if len(params) == 1:
            q, u = states[0]["Q"].unsqueeze(0), states[0]["U"].unsqueeze(0)
        else:
            q, u = torch.stack([s["Q"] for s in states]), torch.stack([s["U"] for s in states])
        grads = [param.grad.reshape(m, n).float() for param in params]
        v = torch.bmm(q, u.mT)
        del q, u
        # Paper error (digest §1.4a): Q U^T of a nonnegative matrix can have negative entries,
        # and sqrt would give NaN. We clamp the reconstruction at 0 before adding
        # (1 - beta2) G^2, so a negative estimate cannot cancel the fresh gradient's share.
        v.clamp_min_(0.0).mul_(beta2)
        per_matrix = list(v.unbind(0))
        torch._foreach_addcmul_(per_matrix, grads, grads, value=1.0 - beta2)
        scale = torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True).clamp_min_(torch.finfo(v.dtype).tiny)
        q, u, _ = _s_rsi(v, test, rank, group["power_iters"], scale)
        for state, q_i, u_i in zip(states, q.unbind(0), u.unbind(0)):
            state["Q"], state["U"] = q_i, u_i
        # Paper ambiguity (digest §1.4): the update divides by the dense V_t of this step (low-rank
        # past + exact (1 - beta2) G_t^2), not by its refactored Q_t U_t^T. We follow the literal
        # Algorithm 3; only the factors are carried to the next step.
        v.sqrt_().add_(group["eps"]).reciprocal_()
        torch._foreach_mul_(per_matrix, grads)
        return v

    def _factored_direction(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """``G_t / (sqrt(V_t) + eps)`` as a fresh fp32 m x n tensor on a rank-search step; refactors V_t into Q, U."""
        beta2 = group["betas"][1]
        m, n = state["Q"].shape[0], state["U"].shape[0]
        grad = param.grad.reshape(m, n).float()
        v = state["Q"] @ state["U"].T
        # Clamped at 0 before adding (1 - beta2) G^2, as in _stacked_directions (digest §1.4a).
        v.clamp_min_(0.0).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        self._refactor(v, state, group, self._generator(param.device))
        # Divides by the dense V_t, as in _stacked_directions (digest §1.4).
        v.sqrt_().add_(group["eps"])
        return torch.div(grad, v, out=v)

    def _refactor(self, a: Tensor, state: dict[str, Any], group: dict[str, Any], generator: torch.Generator) -> None:
        """AS-RSI (Algorithm 2) on a search step: store ``A ~ Q U^T`` at a re-selected rank."""
        m, n = a.shape
        norm = torch.linalg.vector_norm(a)
        scale = norm.clamp_min(torch.finfo(a.dtype).tiny)
        k_max = _rank_cap(m, n, group["rank_max_ratio"])
        rank = min(group["rank_init"], k_max)
        a_is_zero = norm.item() == 0.0  # host syncs on search steps only: the rank is a host decision
        while True:
            width = _sketch_width(rank, group["oversample"], m, n)
            # Fresh Gaussian test matrix on every call, as the paper does (no warm start, digest §1.2).
            test = torch.randn(n, width, generator=generator, device=a.device, dtype=a.dtype)
            q, u, sigma = _s_rsi(a.unsqueeze(0), test.unsqueeze(0), rank, group["power_iters"], scale)
            # xi = ||A - Q U^T||_F / ||A||_F (Eq. 13). Q is orthonormal and U = A^T Q, so
            # ||A - Q Q^T A||^2 = ||A||^2 - ||Q^T A||^2: no m x n residual (digest §1.3 iv).
            xi = 0.0 if a_is_zero else math.sqrt(max(0.0, 1.0 - sigma[0, :rank].square().sum().item()))
            # Paper errors (digest §1.3 i, ii): the pseudocode grows k even after xi <= xi_thresh
            # and never stops once k = k_max with xi > xi_thresh. We stop at either.
            if xi <= group["xi_thresh"] or rank == k_max:
                break
            # Paper ambiguity (digest §1.3): the text grows the sketch by f(xi) columns, the
            # pseudocode reruns S-RSI; we rerun S-RSI at the new rank (a fresh draw).
            rank = min(rank + _rank_increment(xi, *group["rank_growth"]), k_max)
        state["Q"], state["U"], state["rank"] = q[0], u[0], rank

    def _dense_directions(self, params: list[Tensor], group: dict[str, Any]) -> Tensor:
        """``G_t / (sqrt(V_t) + eps)`` with a dense V for same-shaped vectors, as a fresh fp32 (B, ...) stack."""
        beta2 = group["betas"][1]
        exp_avg_sqs = [self.state[param]["exp_avg_sq"] for param in params]
        # The gradients in the state's dtype, so the foreach ops see one dtype
        grads = torch.stack([param.grad for param in params]).to(exp_avg_sqs[0].dtype)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, list(grads), list(grads), value=1.0 - beta2)
        denom = torch.stack(exp_avg_sqs).sqrt_().add_(group["eps"])
        return torch.div(grads, denom, out=denom).float()

    def _apply_updates(self, params: list[Tensor], updates: Tensor, group: dict[str, Any]) -> None:
        """Clip ``updates`` (M^_t of ``params[b]`` in ``updates[b]``, fp32, modified in place), fold them
        into M_t and step the parameters."""
        beta1, eps, lr = group["betas"][0], group["eps"], group["lr"]
        flat = updates.view(len(params), -1)
        # Eq. 15: M^_t / max(1, RMS(M^_t) / d), kept on the device (no host sync).
        rms = torch.linalg.vector_norm(flat, dim=1, keepdim=True).div_(math.sqrt(max(flat.shape[1], 1)))
        flat.div_(rms.div_(group["clip_threshold"]).clamp_min_(1.0))
        steps = [update.view(param.shape) for update, param in zip(flat.unbind(0), params)]
        if beta1 > 0.0:
            exp_avgs = [self.state[param]["exp_avg"] for param in params]
            torch._foreach_lerp_(exp_avgs, [u.to(e.dtype) for u, e in zip(steps, exp_avgs)], 1.0 - beta1)
            if group["cosine_guidance"]:
                steps = [
                    _guided(update, exp_avg, eps, group["cosine_max_scale"]) if self.state[param]["step"] > 1 else exp_avg
                    for update, exp_avg, param in zip(steps, exp_avgs, params)
                ]
            else:
                steps = exp_avgs
        if group["weight_decay"] != 0.0:
            # W - lr wd W, not W * (1 - lr wd): torch._foreach_mul_ on CPU rounds the factor to a
            # bf16/fp16 parameter's dtype first (1 - 3e-3 becomes 0.99609375); alpha stays fp32.
            torch._foreach_add_(params, params, alpha=-lr * group["weight_decay"])
        torch._foreach_add_(params, steps, alpha=-lr)

    def telemetry(self, names: Mapping[Tensor, str]) -> dict[str, float]:
        """The current rank k_t of every factored parameter, as ``{"rank/<name>": k}``."""
        out: dict[str, float] = {}
        for group in self.param_groups:
            for index, param in enumerate(group["params"]):
                rank = self.state.get(param, {}).get("rank")
                if rank is not None:
                    out[f"rank/{names.get(param, f'param{index}')}"] = rank
        return out


def _guided(update: Tensor, exp_avg: Tensor, eps: float, max_scale: float) -> Tensor:
    """Section 3.5's ``M_t / (1 - cos(M^_t, M_t) + eps)``, written into ``update`` (fp32)."""
    # Paper gap (digest §1.5): at t = 1, M_0 = 0 makes cos = 1 and the factor 1/eps = 1e8.
    # We skip the guidance at t = 1 (the caller) and cap the factor at cosine_max_scale, because
    # perfectly aligned updates (cos -> 1) would otherwise blow up at any step.
    moment = exp_avg.float()
    dot = torch.dot(update.flatten(), moment.flatten())
    norms = torch.linalg.vector_norm(update) * torch.linalg.vector_norm(moment)
    cos = dot / norms.clamp_min_(torch.finfo(torch.float32).tiny)
    factor = (1.0 - cos + eps).reciprocal_().clamp_max_(max_scale)
    # Paper ambiguity (digest §1.5): Eq. 18 overwrites M_t with the scaled value. We keep
    # the unscaled EMA and scale only the applied update, so factors do not compound.
    return torch.mul(moment, factor, out=update)
