"""Alada: alternating adaptation of a rank-one second moment, first moment kept in ``p.grad``.

He, Cai, Jia, Huang, Chen, Zheng, "Alada: Alternating Adaptation of Momentum Method for
Memory-Efficient Matrix Optimization" (arXiv 2512.13034), Algorithm 2 and Section IV.
Digest: shared/papers/alada-digest.md (section numbers in the comments refer to it).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["Alada"]


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The m x n matrix eq. 12 views a tensor as: the split of leading/trailing dims closest to square."""
    if len(shape) <= 1:
        # Paper gap (digest §1.7): vectors and scalars are not addressed. We choose eq. 12 with
        # tau = 1, i.e. k x 1 (p holds one entry per element, q one scalar: exact per-element
        # adaptivity for k + 1 floats) because it keeps one rule for every shape.
        return math.prod(shape), 1
    # Ties go to the smaller j (min keeps the first); j ranges over 1..tau-1 (digest §1.7).
    j = min(range(1, len(shape)), key=lambda j: abs(math.prod(shape[:j]) - math.prod(shape[j:])))
    return math.prod(shape[:j]), math.prod(shape[j:])


class Alada(torch.optim.Optimizer):
    r"""Alada: Adam-like steps with a rank-one second moment ``U = p q^T`` and no momentum state.

    The first moment ``M`` lives in ``p.grad``: :meth:`zero_grad` decays it (``grad *= beta1``)
    instead of clearing it and :meth:`scale_loss` returns ``(1 - beta1) * loss``, so backward
    leaves ``grad = beta1 M + (1 - beta1) G`` (eq. 9). A training loop must therefore be::

        optimizer.zero_grad()
        optimizer.scale_loss(loss_fn(model(x), y)).backward()   # memprof.optim.protocol.scale_loss
        optimizer.step()

    Per parameter, viewed as m x n by eq. 12, step t (from 0) forms ``V = (M / (1 - beta1^{t+1}))^2``,
    updates ``p`` on even t and ``q`` on odd t by one alternating least-squares step on ``V``,
    bias-corrects ``U`` with ``v0 = ||G_0||^2 / mn`` and steps ``X -= lr M~ / sqrt(U~ + eps)``.
    State: ``p_acc`` (m) and ``q_acc`` (n), the factors less their decayed start ``beta2^k sqrt(v0)``,
    in fp32 (fp64 for fp64 params); ``v0`` and ``step`` are host numbers. Resident bytes:
    ``4 (m + n)`` per parameter (``8 (m + n)`` for fp64). Each step batches parameters of equal
    m x n into chunks that share one scratch buffer in that dtype, of at most
    ``max(largest parameter, min(all parameters, scratch_numel))`` elements, and never syncs with
    the device once every parameter is initialised.

    Step 1: a grad of ``None`` is ``M_0 = 0``: :meth:`zero_grad` leaves it ``None`` and backward
    creates ``(1 - beta1) G_0``, exactly ``M_1``. A parameter is initialised at the first step
    where its momentum is nonzero (one host sync per device and dtype for all such parameters).
    Parameters whose grad is ``None`` are skipped and keep no state. Pitfalls: ``model.zero_grad()`` or ``set_to_none`` elsewhere in the
    loop resets the momentum; gradient clipping and AMP ``GradScaler.unscale_`` act on the
    momentum, not on ``G_t`` (clipping shrinks the stored momentum for all later steps);
    gradient accumulation works unchanged (call :meth:`zero_grad` once per step); with bf16
    params the momentum is held in bf16 (and squared in fp32). Checkpoints: :meth:`state_dict`
    carries the momentum (``"momentum"``, the grad tensor itself) and :meth:`load_state_dict` puts
    it back in ``p.grad``, so model + optimizer state dicts resume exactly; a checkpoint of the
    model alone loses M with the rest of the optimizer state (a fresh Alada restarts at t = 0).

    Args:
        params: iterable of parameters or param groups.
        lr: step size (default 1e-3; the paper tunes it per task and decays it linearly).
        betas: (beta1, beta2); the paper recommends (0.9, 0.9). beta1 must be equal in all groups.
        eps: added inside the square root and to ``||p||^2``, ``||q||^2`` (default 1e-16).
        weight_decay: decoupled (AdamW-style) weight decay (default 0, as in the paper).
    """

    whole_model_rule = ("it steps the matrices of one shape from every block together, in chunks of up to all the "
                        "parameters' elements or scratch_numel: a chunk's transient grows with the depth and may "
                        "overtake another's beyond the probes")  # memprof.measure.depth
    state_roles: dict[str, str] = {"p_acc": "factor", "q_acc": "factor", "v0": "other", "step": "other"}
    gradient_component: str = "grad+first_moment"
    # Elements the step's scratch buffer may hold beyond the largest parameter (16 MiB in fp32):
    # more parameters per chunk means fewer kernel launches.
    scratch_numel: int = 1 << 22

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr}")
        # Paper ambiguity (digest §1.6): Algorithm 2 asks beta1, beta2 in (0, 1), Section III allows
        # beta2 = 0 and the sensitivity study runs beta1 = 0. We accept [0, 1) for both.
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta1 (betas[0]): {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta2 (betas[1]): {betas[1]}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps}")
        # Paper gap (digest §1.6): weight decay is never mentioned. We offer decoupled decay,
        # off by default (= the paper), because fine-tuning comparisons against AdamW need it.
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its beta1 must match the others (one loss scale serves all groups)."""
        beta1 = param_group.get("betas", self.defaults["betas"])[0]
        if self.param_groups and beta1 != self.param_groups[0]["betas"][0]:
            raise ValueError(
                f"Invalid beta1 (betas[0]): {beta1}; every param group must use "
                f"beta1={self.param_groups[0]['betas'][0]} because scale_loss scales one loss"
            )
        super().add_param_group(param_group)

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss to back-propagate: ``(1 - beta1) * loss``, so backward adds ``(1 - beta1) G``."""
        return loss * (1.0 - self.param_groups[0]["betas"][0])

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Decay the momentum held in ``p.grad``: ``M <- beta1 M`` (Listing 1, line 10).

        ``set_to_none`` is accepted for signature compatibility and ignored: clearing the
        buffer would erase the first moment. A ``None`` grad stays ``None`` (it means ``M = 0``).
        """
        for group in self.param_groups:
            grads = [param.grad for param in group["params"] if param.grad is not None]
            if grads:
                torch._foreach_mul_(grads, group["betas"][0])

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict plus each parameter's first moment, ``p.grad``, as ``"momentum"``.

        A model's state dict does not hold the gradient buffer, so without this entry a resumed run
        would restart M at 0 with the saved step counts and drift. Like torch's own state, the
        entry is the tensor itself, not a copy. A ``None`` grad (M = 0) gets no entry.
        """
        state_dict = super().state_dict()
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, param in zip(saved_group["params"], group["params"]):
                if param.grad is not None:
                    # A new dict: torch's packed state shares the per-parameter dicts of self.state
                    state_dict["state"][index] = {**state_dict["state"].get(index, {}), "momentum": param.grad}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict: every parameter's grad becomes its saved ``"momentum"`` (``None``, i.e.
        M = 0, where none was saved), and the factors keep their fp32 values."""
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, param in zip(saved_group["params"], group["params"]):
                saved, state = state_dict["state"].get(index, {}), self.state[param]
                for key in ("p_acc", "q_acc"):
                    if key in saved:
                        # From the saved tensor: torch cast the state to a bf16/fp16 parameter's dtype
                        # (dropping the factors' low bits), we keep promote(param dtype, fp32).
                        dtype = torch.promote_types(param.dtype, torch.float32)
                        state[key] = saved[key].to(device=param.device, dtype=dtype)
                # torch cast it to the parameter's dtype and device, as a grad must be
                param.grad = state.pop("momentum", None)
                if not state:  # a parameter with momentum but no state yet (deferred initialisation)
                    del self.state[param]

    def _init_group(self, group: dict[str, Any]) -> list[Tensor]:
        """Create missing state; return the parameters to update in this group."""
        beta1 = group["betas"][0]
        params, new = [], []
        for param in group["params"]:
            if param.grad is None or param.numel() == 0:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("Alada does not support sparse gradients")
            (params if len(self.state[param]) > 0 else new).append(param)
        for param, norm in zip(new, _grad_norms(new)):
            m, n = _matrix_shape(param.shape)
            # Algorithm 2 line 9 takes ||G_0||; the buffer holds M_1 = (1 - beta1) G_0 (M_0 = 0),
            # so G_0 = M_1 / (1 - beta1) and v0 = ||M_1||^2 / ((1 - beta1)^2 mn) (digest §1.4).
            v0 = (norm / (1.0 - beta1)) ** 2 / (m * n)
            # Paper gap (not in the digest): a zero first gradient (e.g. LoRA A while B = 0)
            # gives p_0 = q_0 = 0, which Algorithm 2 never leaves (lines 14/18 stay 0) and
            # then steps by M / sqrt(eps). We defer initialisation to the first nonzero
            # momentum; with M_t = 0 so far, that step is exactly a t = 0 step.
            if v0 == 0.0:
                continue
            state = self.state[param]
            dtype = torch.promote_types(param.dtype, torch.float32)
            # Lazy state initialization (Algorithm 2, lines 8-12)
            # Steps taken by this parameter, t in Algorithm 2: parity picks p or q, t + 1 the bias corrections
            state["step"] = 0
            # v_0 = ||G_0||^2 / mn (host float): p_0 = q_0 = sqrt(v0), subtracted again in line 21
            state["v0"] = v0
            # p - beta2^a sqrt(v0), a = updates of p so far: the accumulated part of the row factor (m,)
            state["p_acc"] = torch.zeros(m, dtype=dtype, device=param.device)
            # q - beta2^b sqrt(v0), b = updates of q so far: the accumulated part of the column factor (n,)
            state["q_acc"] = torch.zeros(n, dtype=dtype, device=param.device)
            params.append(param)
        return params

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform a single optimization step; ``p.grad`` must hold the momentum ``M_{t+1}``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Parameters at the same step t share every scalar but sqrt(v0): batch them together.
            buckets: dict[tuple[torch.device, torch.dtype, int], list[Tensor]] = {}
            for param in self._init_group(group):
                buckets.setdefault((param.device, param.dtype, self.state[param]["step"]), []).append(param)
            for (_, _, t), params in buckets.items():
                # The scratch buffer holds at most the largest parameter, or scratch_numel
                # elements where all parameters together are larger (never more than all of them).
                budget = max(max(p.numel() for p in params), min(sum(p.numel() for p in params), self.scratch_numel))
                for runs in _chunks(params, [self.state[p] for p in params], budget):
                    _alada_chunk(
                        runs, [[self.state[p] for p in run] for run in runs], t=t, lr=group["lr"],
                        beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                        weight_decay=group["weight_decay"],
                    )
                for param in params:
                    self.state[param]["step"] = t + 1
        return loss


def _grad_norms(params: list[Tensor]) -> list[float]:
    """||grad|| of each parameter in fp32 (fp64 for fp64): one host sync per device and dtype."""
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, param in enumerate(params):
        kinds.setdefault((param.device, param.dtype), []).append(i)
    norms = [0.0] * len(params)
    for (_, dtype), indices in kinds.items():
        grads = [params[i].grad for i in indices]
        values = torch._foreach_norm(grads, 2, dtype=torch.promote_types(dtype, torch.float32))
        for i, value in zip(indices, torch.stack(values).tolist()):
            norms[i] = value
    return norms


def _chunks(params: list[Tensor], states: list[dict[str, Any]], budget: int) -> list[list[list[Tensor]]]:
    """Cut ``params`` into chunks of at most ``budget`` elements (a larger parameter alone), each a
    list of runs of parameters with the same m x n, so that a run is one batched (k, m, n) block."""
    by_matrix: dict[tuple[int, int], list[Tensor]] = {}
    for param, state in zip(params, states):
        by_matrix.setdefault((state["p_acc"].numel(), state["q_acc"].numel()), []).append(param)
    chunks, runs, size = [], [], 0
    for same in by_matrix.values():
        run = []
        for param in same:
            if size > 0 and size + param.numel() > budget:
                if run:
                    runs.append(run)
                chunks.append(runs)
                run, runs, size = [], [], 0
            run.append(param)
            size += param.numel()
        runs.append(run)
    chunks.append(runs)
    return chunks


def _stacked(runs: list[list[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """Copy runs of equal-length vectors into one buffer with one foreach copy; return its
    (k, length) block per run and its rows (one per vector, in order)."""
    sizes = [len(run) * run[0].numel() for run in runs]
    flat = torch.empty(sum(sizes), dtype=runs[0][0].dtype, device=runs[0][0].device)
    blocks = [block.view(len(run), -1) for block, run in zip(flat.split(sizes), runs)]
    rows = [row for block in blocks for row in block.unbind(0)]
    torch._foreach_copy_(rows, [vector for run in runs for vector in run])
    return blocks, rows


def _normalized_matvecs(blocks: list[Tensor], vectors: list[Tensor], eps: float) -> list[Tensor]:
    """Rows of ``V x / (||x||^2 + eps)`` (Algorithm 2, lines 14 and 18), one batched product per run."""
    rows = []
    for block, x in zip(blocks, vectors):
        product = torch.bmm(block, x.unsqueeze(-1)).squeeze(-1)
        product.div_(torch.linalg.vecdot(x, x).add_(eps).unsqueeze(-1))
        rows.extend(product.unbind(0))
    return rows


def _alada_chunk(
    runs: list[list[Tensor]], states: list[list[dict[str, Any]]], *, t: int, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float,
) -> None:
    """Algorithm 2, lines 5-22, for parameters at step t whose ``grad`` already holds ``M_{t+1}``.

    ``runs`` groups them by their m x n: each run is one batched (k, m, n) block of a single scratch
    buffer, and every other op is a foreach op over all of them. The only per-parameter numbers,
    ``sqrt(v0)``, travel as scalar lists, so the step never reads a tensor back to the host.
    """
    params = [param for run in runs for param in run]
    p_acc_runs = [[state["p_acc"] for state in run] for run in states]
    q_acc_runs = [[state["q_acc"] for state in run] for run in states]
    p_accs = [p_acc for run in p_acc_runs for p_acc in run]
    q_accs = [q_acc for run in q_acc_runs for q_acc in run]
    root_v0 = [math.sqrt(state["v0"]) for run in states for state in run]
    bias_correction1 = 1.0 - beta1 ** (t + 1)
    bias_correction2 = 1.0 - beta2 ** (t + 1)
    # Paper gap (digest §1.4): U~ = (p q^T - beta2^{t+1} v0) / (1 - beta2^{t+1}) is >= 0 only in exact
    # arithmetic; early on it cancels catastrophically in fp32 (a row with gradients 1e-3 of the
    # RMS gets U~ = 0 and a step of M~ / sqrt(eps)). We keep p = beta2^a sqrt(v0) + p_acc and
    # q = beta2^b sqrt(v0) + q_acc (a + b = t + 1 after the step) so that
    # p q^T - beta2^{t+1} v0 = p q_acc^T + beta2^b sqrt(v0) p_acc 1^T: a sum of nonnegative terms,
    # the same numbers as the paper's without the subtraction, and no clamp needed.
    # One scratch buffer for the chunk, a (k, m, n) block per run: first M^2 (V without the
    # 1 / bias_correction1^2, folded in below), then the denominator. Copying through views in the
    # parameters' shapes reads any grad layout (channels_last included); M^2 is formed in fp32.
    scratch = torch.empty(sum(param.numel() for param in params), dtype=p_accs[0].dtype, device=p_accs[0].device)
    sizes = [len(run) * run[0].numel() for run in runs]
    blocks = [
        block.view(len(run), p_run[0].numel(), q_run[0].numel())
        for block, run, p_run, q_run in zip(scratch.split(sizes), runs, p_acc_runs, q_acc_runs)
    ]
    matrices = [matrix.view(param.shape) for block, run in zip(blocks, runs) for matrix, param in zip(block, run)]
    torch._foreach_copy_(matrices, [param.grad for param in params])
    scratch.square_()
    alpha = (1.0 - beta2) / bias_correction1**2
    if t % 2 == 0:
        # t even: p <- beta2 p + (1 - beta2) V q / (||q||^2 + eps), q unchanged (lines 13-15)
        q_blocks, q_rows = _stacked(q_acc_runs)
        torch._foreach_add_(q_rows, [beta2 ** (t // 2) * root for root in root_v0])
        torch._foreach_mul_(p_accs, beta2)
        torch._foreach_add_(p_accs, _normalized_matvecs(blocks, q_blocks, eps), alpha=alpha)
        p_blocks, p_rows = _stacked(p_acc_runs)
        torch._foreach_add_(p_rows, [beta2 ** (t // 2 + 1) * root for root in root_v0])
    else:
        # t odd: q <- beta2 q + (1 - beta2) V^T p / (||p||^2 + eps), p unchanged (lines 16-18);
        # (t + 1) // 2 = t // 2 + 1, so this p is also the one of line 20
        p_blocks, p_rows = _stacked(p_acc_runs)
        torch._foreach_add_(p_rows, [beta2 ** ((t + 1) // 2) * root for root in root_v0])
        transposed = [block.transpose(1, 2) for block in blocks]
        torch._foreach_mul_(q_accs, beta2)
        torch._foreach_add_(q_accs, _normalized_matvecs(transposed, p_blocks, eps), alpha=alpha)
    # Lines 20-22 with bias_correction2 multiplied through:
    # scratch = bias_correction2 * (U~ + eps) = p q_acc^T + (beta2^b sqrt(v0) p_acc + eps bias_correction2) 1^T
    column_blocks, column_rows = _stacked(p_acc_runs)
    torch._foreach_mul_(column_rows, [beta2 ** ((t + 1) // 2) * root for root in root_v0])
    torch._foreach_add_(column_rows, eps * bias_correction2)
    q_acc_blocks, _ = _stacked(q_acc_runs)
    for block, p, column, q_acc in zip(blocks, p_blocks, column_blocks, q_acc_blocks):
        torch.addcmul(column.unsqueeze(-1), p.unsqueeze(-1), q_acc.unsqueeze(1), out=block)
    scratch.sqrt_()
    if weight_decay != 0.0:
        # W - lr wd W, not W * (1 - lr wd): torch._foreach_mul_ on CPU rounds the factor to a
        # bf16/fp16 parameter's dtype first (1 - 1e-3 becomes 1); alpha stays fp32.
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)
    # Paper ambiguity (digest §1.4): line 22 prints the raw M_{t+1}, the text says the step
    # preconditions the bias-corrected M~_{t+1}. We use M~ (= M / bias_correction1, Adam-style)
    # because the text says so twice and Theorem 1's eta_t = eta (1 - beta1^{t+1}) only makes
    # sense with M~; the literal line would shrink step 1 by 1 - beta1.
    torch._foreach_addcdiv_(
        params, [param.grad for param in params], matrices, value=-lr * math.sqrt(bias_correction2) / bias_correction1
    )
