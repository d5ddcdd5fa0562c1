"""IO-Adam against a step-by-step reference written from the paper's equations (CPU, small)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from training_for_tests import train

from memprof.optim.io_adam import IOAdam
from memprof.optim.registry import build_optimizer, parse_spec


class Mixed(nn.Module):
    """Embedding 50x16, conv 4x3x3x3, Linear 20->13 (prime), LayerNorm 13, bias-free Linear 13->7,
    Linear 7->50 (weight 50x7) and Linear 16->50 (weight 50x16): every shape the brief names."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(20, 13)
        self.norm = nn.LayerNorm(13)
        self.fc2 = nn.Linear(13, 7, bias=False)
        self.head = nn.Linear(7, 50)
        self.side = nn.Linear(16, 50)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens)  # (B, T, 16)
        c = self.conv(image).mean((2, 3))[:, None, :].expand(-1, tokens.shape[1], -1)  # (B, T, 4)
        h = torch.relu(self.norm(self.fc1(torch.cat([e, c], -1))))
        return self.head(self.fc2(h)) + self.side(e)


MIXED_FOLDED = ("fc1", "fc2", "head", "side")


def mixed_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (3, 5), generator=g)
    image = torch.randn(3, 3, 5, 5, generator=g)
    target = torch.randint(0, 50, (3, 5), generator=g)
    return (tokens, image), target


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


class Reference:
    """The paper's equations applied to full autograd gradients and hook-captured X, ∇_Y L.

    Folded layers (named by the test, not by the implementation): M = β1 M + (1 − β1) ∇_W L (Eq. 3),
    every column of C, R decays by β2 and column t mod b gains (1 − β2) Σ_rows |X|^p, |∇_Y L|^q
    (Eq. 9, 18); V[j,k] = Σ_col r[j,col]^(2/q) c[k,col]^(2/p); V̂ = V / Σ_col w_col² with w the
    column weights for all-ones writes; W ← W(1 − αλ) − α M̂ / (sqrt(V̂) + ε). Everything else: AdamW.
    """

    def __init__(self, model, folded, *, forward=None, transposed=(), lr, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, buffer_size=1, holder_p=2.0):
        self.forward = forward or (lambda *inputs: model(*inputs))
        self.model, self.lr, self.eps, self.wd, self.b, self.p = model, lr, eps, weight_decay, buffer_size, holder_p
        self.beta1, self.beta2 = betas
        self.q = holder_p / (holder_p - 1)
        self.modules = {name: model.get_submodule(name) for name in folded}
        self.transposed = set(transposed)
        self.captured: dict[str, dict[str, torch.Tensor]] = {name: {} for name in folded}
        for name, module in self.modules.items():
            module.register_forward_hook(lambda m, args, out, name=name: self.captured[name].__setitem__("x", args[0].detach()))
            module.register_full_backward_hook(
                lambda m, gin, gout, name=name: self.captured[name].__setitem__("g", gout[0].detach()))
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        self.col_weight = torch.zeros(buffer_size, dtype=torch.float64)
        self.t = 0

    def step(self, inputs, target) -> None:
        self.model.zero_grad()
        lm_loss(self.forward(*inputs), target).backward()
        self.t += 1
        t, b1, b2 = self.t, self.beta1, self.beta2
        col = t % self.b
        self.col_weight *= b2
        self.col_weight[col] += 1 - b2
        folded_weights = {m.weight for m in self.modules.values()}
        with torch.no_grad():
            for name, module in self.modules.items():
                w = module.weight
                x = self.captured[name]["x"].reshape(-1, self.captured[name]["x"].shape[-1]).double()
                g = self.captured[name]["g"].reshape(-1, self.captured[name]["g"].shape[-1]).double()
                st = self.state.setdefault(w, {"M": torch.zeros_like(w, dtype=torch.float64),
                                               "C": torch.zeros(x.shape[1], self.b, dtype=torch.float64),
                                               "R": torch.zeros(g.shape[1], self.b, dtype=torch.float64)})
                st["M"] = b1 * st["M"] + (1 - b1) * w.grad.double()
                for k in range(self.b):
                    st["C"][:, k] *= b2
                    st["R"][:, k] *= b2
                st["C"][:, col] += (1 - b2) * (x.abs() ** self.p).sum(0)
                st["R"][:, col] += (1 - b2) * (g.abs() ** self.q).sum(0)
                v = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float64)  # (n_out, n_in)
                for k in range(self.b):
                    v += torch.outer(st["R"][:, k] ** (2 / self.q), st["C"][:, k] ** (2 / self.p))
                v_hat = v / (self.col_weight**2).sum()
                if name in self.transposed:
                    v_hat = v_hat.T
                m_hat = st["M"] / (1 - b1**t)
                new = w.double() * (1 - self.lr * self.wd) - self.lr * m_hat / (v_hat.sqrt() + self.eps)
                w.copy_(new)
            for p in self.model.parameters():
                if p in folded_weights or p.grad is None:
                    continue
                st = self.state.setdefault(p, {"m": torch.zeros_like(p, dtype=torch.float64),
                                               "v": torch.zeros_like(p, dtype=torch.float64)})
                grad = p.grad.double()
                st["m"] = b1 * st["m"] + (1 - b1) * grad
                st["v"] = b2 * st["v"] + (1 - b2) * grad * grad
                m_hat, v_hat = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
                p.copy_(p.double() * (1 - self.lr * self.wd) - self.lr * m_hat / (v_hat.sqrt() + self.eps))


