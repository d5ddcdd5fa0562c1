"""Alada against a plain transcription of the paper's Algorithm 2, plus state bytes and training."""

from __future__ import annotations

import math

import pytest
import torch
from training_for_tests import train

from memprof.optim.alada import Alada
from memprof.optim.protocol import gradient_component, scale_loss
from memprof.optim.registry import build_optimizer, parse_spec

SHAPES = [(13,), (7,), (4, 3, 3, 3), (50, 16)]


def paper_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Eq. 12 written out: j* = argmin_j |k_1...k_j - k_{j+1}...k_tau|; vectors are k x 1."""
    if len(shape) == 1:
        return shape[0], 1
    best_j, best_gap = None, None
    for j in range(1, len(shape)):
        left = 1
        for k in shape[:j]:
            left *= k
        right = 1
        for k in shape[j:]:
            right *= k
        if best_gap is None or abs(left - right) < best_gap:
            best_j, best_gap = j, abs(left - right)
    m = 1
    for k in shape[:best_j]:
        m *= k
    return m, (math.prod(shape)) // m


class PaperAlada:
    """Algorithm 2 line by line on flat Python lists, with an explicit first moment M."""

    def __init__(self, x: list[float], shape: tuple[int, ...], lr: float, beta1: float, beta2: float, eps: float):
        self.x, self.lr, self.beta1, self.beta2, self.eps = list(x), lr, beta1, beta2, eps
        self.m, self.n = paper_matrix_shape(shape)
        self.M = [0.0] * len(x)  # line 1
        self.t = 0

    def step(self, G: list[float]) -> None:
        b1, b2, eps, m, n, t = self.beta1, self.beta2, self.eps, self.m, self.n, self.t
        self.M = [b1 * Mi + (1 - b1) * Gi for Mi, Gi in zip(self.M, G)]  # line 5
        Mt = [Mi / (1 - b1 ** (t + 1)) for Mi in self.M]  # line 6
        V = [x * x for x in Mt]  # line 7
        if t == 0:  # lines 8-12
            self.v0 = sum(g * g for g in G) / (m * n)
            self.p = [math.sqrt(self.v0)] * m
            self.q = [math.sqrt(self.v0)] * n
        p, q = self.p, self.q
        if t % 2 == 0:  # lines 13-15
            qq = sum(x * x for x in q)
            self.p = [b2 * p[i] + (1 - b2) * sum(V[i * n + j] * q[j] for j in range(n)) / (qq + eps) for i in range(m)]
        else:  # lines 16-18
            pp = sum(x * x for x in p)
            self.q = [b2 * q[j] + (1 - b2) * sum(V[i * n + j] * p[i] for i in range(m)) / (pp + eps) for j in range(n)]
        for i in range(m):
            for j in range(n):
                U = self.p[i] * self.q[j]  # line 20
                Ut = (U - b2 ** (t + 1) * self.v0) / (1 - b2 ** (t + 1))  # line 21
                k = i * n + j
                self.x[k] -= self.lr * Mt[k] / math.sqrt(Ut + eps)  # line 22, with M~ (see docs)
        self.t += 1


def objective(xs: list[torch.Tensor], cs: list[torch.Tensor]) -> torch.Tensor:
    """sum(c * x) + sum(x^4) / 4: gradient c + x^3, different every step through c."""
    return sum((c * x).sum() + 0.25 * (x**4).sum() for x, c in zip(xs, cs))


def run_loop(loop: str, steps: int, lr: float, betas: tuple[float, float]) -> tuple[list[list[torch.Tensor]], list[list[float]]]:
    """Train SHAPES with Alada (float64) and with the paper reference; return both trajectories."""
    gen = torch.Generator().manual_seed(0)
    x0 = [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]
    cs = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES] for _ in range(steps)]
    params = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = Alada(params, lr=lr, betas=betas)
    refs = [PaperAlada(x.flatten().tolist(), s, lr, *betas, 1e-16) for x, s in zip(x0, SHAPES)]
    ours, theirs = [], []
    if loop == "listing1":
        for param in params:  # Listing 1, line 5: M_0 = 0 in the grad field
            param.grad = torch.zeros_like(param)
    for k in range(steps):
        if loop == "protocol":
            opt.zero_grad()
            scale_loss(opt, objective(params, cs[k])).backward()
        else:  # Listing 1, lines 8-18, written out without the optimizer's helpers
            with torch.no_grad():
                for param in params:
                    param.grad *= betas[0]
            (objective(params, cs[k]) * (1 - betas[0])).backward()
        opt.step()
        ours.append([param.detach().clone() for param in params])
        for ref, x, c in zip(refs, params, cs[k]):
            xr = torch.tensor(ref.x, dtype=torch.float64)
            ref.step((c.flatten() + xr**3).tolist())
        theirs.append([list(ref.x) for ref in refs])
    return ours, theirs


@pytest.mark.parametrize("loop", ["protocol", "listing1"])
def test_matches_algorithm_2_step_by_step(loop: str) -> None:
    ours, theirs = run_loop(loop, steps=4, lr=0.05, betas=(0.9, 0.9))
    for step, (got_all, want_all) in enumerate(zip(ours, theirs)):
        for shape, got, want in zip(SHAPES, got_all, want_all):
            want = torch.tensor(want, dtype=torch.float64).view(shape)
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (loop, step, shape, (got - want).abs().max())


def test_matches_algorithm_2_with_other_betas() -> None:
    ours, theirs = run_loop("protocol", steps=5, lr=0.02, betas=(0.8, 0.99))
    for got, want in zip(ours[-1], theirs[-1]):
        assert torch.allclose(got.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_first_step_is_row_mean_of_g_squared_in_fp32() -> None:
    # Digest §1.4: U~_1 = rowmean(G_0^2). Row 2's gradients are 1e-4 of the rest: the literal
    # U - beta2 v0 cancels in fp32 there, the implementation must not.
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(6, 5, generator=gen)
    G[2] *= 1e-4
    x = torch.nn.Parameter(torch.zeros(6, 5))
    opt = Alada([x], lr=1.0)
    x.grad = (1 - 0.9) * G  # what backward leaves after zero_grad + scale_loss on step 1
    opt.step()
    want = -G / ((G**2).mean(dim=1, keepdim=True) + 1e-16).sqrt()
    assert torch.allclose(x.detach(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(13,), (7,), (), (4, 3, 3, 3), (50, 16), (1, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_are_4_m_plus_n(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    unused = torch.nn.Parameter(torch.randn(3, 3, dtype=dtype))
    opt = Alada([x, unused])
    x.grad = torch.randn_like(x)
    opt.step()
    storages = {}
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
                assert value.dtype == torch.float32
    m, n = paper_matrix_shape(shape) if shape else (1, 1)
    assert sum(storages.values()) == 4 * (m + n)  # p in R^m, q in R^n, fp32 (digest §2)
    assert unused not in opt.state
    assert set(opt.state[x]) == set(Alada.state_roles)
    reloaded = Alada([x, unused])
    reloaded.load_state_dict(opt.state_dict())
    assert reloaded.state[x]["p_acc"].dtype == torch.float32 and reloaded.state[x]["step"] == 1
    assert torch.equal(reloaded.state[x]["p_acc"], opt.state[x]["p_acc"])  # not rounded through bf16


def test_zero_first_momentum_defers_initialisation() -> None:
    x = torch.nn.Parameter(torch.ones(4, 3))
    opt = Alada([x], lr=0.1)
    x.grad = torch.zeros(4, 3)
    opt.step()
    assert len(opt.state[x]) == 0 and torch.equal(x.detach(), torch.ones(4, 3))
    opt.zero_grad()
    G = torch.arange(12.0).view(4, 3) - 5
    x.grad += (1 - 0.9) * G
    opt.step()
    assert opt.state[x]["step"] == 1
    want = 1 - 0.1 * G / ((G**2).mean(dim=1, keepdim=True) + 1e-16).sqrt()
    assert torch.allclose(x.detach(), want, rtol=1e-6)


def test_state_dict_carries_the_momentum_and_load_puts_it_back_in_grad() -> None:
    # w: initialised; z: zero momentum (initialisation deferred, no state); u: grad None (M = 0)
    w, z, u = (torch.nn.Parameter(torch.ones(4, 3)) for _ in range(3))
    opt = Alada([w, z, u])
    w.grad, z.grad = torch.randn(4, 3), torch.zeros(4, 3)
    opt.step()
    saved = opt.state_dict()["state"]
    assert saved[0]["momentum"] is w.grad and saved[0]["step"] == 1
    assert saved[1].keys() == {"momentum"} and saved[1]["momentum"] is z.grad and 2 not in saved
    assert "momentum" not in opt.state[w] and not opt.state.get(z)

    w2, z2, u2 = (torch.nn.Parameter(torch.ones(4, 3)) for _ in range(3))
    u2.grad = torch.ones(4, 3)  # a stale grad is not the saved momentum (None): load clears it
    again = Alada([w2, z2, u2])
    again.load_state_dict(opt.state_dict())
    assert torch.equal(w2.grad, w.grad) and torch.equal(z2.grad, z.grad) and u2.grad is None
    assert set(again.state[w2]) == set(Alada.state_roles) and not again.state.get(z2)


def test_bf16_weight_decay_is_rounded_once_from_the_exact_factor() -> None:
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.randn(16, 12).to(torch.bfloat16))
    before = x.detach().float()
    opt = Alada([x], lr=0.01, weight_decay=0.3)
    x.grad = torch.zeros_like(x)
    x.grad[:, 0] = 1.0  # elsewhere M = 0: the update is 0 / sqrt(U~ + eps) and only the decay moves W
    opt.step()
    expected = (before * (1.0 - 0.01 * 0.3)).to(torch.bfloat16)
    assert torch.equal(x.detach()[:, 1:], expected[:, 1:])


def test_zero_grad_decays_momentum_and_keeps_none() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    opt = Alada([a, b], betas=(0.8, 0.9))
    a.grad = torch.ones(3)
    opt.zero_grad()
    assert torch.allclose(a.grad, torch.full((3,), 0.8)) and b.grad is None
    assert torch.allclose(opt.scale_loss(torch.tensor(2.0)), torch.tensor(0.4))
    assert gradient_component(opt) == "grad+first_moment"


def test_channels_last_bf16_and_closure() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    G = torch.randn(4, 3, 3, 3)
    dense = torch.nn.Parameter(w.clone())
    strided = torch.nn.Parameter(w.clone().to(memory_format=torch.channels_last))
    half = torch.nn.Parameter(w.to(torch.bfloat16))
    opt = Alada([dense, strided, half], lr=0.01)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum((G * p.float()).sum() for p in (dense, strided, half))
        scale_loss(opt, loss).backward()
        return loss

    for _ in range(3):
        assert torch.is_tensor(opt.step(closure))
    assert torch.allclose(dense, strided, rtol=0, atol=1e-7)
    assert torch.allclose(dense, half.float(), rtol=0, atol=0.02)
    assert not torch.equal(dense.detach(), w)


def _train(make_opt, steps: int = 100) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = torch.sin(x @ torch.randn(8, 1)) + 0.5 * x[:, :1]
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.Tanh(), torch.nn.Linear(24, 1))
    losses = train(model, make_opt(model.parameters()), (x, y), steps)  # Alada's loss scaled, as the runner does
    return losses[0], losses[-1]


def test_trains_like_adam() -> None:
    a0, a_end = _train(lambda ps: Alada(ps, lr=1e-2))
    d0, d_end = _train(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert a_end < a0 / 5 and d_end < d0 / 5, (a0, a_end, d0, d_end)
    assert a_end < 3 * d_end, (a_end, d_end)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.9)}, "beta1"),
        ({"betas": (0.9, -0.1)}, "beta2"),
        ({"eps": -1e-16}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_hyperparameter_raises(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        Alada([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_param_groups_must_share_beta1() -> None:
    opt = Alada([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 0.9))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": (0.9, 0.99)})
    with pytest.raises(ValueError, match="Invalid beta1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": (0.5, 0.9)})


def test_registry_builds_it() -> None:
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(parse_spec("alada:lr=1e-3"), model)
    assert isinstance(opt, Alada) and opt.param_groups[0]["lr"] == 1e-3
    assert opt.param_groups[0]["betas"] == (0.9, 0.9) and opt.param_groups[0]["eps"] == 1e-16
    assert parse_spec("alada").entry.state_roles() == Alada.state_roles


class FrozenAlada(Alada):
    """The per-parameter step that the batched one replaced, frozen as the reference it must match."""

    square_in_fp32 = False  # the frozen step squared bf16 momenta in bf16

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None or param.numel() == 0:
                    continue
                state = self.state[param]
                if len(state) == 0:
                    m, n = paper_matrix_shape(param.shape) if param.dim() else (1, 1)
                    dtype = torch.promote_types(param.dtype, torch.float32)
                    v0 = (torch.linalg.vector_norm(param.grad, dtype=dtype).item() / (1.0 - beta1)) ** 2 / (m * n)
                    if v0 == 0.0:
                        continue
                    state.update(step=0, v0=v0, p_acc=torch.zeros(m, dtype=dtype), q_acc=torch.zeros(n, dtype=dtype))
                self._frozen_update(param, state, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                    weight_decay=group["weight_decay"], square_in_fp32=self.square_in_fp32)
        return loss

    @staticmethod
    def _frozen_update(param, state, *, lr, beta1, beta2, eps, weight_decay, square_in_fp32):
        grad, p_acc, q_acc, t = param.grad, state["p_acc"], state["q_acc"], state["step"]
        root_v0 = math.sqrt(state["v0"])
        bias_correction1 = 1.0 - beta1 ** (t + 1)
        bias_correction2 = 1.0 - beta2 ** (t + 1)
        buf = torch.empty(p_acc.numel(), q_acc.numel(), dtype=p_acc.dtype)
        square = grad.to(buf.dtype) if square_in_fp32 else grad
        torch.mul(square, square, out=buf.view(grad.shape))
        if t % 2 == 0:
            q = q_acc + beta2 ** (t // 2) * root_v0
            p_acc.mul_(beta2).add_(torch.mv(buf, q).div_(q.dot(q) + eps), alpha=(1.0 - beta2) / bias_correction1**2)
        else:
            p = p_acc + beta2 ** ((t + 1) // 2) * root_v0
            q_acc.mul_(beta2).add_(torch.mv(buf.t(), p).div_(p.dot(p) + eps), alpha=(1.0 - beta2) / bias_correction1**2)
        p = p_acc + beta2 ** (t // 2 + 1) * root_v0
        column = p_acc.mul(beta2 ** ((t + 1) // 2) * root_v0).add_(eps * bias_correction2)
        denom = torch.outer(p, q_acc, out=buf).add_(column.unsqueeze(1)).sqrt_()
        if weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        param.addcdiv_(grad, denom.view(param.shape), value=-lr * math.sqrt(bias_correction2) / bias_correction1)
        state["step"] = t + 1


# Repeated shapes batch into one run; (4, 3, 3, 3) once channels_last; (6, 5) deferred (zero first
# gradient); (9, 4) joins at step 2 (grad None before); (3, 3) never gets a grad.
BATCH_SHAPES = [(13,), (13,), (7,), (4, 3, 3, 3), (4, 3, 3, 3), (50, 16), (50, 16), (16, 50), (), (6, 5), (9, 4), (3, 3)]


class FrozenAladaFp32Squares(FrozenAlada):
    square_in_fp32 = True


def run_batched_and_frozen(dtype: torch.dtype, scratch_numel: int, steps: int = 6, frozen: type = FrozenAlada):
    gen = torch.Generator().manual_seed(3)
    x0 = [torch.randn(s, dtype=torch.float64, generator=gen) for s in BATCH_SHAPES]
    x0[9].zero_()
    cs = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in BATCH_SHAPES] for _ in range(steps)]
    cs[0][9].zero_()
    trajectories = []
    for cls in (Alada, frozen):
        xs = [torch.nn.Parameter(x.to(dtype)) for x in x0]
        xs[3] = torch.nn.Parameter(xs[3].detach().to(memory_format=torch.channels_last))
        opt = cls([{"params": xs[:6]}, {"params": xs[6:], "lr": 0.03, "betas": (0.9, 0.95), "weight_decay": 0.1}],
                  lr=0.05)
        if cls is Alada:
            opt.scratch_numel = scratch_numel
        for k in range(steps):
            active = [i for i in range(len(xs) - 1) if i != 10 or k >= 2]
            opt.zero_grad()
            scale_loss(opt, objective([xs[i] for i in active], [cs[k][i].to(dtype) for i in active])).backward()
            opt.step()
        trajectories.append((xs, opt))
    return trajectories


@pytest.mark.parametrize("scratch_numel", [0, 1 << 22])  # 0: chunks of the largest parameter
def test_batched_step_matches_per_parameter_step(scratch_numel: int) -> None:
    (ours, opt), (theirs, ref) = run_batched_and_frozen(torch.float32, scratch_numel)
    assert ours[3].is_contiguous(memory_format=torch.channels_last)
    assert ours[11] not in opt.state and len(opt.state[ours[9]]) == 4
    assert opt.state[ours[9]]["step"] == 5 and opt.state[ours[10]]["step"] == 4 and opt.state[ours[0]]["step"] == 6
    for got, want, shape in zip(ours, theirs, BATCH_SHAPES):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (shape, (got - want).abs().max())
        for key in ("p_acc", "q_acc"):
            if got in opt.state:
                assert torch.allclose(opt.state[got][key], ref.state[want][key], rtol=1e-5, atol=1e-9), (shape, key)
                assert opt.state[got]["v0"] == pytest.approx(ref.state[want]["v0"], rel=1e-6)


def test_batched_step_bf16_differs_only_by_squaring_in_fp32() -> None:
    # The batched step squares bf16 momenta in fp32; the per-parameter one rounded M^2 to bf16 first.
    (ours, _), (theirs, _) = run_batched_and_frozen(torch.bfloat16, 0, steps=3, frozen=FrozenAladaFp32Squares)
    (_, _), (old, _) = run_batched_and_frozen(torch.bfloat16, 0, steps=3)
    for got, want, before, shape in zip(ours, theirs, old, BATCH_SHAPES):
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), want.float(), rtol=2**-8, atol=1e-6), (shape, (got - want).abs().max())
        assert torch.allclose(got.float(), before.float(), rtol=2**-6, atol=1e-3), (shape, (got - before).abs().max())
