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
    ``4 (m + n)`` per parameter (``8 (m + n)`` for fp64); each step also holds one m x n scratch
    buffer in that dtype, for one parameter at a time.

    Step 1: a grad of ``None`` is ``M_0 = 0``: :meth:`zero_grad` leaves it ``None`` and backward
    creates ``(1 - beta1) G_0``, exactly ``M_1``. A parameter is initialised at the first step
    where its momentum is nonzero (one host sync for it). Parameters whose grad is ``None`` are
    skipped and keep no state. Pitfalls: ``model.zero_grad()`` or ``set_to_none`` elsewhere in the
    loop resets the momentum; gradient clipping and AMP ``GradScaler.unscale_`` act on the
    momentum, not on ``G_t`` (clipping shrinks the stored momentum for all later steps);
    gradient accumulation works unchanged (call :meth:`zero_grad` once per step); with bf16
    params the momentum is held in bf16.

    Args:
        params: iterable of parameters or param groups.
        lr: step size (default 1e-3; the paper tunes it per task and decays it linearly).
        betas: (beta1, beta2); the paper recommends (0.9, 0.9). beta1 must be equal in all groups.
        eps: added inside the square root and to ``||p||^2``, ``||q||^2`` (default 1e-16).
        weight_decay: decoupled (AdamW-style) weight decay (default 0, as in the paper).
    """

    state_roles: dict[str, str] = {"p_acc": "factor", "q_acc": "factor", "v0": "other", "step": "other"}
    gradient_component: str = "grad+first_moment"

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the factors in fp32 (torch casts them to the param dtype)."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for key in ("p_acc", "q_acc"):
                if key in state:
                    state[key] = state[key].to(torch.promote_types(param.dtype, torch.float32))

    def _init_group(self, group: dict[str, Any]) -> list[Tensor]:
        """Create missing state; return the parameters to update in this group."""
        beta1 = group["betas"][0]
        params = []
        for param in group["params"]:
            if param.grad is None or param.numel() == 0:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("Alada does not support sparse gradients")
            state = self.state[param]
            # Lazy state initialization (Algorithm 2, lines 8-12)
            if len(state) == 0:
                m, n = _matrix_shape(param.shape)
                dtype = torch.promote_types(param.dtype, torch.float32)
                # Algorithm 2 line 9 takes ||G_0||; the buffer holds M_1 = (1 - beta1) G_0 (M_0 = 0),
                # so G_0 = M_1 / (1 - beta1) and v0 = ||M_1||^2 / ((1 - beta1)^2 mn) (digest §1.4).
                norm = torch.linalg.vector_norm(param.grad, dtype=dtype).item()
                v0 = (norm / (1.0 - beta1)) ** 2 / (m * n)
                # Paper gap (not in the digest): a zero first gradient (e.g. LoRA A while B = 0)
                # gives p_0 = q_0 = 0, which Algorithm 2 never leaves (lines 14/18 stay 0) and
                # then steps by M / sqrt(eps). We defer initialisation to the first nonzero
                # momentum; with M_t = 0 so far, that step is exactly a t = 0 step.
                if v0 == 0.0:
                    continue
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
            beta1, beta2 = group["betas"]
            # One parameter at a time on purpose: the m x n scratch buffer of one parameter is
            # the whole step transient (a foreach version would hold all of them at once).
            for param in self._init_group(group):
                _alada_update(
                    param, self.state[param], lr=group["lr"], beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"],
                )
        return loss


def _alada_update(
    param: Tensor, state: dict[str, Any], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    """Algorithm 2, lines 5-22, for one parameter whose ``grad`` already holds ``M_{t+1}``."""
    grad, p_acc, q_acc, t = param.grad, state["p_acc"], state["q_acc"], state["step"]
    root_v0 = math.sqrt(state["v0"])
    bias_correction1 = 1.0 - beta1 ** (t + 1)
    bias_correction2 = 1.0 - beta2 ** (t + 1)
    # Paper gap (digest §1.4): U~ = (p q^T - beta2^{t+1} v0) / (1 - beta2^{t+1}) is >= 0 only in exact
    # arithmetic; early on it cancels catastrophically in fp32 (a row with gradients 1e-3 of the
    # RMS gets U~ = 0 and a step of M~ / sqrt(eps)). We keep p = beta2^a sqrt(v0) + p_acc and
    # q = beta2^b sqrt(v0) + q_acc (a + b = t + 1 after the step) so that
    # p q^T - beta2^{t+1} v0 = p q_acc^T + beta2^b sqrt(v0) p_acc 1^T: a sum of nonnegative terms,
    # the same numbers as the paper's without the subtraction, and no clamp needed.
    # One m x n scratch buffer: first M^2 (V without the 1 / bias_correction1^2, folded in below),
    # then the denominator. Writing through a view in the parameter's shape reads any grad
    # layout (channels_last included) without a copy; bf16 grads are squared in bf16.
    buf = torch.empty(p_acc.numel(), q_acc.numel(), dtype=p_acc.dtype, device=p_acc.device)
    torch.mul(grad, grad, out=buf.view(grad.shape))
    if t % 2 == 0:
        # t even: p <- beta2 p + (1 - beta2) V q / (||q||^2 + eps), q unchanged (lines 13-15)
        q = q_acc + beta2 ** (t // 2) * root_v0
        p_acc.mul_(beta2).add_(torch.mv(buf, q).div_(q.dot(q) + eps), alpha=(1.0 - beta2) / bias_correction1**2)
    else:
        # t odd: q <- beta2 q + (1 - beta2) V^T p / (||p||^2 + eps), p unchanged (lines 16-18)
        p = p_acc + beta2 ** ((t + 1) // 2) * root_v0
        q_acc.mul_(beta2).add_(torch.mv(buf.t(), p).div_(p.dot(p) + eps), alpha=(1.0 - beta2) / bias_correction1**2)
    p = p_acc + beta2 ** (t // 2 + 1) * root_v0
    # Lines 20-22 with bias_correction2 multiplied through:
    # buf = bias_correction2 * (U~ + eps) = p q_acc^T + (beta2^b sqrt(v0) p_acc + eps bias_correction2) 1^T
    column = p_acc.mul(beta2 ** ((t + 1) // 2) * root_v0).add_(eps * bias_correction2)
    denom = torch.outer(p, q_acc, out=buf).add_(column.unsqueeze(1)).sqrt_()
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    # Paper ambiguity (digest §1.4): line 22 prints the raw M_{t+1}, the text says the step
    # preconditions the bias-corrected M~_{t+1}. We use M~ (= M / bias_correction1, Adam-style)
    # because the text says so twice and Theorem 1's eta_t = eta (1 - beta1^{t+1}) only makes
    # sense with M~; the literal line would shrink step 1 by 1 - beta1.
    param.addcdiv_(grad, denom.view(param.shape), value=-lr * math.sqrt(bias_correction2) / bias_correction1)
    state["step"] = t + 1
