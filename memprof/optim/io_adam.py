"""IO-Adam: Adam whose weight gradient is never stored and whose second moment comes from the
linear layers' inputs and output gradients.

Paper: "IO-Adam: Rethinking memory-efficient adaptive optimizers from gradient computation"
(anonymous ICLR 2026 submission, OpenReview iCT5xdOlJH). Digest: shared/papers/io-adam-digest.md.

For a linear layer y = W x (W is n×m) the batch weight gradient is (∇_Y L) Xᵀ (Eq. 2). IO-Adam
replaces the layer's autograd node by one that, in backward, computes the input gradient as usual
but folds (∇_Y L) Xᵀ straight into the first moment M (Eq. 4) instead of returning a weight
gradient, and adds Σ_rows |X|^p and Σ_rows |∇_Y L|^q to one column of the factors C (m×b) and
R (n×b) (Eq. 9, 18). ``step()`` then applies W ← W − lr · M̂ / (sqrt(V̂) + eps) with V = R Cᵀ.
Every other parameter (biases, embeddings, norms, convolutions, tied weights) uses AdamW.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections import Counter
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["IOAdam"]


class _FoldedLinear(torch.autograd.Function):
    """``F.linear`` whose backward hands (x, ∇_y L) to the optimizer instead of a weight gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool,
                fold: Callable[[Tensor, Tensor], None]) -> Tensor:
        # The same two tensors nn.Linear's own backward node saves: IO-Adam adds no activation.
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.fold = transposed, fold
        # GPT-2's Conv1D keeps W as (in, out) and computes x W + b.
        return F.linear(x, weight.t() if transposed else weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        # Paper ambiguity (digest §1.1): the paper has no sequence dimension. We treat every token
        # as a sample: X is (N, m) and ∇_Y L is (N, n) with N = batch × sequence length.
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = weight.to(g.dtype)  # no-op unless autocast made the output lower precision
            grad_x = (g @ (w.t() if ctx.transposed else w)).reshape(x.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        ctx.fold(x.reshape(-1, x.shape[-1]), g)
        return grad_x, None, grad_bias, None, None


def _foldable_layers(model: nn.Module) -> Iterator[tuple[nn.Module, bool]]:
    """Linear layers IO-Adam can take over, each with whether its weight is stored (in, out)."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    # nn.MultiheadAttention calls F.linear on out_proj.weight without calling out_proj.
    bypassed = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            continue
        # transformers.pytorch_utils.Conv1D, found by name and layout so transformers stays optional.
        transposed = type(module).__name__ == "Conv1D" and tuple(weight.shape) == (
            getattr(module, "nx", None), getattr(module, "nf", None))
        plain = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
        # Paper ambiguity (digest §6.4): tied weights (GPT-2's lm_head = wte) also get gradients
        # from another module, and a forward someone else replaced (accelerate hooks) may not be
        # a plain linear. We choose AdamW for them: they are not folded. (A deep copy of a folded
        # layer carries our own forward; that one may be folded again.)
        own = module.__dict__.get("forward")
        replaced = own is not None and getattr(own, "__func__", None) is not _folded_forward
        if ((plain or transposed) and weight.requires_grad and owners[id(weight)] == 1
                and id(module) not in bypassed and not replaced):
            yield module, transposed


def _folded_forward(module: nn.Module, x: Tensor) -> Tensor:
    """Forward of a layer IO-Adam folds. A copy of the layer (its weight is not the optimizer's),
    or a layer whose optimizer is gone, runs its class's own forward."""
    optimizer = module._io_adam()
    transposed = None if optimizer is None else optimizer._transposed.get(module.weight)
    if transposed is None:
        return type(module).forward(module, x)
    fold = functools.partial(optimizer._fold, module.weight, transposed)
    return _FoldedLinear.apply(x, module.weight, module.bias, transposed, fold)


@functools.lru_cache(maxsize=256)  # the same (step, b, β2) for every folded layer of a step
def _column_weight_sq_sum(step: int, buffer_size: int, beta2: float) -> float:
    """Σ_k w_k², where w_k is what column k of C would hold at ``step`` if every write were 1."""
    total = 0.0
    for age in range(min(step, buffer_size)):  # the column written ``age`` steps ago
        writes = (step - age - 1) // buffer_size + 1
        weight = (1 - beta2) * beta2**age * (1 - beta2 ** (buffer_size * writes)) / (1 - beta2**buffer_size)
        total += weight * weight
    return total


class IOAdam(torch.optim.Optimizer):
    """IO-Adam over a whole model: folded linear layers plus AdamW for every other parameter.

    Args:
        model: the module to train; its linear layers (``nn.Linear`` and GPT-2's ``Conv1D``) are
            taken over until :meth:`remove_hooks` is called.
        lr: learning rate α (default: 1e-3). IO-Adam's V bounds Adam's G² from above, so it
            usually wants a larger lr than Adam (paper: 0.025 vs 0.002 on LLaMA pre-training).
        betas: (β1, β2) for the first moment and the second-moment factors (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: decoupled weight decay λ, applied to every parameter (default: 0).
        buffer_size: columns b of C and R; column t mod b is written at step t (default: 1).
        holder_p: Hölder exponent p for the inputs; output gradients use q = p / (p − 1)
            (default: 2, the Cauchy–Schwarz bound).
    """

    state_roles: dict[str, str] = {
        "exp_avg": "moment",
        "exp_avg_sq": "moment",
        "input_sq": "factor",
        "grad_out_sq": "factor",
        "step": "other",
    }

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        buffer_size: int = 1,
        holder_p: float = 2.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"IOAdam takes the model (an nn.Module), got {type(model).__name__}")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr}")
        if not (len(betas) == 2 and all(0.0 <= beta < 1.0 for beta in betas)):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"Invalid buffer_size: {buffer_size}")
        # Paper ambiguity (digest §1.5): p, q ∈ [1, ∞] in the paper; p = 1 or ∞ makes the other
        # exponent infinite and |·|^∞ sums meaningless. We require 1 < p < ∞ so q is finite.
        if not 1.0 < holder_p < float("inf"):
            raise ValueError(f"Invalid holder_p: {holder_p}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        buffer_size=buffer_size, holder_p=holder_p)
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        self._transposed: dict[Tensor, bool] = {}  # folded weight -> stored as (in, out)
        self._group_index = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self._folded: set[Tensor] = set()  # folded weights that saw a backward since the last step
        self._modules: list[nn.Module] = []
        for module, transposed in _foldable_layers(model):
            self._attach(module, transposed)

    def _attach(self, module: nn.Module, transposed: bool) -> None:
        # An instance attribute shadows the class's forward; nn.Module hooks still run around it.
        # The optimizer is held weakly, so the model does not keep it alive.
        module.forward = types.MethodType(_folded_forward, module)
        module._io_adam = weakref.ref(self)
        self._transposed[module.weight] = transposed
        self._modules.append(module)

    def remove_hooks(self) -> None:
        """Give the linear layers back their own forward (their weights get gradients again)."""
        for module in self._modules:
            del module.forward, module._io_adam
        self._modules.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; C and R keep their saved fp32 values.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype, which for bf16
        weights would drop their low bits; they are read again from the saved tensors.
        """
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                saved = state_dict["state"].get(index, {})
                for key in ("input_sq", "grad_out_sq"):
                    if key in saved:
                        self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        # Lazy state initialization
        if len(state) == 0:
            # Optimizer steps taken (a Python int: no device memory)
            state["step"] = 0
            # First moment M, full size and in the parameter's dtype, as torch.optim.AdamW keeps it
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if p in self._transposed:
                n_in, n_out = p.shape if self._transposed[p] else reversed(p.shape)
                # Paper ambiguity (digest §6.5): no dtypes are stated. C and R are fp32 even for
                # bf16 weights: a bf16 EMA with β2 = 0.999 cannot move (1 − β2 < half an ulp),
                # and they are small (b·(m + n) values); fp32 matches Table 4's arithmetic.
                # C (m×b): EMA of Σ_rows |X|^p, one column written per step (Eq. 9, 18)
                state["input_sq"] = torch.zeros(n_in, group["buffer_size"], dtype=torch.float32, device=p.device)
                # R (n×b): EMA of Σ_rows |∇_Y L|^q, one column written per step (Eq. 9, 18)
                state["grad_out_sq"] = torch.zeros(n_out, group["buffer_size"], dtype=torch.float32, device=p.device)
            else:
                # AdamW second moment for every parameter that is not a folded linear weight
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def _fold(self, weight: Tensor, transposed: bool, x: Tensor, g: Tensor) -> None:
        """Add one backward's (N, m) inputs ``x`` and (N, n) output gradients ``g`` to M, C, R."""
        group = self.param_groups[self._group_index[weight]]
        state = self._init_state(weight, group)
        beta1, beta2 = group["betas"]
        p = group["holder_p"]
        q = p / (p - 1)
        # Paper ambiguity (digest §1.7, §6.5): gradient accumulation is not described. We decay
        # M, C and R once per optimizer step, on the first backward after it; later backwards
        # before the step only add, so k micro-batches act as one batch of all their rows.
        fresh = weight not in self._folded
        self._folded.add(weight)
        exp_avg = state["exp_avg"]
        xs, gs = x.to(exp_avg.dtype), g.to(exp_avg.dtype)
        # Eq. 4: M ← β1 M + (1 − β1)(∇_Y L) Xᵀ. This GEMM is the weight-gradient GEMM; its result
        # lands in M, so no weight gradient is ever stored.
        exp_avg.addmm_(xs.T if transposed else gs.T, gs if transposed else xs,
                       beta=beta1 if fresh else 1.0, alpha=1 - beta1)
        input_sq, grad_out_sq = state["input_sq"], state["grad_out_sq"]
        # Paper ambiguity (digest §1.4, §6.2): literal Eq. 9 decays every column by β2 each step
        # while only column t mod b receives new mass. We follow it (not a per-column EMA);
        # ``_column_weight_sq_sum`` corrects the resulting scale in ``step``.
        if fresh:
            input_sq.mul_(beta2)
            grad_out_sq.mul_(beta2)
        column = (state["step"] + 1) % group["buffer_size"]
        # vector_norm reduces without materialising |X|^p; raising the norm to p gives Σ|x|^p.
        input_sq[:, column].add_(torch.linalg.vector_norm(x, p, dim=0).float().pow_(p), alpha=1 - beta2)
        grad_out_sq[:, column].add_(torch.linalg.vector_norm(g, q, dim=0).float().pow_(q), alpha=1 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            folded, plain = [], []
            for p in group["params"]:
                if p in self._transposed:
                    if p.grad is not None:
                        raise RuntimeError(
                            f"IOAdam: a folded linear weight of shape {tuple(p.shape)} received a .grad; "
                            "it is used outside its module's forward, or remove_hooks() was called")
                    if p in self._folded:
                        folded.append(p)
                elif p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("IOAdam does not support sparse gradients")
                    plain.append(p)
            self._folded_update(folded, group)
            self._adamw_update(plain, group)
        self._folded.clear()
        return loss

    def _folded_update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        # No host-device sync: steps and bias corrections are Python numbers, factor work is batched
        # over all folded weights, and each weight then costs two kernels (one more GEMM at b > 1).
        if not params:
            return
        lr, eps, weight_decay, buffer_size = group["lr"], group["eps"], group["weight_decay"], group["buffer_size"]
        beta1, beta2 = group["betas"]
        hp = group["holder_p"]
        hq = hp / (hp - 1)
        states = [self.state[p] for p in params]
        for state in states:
            state["step"] += 1
        # Paper error (digest §1.5): Eq. 18 prints sqrt(V) = r^(1/p) c^(1/q), swapping the
        # exponents; Hölder gives |G_jk| ≤ r_j^(1/q) c_k^(1/p). Paper ambiguity: p with b > 1
        # is not described. We choose V = Σ_col r_col^(2/q) c_col^(2/p), which is R Cᵀ at p = 2
        # and (r^(1/q) c^(1/p))² at b = 1.
        # Paper ambiguity (digest §1.4, §6.1): the "modified bias correction" (Algorithm 2) is
        # missing from the paper. With column k holding w_k·s (w_k from Eq. 9's decay, s the
        # per-step sum), V ≈ (Σ_k w_k²)·s_x s_g. We divide by Σ_k w_k², so V̂ ≈ s_x s_g for any b
        # and any step; at b = 1 this is Adam's correction applied to both factors, (1 − β2^t)².
        # At b = 1, V = r cᵀ is an outer product, so sqrt(V̂) = (r^(1/q) / sqrt(Σ w²)) ⊗ c^(1/p):
        # the root is taken on the (m + n)-sized factors, not on n·m entries. The powered, scaled
        # factors are (m + n)·b-sized copies, for all folded weights at once.
        root = 2 if buffer_size == 1 else 1
        rows = torch._foreach_pow([state["grad_out_sq"] for state in states], 2 / (hq * root))
        cols = torch._foreach_pow([state["input_sq"] for state in states], 2 / (hp * root))
        torch._foreach_mul_(rows, [_column_weight_sq_sum(state["step"], buffer_size, beta2) ** (-1 / root)
                                   for state in states])
        # Paper ambiguity (digest §1.6): weight decay is only given as 0.1 for MiniPile. We apply
        # it decoupled, as AdamW does, before the Adam update.
        if weight_decay:
            # W - lr λ W, not W · (1 − lr λ): torch._foreach_mul_ on CPU rounds the factor to a
            # bf16/fp16 parameter's dtype first (1 − 3e-3 becomes 0.99609375); alpha stays fp32.
            torch._foreach_add_(params, params, alpha=-lr * weight_decay)
        # ε as a device scalar lets one addcmul build sqrt(V̂) + ε at b = 1 (a CPU scalar cannot).
        eps_on = {device: torch.full((), eps, dtype=torch.float32, device=device)
                  for device in {p.device for p in params}} if buffer_size == 1 else {}
        for p, state, row, col in zip(params, states, rows, cols):
            # Paper error (digest §1.4): V = C Rᵀ is m×n but W is n×m; we use V = R Cᵀ (Conv1D: C Rᵀ).
            lhs, rhs = (col, row) if self._transposed[p] else (row, col)
            # The step's one full-size temporary (fp32), freed before the next layer.
            if buffer_size == 1:
                denom = torch.addcmul(eps_on[p.device], lhs, rhs.T)
            else:
                denom = torch.mm(lhs, rhs.T).sqrt_().add_(eps)
            # Paper ambiguity (digest §6.3): the paper does not say when W moves. We update it here,
            # after backward, so no layer's input gradient ever sees a half-updated weight.
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** state["step"]))

    def _adamw_update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        # Paper ambiguity (digest §1.7, §6.4): the paper says nothing about parameters outside
        # linear layers. We use AdamW with the same lr, betas, eps and weight decay.
        # torch's fused AdamW kernel does the whole update in one pass per tensor list, with no
        # parameter-sized temporary; it computes in fp32 (opmath) and stores in the state's dtype.
        if not params:
            return
        beta1, beta2 = group["betas"]
        states = [self._init_state(p, group) for p in params]
        for state in states:
            state["step"] += 1
        # The kernel reads each step from a float32 device scalar; these are made per step (no
        # sync, one fill each) so that ``step`` stays a Python int in the state.
        on_device = {key: torch.full((), float(key[1]), dtype=torch.float32, device=key[0])
                     for key in {(p.device, state["step"]) for p, state in zip(params, states)}}
        steps = [on_device[p.device, state["step"]] for p, state in zip(params, states)]
        grouped = self._group_tensors_by_device_and_dtype(
            [params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps])
        for (device_params, grads, exp_avgs, exp_avg_sqs, device_steps), _ in grouped.values():
            torch._fused_adamw_(device_params, grads, exp_avgs, exp_avg_sqs, [], device_steps, amsgrad=False,
                                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)