def run_io_adam(model, inputs, target, **kwargs) -> IOAdam:
    opt = IOAdam(model, **kwargs)
    opt.zero_grad()
    lm_loss(model(*inputs), target).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2),
    dict(lr=1e-2, buffer_size=3, weight_decay=0.1),
    dict(lr=1e-2, buffer_size=2, holder_p=1.5),
])
def test_matches_reference_step_by_step(kwargs):
    torch.manual_seed(0)
    model = Mixed()
    reference = Reference(copy.deepcopy(model), MIXED_FOLDED, **kwargs)
    opt = IOAdam(model, **kwargs)
    for step in range(4):
        inputs, target = mixed_batch(step)
        opt.zero_grad()
        lm_loss(model(*inputs), target).backward()
        for name in MIXED_FOLDED:
            assert model.get_submodule(name).weight.grad is None, name
        opt.step()
        reference.step(inputs, target)
        for (name, p), q in zip(model.named_parameters(), reference.model.parameters()):
            torch.testing.assert_close(p, q.to(p.dtype), rtol=1e-4, atol=1e-6, msg=f"step {step + 1}: {name}")


def test_gpt2_matches_reference():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout, gradients still flow
    conv1d = ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
              "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")
    # The key bias gets a zero gradient up to rounding (~1e-11; softmax ignores it); eps = 1e-6 keeps
    # AdamW from amplifying that rounding noise into lr-sized steps that differ between the two runs.
    kwargs = dict(lr=1e-2, eps=1e-6, buffer_size=2, weight_decay=0.01)
    ref_model = copy.deepcopy(model)
    reference = Reference(ref_model, conv1d, forward=lambda ids: ref_model(ids).logits, transposed=conv1d, **kwargs)
    opt = IOAdam(model, **kwargs)
    # lm_head is tied to wte: it stays with AdamW and keeps its gradient.
    assert model.lm_head.weight not in opt._transposed
    for step in range(3):
        ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        lm_loss(model(ids).logits, ids).backward()
        assert all(model.get_submodule(name).weight.grad is None for name in conv1d)
        assert model.transformer.wte.weight.grad is not None
        opt.step()
        reference.step((ids,), ids)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=f"step {step + 1}: {name}")


def state_bytes(opt: torch.optim.Optimizer, params) -> int:
    seen, total = set(), 0
    for p in params:
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("dtype,buffer_size", [(torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 3)])
def test_state_bytes_match_formula(dtype, buffer_size):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    inputs, target = mixed_batch(0)
    opt = run_io_adam(model, (inputs[0], inputs[1].to(dtype)), target, buffer_size=buffer_size)
    size = torch.empty((), dtype=dtype).element_size()
    folded = {model.get_submodule(name).weight for name in MIXED_FOLDED}
    for name, p in model.named_parameters():
        if p in folded:
            n, m = p.shape
            expected = size * n * m + 4 * buffer_size * (n + m)  # M in the weight's dtype, fp32 C and R
        else:
            expected = 2 * size * p.numel()  # AdamW's two moments
        assert state_bytes(opt, [p]) == expected, name
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert state_bytes(opt, list(model.parameters())) == sum(
        state_bytes(opt, [p]) for p in model.parameters())


def test_loss_falls_like_adam():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        y = teacher(x)
    student = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    losses = {}
    for name, make in (("adam", lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)),
                       ("io_adam", lambda m: IOAdam(m, lr=3e-2))):
        model = copy.deepcopy(student)
        losses[name] = train(model, make(model), (x, y), 100, closure=True)
    for name, history in losses.items():
        assert history[-1] < history[0] / 10, (name, history[0], history[-1])
    assert 0.2 < losses["io_adam"][-1] / losses["adam"][-1] < 5, losses


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(0.9, -0.1)), "betas"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(buffer_size=0), "buffer_size"),
    (dict(buffer_size=2.5), "buffer_size"), (dict(holder_p=1.0), "holder_p"), (dict(holder_p=float("inf")), "holder_p"),
])
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        IOAdam(nn.Linear(3, 2), **kwargs)


def test_registry_builds_it():
    model = Mixed()
    opt = build_optimizer(parse_spec("io_adam:lr=1e-3"), model)
    assert isinstance(opt, IOAdam) and opt.param_groups[0]["lr"] == 1e-3
    inputs, target = mixed_batch(0)
    before = model.fc1.weight.clone()
    lm_loss(model(*inputs), target).backward()
    opt.step()
    assert not torch.equal(before, model.fc1.weight)
    opt = build_optimizer(parse_spec("io_adam:buffer_size=4:holder_p=1.8"), Mixed())
    assert opt.param_groups[0]["buffer_size"] == 4 and opt.param_groups[0]["holder_p"] == 1.8


def test_accumulated_micro_batches_equal_one_batch():
    torch.manual_seed(0)
    whole = Mixed()
    halves = copy.deepcopy(whole)
    inputs, target = mixed_batch(1)
    run_io_adam(whole, inputs, target, lr=1e-2, buffer_size=2)
    opt = IOAdam(halves, lr=1e-2, buffer_size=2)
    for rows in (slice(0, 2), slice(2, 3)):  # mean loss split by row count, like gradient accumulation
        part = lm_loss(halves(inputs[0][rows], inputs[1][rows]), target[rows])
        (part * (rows.stop - rows.start) / 3).backward()
    # The conv feeds every token row, so its grads and the folds both sum exactly over micro-batches.
    opt.step()
    for (name, p), q in zip(whole.named_parameters(), halves.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_which_layers_are_folded_and_remove_hooks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.proj = nn.Linear(6, 6)
            self.wrapped = nn.Linear(6, 6)  # forward replaced by someone else, as accelerate does
            self.wrapped.forward = lambda x: nn.functional.linear(x, self.wrapped.weight, self.wrapped.bias)
            self.out = nn.Linear(6, 10)
            self.out.weight = self.emb.weight  # tied

        def forward(self, ids):
            h = self.emb(ids)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.out(self.wrapped(self.proj(h)))

    net = Net()
    opt = IOAdam(net)
    assert set(opt._transposed) == {net.proj.weight}
    ids = torch.randint(0, 10, (2, 4))
    lm_loss(net(ids), ids).backward()
    assert net.proj.weight.grad is None and net.attn.out_proj.weight.grad is not None
    assert net.wrapped.weight.grad is not None
    opt.step()
    assert set(opt.state[net.proj.weight]) == {"step", "exp_avg", "input_sq", "grad_out_sq"}
    assert set(opt.state[net.attn.out_proj.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(IOAdam.state_roles) >= set(opt.state[net.proj.weight]) | set(opt.state[net.emb.weight])
    opt.remove_hooks()
    opt.zero_grad()
    lm_loss(net(ids), ids).backward()
    assert net.proj.weight.grad is not None
    with pytest.raises(RuntimeError, match="received a .grad"):
        opt.step()


def test_copies_state_dict_and_autocast():
    torch.manual_seed(0)
    model = Mixed()
    inputs, target = mixed_batch(0)
    opt = run_io_adam(model, inputs, target, lr=1e-2, buffer_size=2)
    # A deep copy of a folded model is a plain model: its weights get ordinary gradients.
    twin = copy.deepcopy(model)
    lm_loss(twin(*inputs), target).backward()
    assert twin.fc1.weight.grad is not None and model.fc1.weight.grad is None
    # A state_dict round trip continues exactly like the original.
    twin_opt = IOAdam(twin, lr=1e-2, buffer_size=2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may alias tensors
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        lm_loss(m(*mixed_batch(1)[0]), mixed_batch(1)[1]).backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    # Under bf16 autocast the folds take bf16 output gradients; the state keeps its dtypes.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(model(*inputs).float(), target)
    opt.zero_grad()
    loss.backward()
    before = model.fc2.weight.clone()
    opt.step()
    assert opt.state[model.fc2.weight]["exp_avg"].dtype == torch.float32
    assert opt.state[model.fc2.weight]["input_sq"].dtype == torch.float32
    assert torch.isfinite(model.fc2.weight).all() and not torch.equal(before, model.fc2.weight)


class FrozenIOAdam(IOAdam):
    """IOAdam.step as it was before batching (one folded weight and one AdamW denominator at a
    time), frozen here as the reference the batched step must reproduce up to rounding."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            plain = []
            for p in group["params"]:
                if p in self._transposed:
                    if p in self._folded:
                        self._frozen_folded_update(p, group)
                elif p.grad is not None:
                    plain.append(p)
            self._frozen_adamw_update(plain, group)
        self._folded.clear()

    def _frozen_folded_update(self, p, group):
        from memprof.optim.io_adam import _column_weight_sq_sum

        state = self.state[p]
        state["step"] += 1
        step, lr, eps = state["step"], group["lr"], group["eps"]
        beta1, beta2 = group["betas"]
        hp = group["holder_p"]
        hq = hp / (hp - 1)
        input_sq, grad_out_sq = state["input_sq"], state["grad_out_sq"]
        if hp != 2.0:
            input_sq, grad_out_sq = input_sq.pow(2 / hp), grad_out_sq.pow(2 / hq)
        v = torch.mm(input_sq, grad_out_sq.T) if self._transposed[p] else torch.mm(grad_out_sq, input_sq.T)
        denom = v.div_(_column_weight_sq_sum(step, group["buffer_size"], beta2)).sqrt_().add_(eps)
        p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))

    def _frozen_adamw_update(self, params, group):
        if not params:
            return
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        states = [self._init_state(p, group) for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        for p, state, exp_avg, exp_avg_sq in zip(params, states, exp_avgs, exp_avg_sqs):
            state["step"] += 1
            step = state["step"]
            denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


class Conv1D(nn.Module):
    """GPT-2's layout without transformers: weight (in, out), y = x W + b (folded by name)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Skippy(nn.Module):
    """Embedding, 4-D conv, a transposed Conv1D, Linears of prime sizes, and a layer (`extra`) the
    forward can leave out, so its weight is not folded and its bias gets no grad on that step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(3, 4, 3)
        self.attn = Conv1D(23, 20)
        self.fc = nn.Linear(23, 13)
        self.norm = nn.LayerNorm(13)
        self.extra = nn.Linear(13, 13)
        self.head = nn.Linear(13, 50, bias=False)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        e = self.emb(tokens)
        c = self.conv(image).mean((2, 3))[:, None, :].expand(-1, tokens.shape[1], -1)
        h = self.norm(self.fc(torch.tanh(self.attn(torch.cat([e, c], -1)))))
        if use_extra:
            h = h + self.extra(h)
        return self.head(h)


@pytest.mark.parametrize("dtype,kwargs", [
    (torch.float32, dict(lr=1e-2)),
    (torch.float32, dict(lr=1e-2, buffer_size=3, holder_p=1.5, weight_decay=0.1)),
    (torch.float32, dict(lr=1e-2, holder_p=3.0, weight_decay=0.1)),
    (torch.bfloat16, dict(lr=1e-2, buffer_size=2)),
])
def test_batched_step_matches_frozen_per_parameter_step(dtype, kwargs):
    torch.manual_seed(0)
    model = Skippy().to(dtype)
    twin = copy.deepcopy(model)
    opt, frozen = IOAdam(model, **kwargs), FrozenIOAdam(twin, **kwargs)
    assert model.attn.weight in opt._transposed and opt._transposed[model.attn.weight]
    for step in range(5):
        (tokens, image), target = mixed_batch(step)
        use_extra = step != 2  # `extra` then lags one step behind the others
        for m, o in ((model, opt), (twin, frozen)):
            o.zero_grad()
            lm_loss(m(tokens, image.to(dtype), use_extra).float(), target).backward()
            o.step()
        # bf16: the fused AdamW kernel rounds once from fp32, the frozen step after every op (1 ulp).
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **tol, msg=f"step {step + 1}: {name}")
            for key, value in opt.state[p].items():
                torch.testing.assert_close(value, frozen.state[q][key], **tol, msg=f"step {step + 1}: {name} {key}")
    assert opt.state[model.extra.weight]["step"] == opt.state[model.extra.bias]["step"] == 4
    assert opt.state[model.fc.weight]["step"] == 5


def step_ops(depth: int, **kwargs) -> int:
    """Kernel-launching aten ops (views left out) of one steady-state step on ``depth`` blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(depth)))
    opt = IOAdam(model, **kwargs)
    x = torch.randn(4, 8)
    train(model, opt, (x, torch.zeros(4, 8)), 2)
    opt.zero_grad()
    model(x).square().mean().backward()
    views = {"aten::numpy_T", "aten::t", "aten::transpose", "aten::view", "aten::expand", "aten::as_strided"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name not in views
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


@pytest.mark.parametrize("kwargs,per_weight", [(dict(), 2), (dict(buffer_size=2, weight_decay=0.1), 4)])
def test_step_launches_are_batched(kwargs, per_weight):
    # Each extra block adds one folded weight (per_weight ops: [mm, sqrt_, add_,] addcmul/addcdiv_)
    # and three AdamW tensors (bias, LayerNorm weight and bias), which add no op: one fused call.
    assert step_ops(4, **kwargs) - step_ops(2, **kwargs) == 2 * per_weight
