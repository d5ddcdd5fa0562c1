"""AdaMeM against a plain transcription of the paper's Algorithms 1–4 (with the digest's fixes)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from memprof.optim.adamem import AdaMeM
from memprof.optim.registry import build_optimizer, parse_spec

BETA1, BETA2, EPS = 0.9, 0.95, 1e-8


def _oriented(t: torch.Tensor) -> torch.Tensor:
    """The paper's m×n matrix with m ≤ n: (shape[0], rest), transposed if shape[0] is longer."""
    mat = t.reshape(t.shape[0], -1)
    return mat.T.contiguous() if mat.shape[0] > mat.shape[1] else mat.contiguous()


def _from_oriented(mat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    rows = shape[0]
    return (mat.T if mat.shape[0] != rows else mat).reshape(shape)


class ReferenceAdaMeM:
    """Algorithm 1 for one matrix, written out with loops: G = −∇, W ← W + η(P N1 + δ N2)."""

    def __init__(self, w: torch.Tensor, rank: int, gap: int, lr: float, wd: float, delta: float) -> None:
        self.shape = w.shape
        self.w = _oriented(w.double())
        self.m, self.n = self.w.shape
        self.r, self.gap, self.lr, self.wd, self.delta = rank, gap, lr, wd, delta
        self.M = torch.zeros(rank, self.n, dtype=torch.float64)  # r×n momentum
        self.R = [0.0] * rank  # Alg 3 row statistic
        self.C = [0.0] * self.n  # Alg 3 column statistic
        self.Cos = [0.0] * self.n  # Alg 4 statistic, per column (the unprojected side)
        self.t = 0

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        self.t += 1
        t, m, n, r = self.t, self.m, self.n, self.r
        grad_mat = _oriented(grad)
        if (t - 1) % self.gap == 0:
            # Singular vectors have arbitrary signs; decomposing the same fp32 matrix as the
            # implementation makes both pick the same ones (the subspace is all the paper fixes).
            self.P = torch.linalg.svd(grad_mat.float(), full_matrices=False)[0][:, :r].double()
        G = -grad_mat.double()  # line 5: negative gradient
        Rt = self.P.T @ G  # Alg 2 output
        S = G - self.P @ Rt  # line 7
        self.M = BETA1 * self.M + (1 - BETA1) * Rt  # line 8
        for i in range(r):  # Alg 3 line 2: (M²) 1_n
            self.R[i] = BETA2 * self.R[i] + (1 - BETA2) * sum(self.M[i, j].item() ** 2 for j in range(n))
        for j in range(n):  # Alg 3 line 3: 1_rᵀ (M²)
            self.C[j] = BETA2 * self.C[j] + (1 - BETA2) * sum(self.M[i, j].item() ** 2 for i in range(r))
        for j in range(n):  # Alg 4, per column: 1_mᵀ (S²)
            self.Cos[j] = BETA2 * self.Cos[j] + (1 - BETA2) * sum(S[i, j].item() ** 2 for i in range(m))
        bc1, bc2 = 1 - BETA1**t, 1 - BETA2**t
        N1 = torch.empty(r, n, dtype=torch.float64)
        for i in range(r):
            for j in range(n):
                v_hat = self.R[i] * self.C[j] / sum(self.R) / bc2  # Alg 3 line 4
                N1[i, j] = (self.M[i, j] / bc1) / (math.sqrt(v_hat) + EPS)
        N2 = torch.empty(m, n, dtype=torch.float64)
        for j in range(n):
            v_hat = self.Cos[j] / m / bc2  # Alg 4 line 4
            for i in range(m):
                N2[i, j] = S[i, j] / (math.sqrt(v_hat) + EPS)
        self.w = self.w * (1 - self.lr * self.wd) + self.lr * (self.P @ N1 + self.delta * N2)  # line 11
        return _from_oriented(self.w, self.shape)


class ReferenceAdafactor:
    """Unprojected parameters: Adafactor without momentum (Alg 3 on G², unfactored for vectors)."""

    def __init__(self, w: torch.Tensor, lr: float, wd: float) -> None:
        self.shape, self.lr, self.wd, self.t = w.shape, lr, wd, 0
        self.w = w.double().reshape(w.shape[0], -1) if w.dim() > 1 else w.double().reshape(1, -1)
        rows, cols = self.w.shape
        self.factored = w.dim() > 1
        self.R, self.C, self.V = [0.0] * rows, [0.0] * cols, [0.0] * cols

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        self.t += 1
        G = -grad.double().reshape(self.w.shape)
        rows, cols = G.shape
        bc2 = 1 - BETA2**self.t
        N = torch.empty_like(G)
        if self.factored:
            for i in range(rows):
                self.R[i] = BETA2 * self.R[i] + (1 - BETA2) * sum(G[i, j].item() ** 2 for j in range(cols))
            for j in range(cols):
                self.C[j] = BETA2 * self.C[j] + (1 - BETA2) * sum(G[i, j].item() ** 2 for i in range(rows))
            for i in range(rows):
                for j in range(cols):
                    N[i, j] = G[i, j] / (math.sqrt(self.R[i] * self.C[j] / sum(self.R) / bc2) + EPS)
        else:
            for j in range(cols):
                self.V[j] = BETA2 * self.V[j] + (1 - BETA2) * G[0, j].item() ** 2
                N[0, j] = G[0, j] / (math.sqrt(self.V[j] / bc2) + EPS)
        self.w = self.w * (1 - self.lr * self.wd) + self.lr * N
        return self.w.reshape(self.shape)


PROJECTED_SHAPES = [(7, 13), (4, 3, 3, 3), (50, 16), (13, 7)]
FULL_RANK_SHAPES = [(7,), (13,), (3, 2)]  # (3, 2): short side 2 ≤ rank 3, so not projected


def test_update_equations_match_the_paper_step_by_step() -> None:
    torch.manual_seed(0)
    lr, wd, delta, rank, gap = 0.1, 0.1, 0.5, 3, 2  # gap 2: refreshes at steps 1, 3, 5
    shapes = PROJECTED_SHAPES + FULL_RANK_SHAPES
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    refs = [ReferenceAdaMeM(p.detach(), rank, gap, lr, wd, delta) for p in params[: len(PROJECTED_SHAPES)]]
    refs += [ReferenceAdafactor(p.detach(), lr, wd) for p in params[len(PROJECTED_SHAPES) :]]
    opt = AdaMeM(params, lr=lr, weight_decay=wd, delta=delta, rank=rank, update_proj_gap=gap)
    for step in range(5):
        expected = []
        for p, ref in zip(params, refs):
            p.grad = torch.randn_like(p)
            expected.append(ref.step(p.grad))
        before = [p.detach().clone() for p in params]
        opt.step()
        for p, ref, b, want in zip(params, refs, before, expected):
            got = p.detach().double()
            assert (got - b.double()).abs().max() > 1e-3, f"{tuple(p.shape)} did not move at step {step + 1}"
            assert torch.allclose(got, want, atol=2e-5, rtol=0), f"{tuple(p.shape)} differs at step {step + 1}"
            if isinstance(ref, ReferenceAdaMeM):
                # The implementation keeps the momentum of +∇; the paper's M is built from G = −∇.
                assert torch.allclose(opt.state[p]["exp_avg"].double(), -ref.M, atol=2e-5, rtol=0)
                assert torch.allclose(opt.state[p]["proj"].double(), ref.P, atol=0, rtol=0)


def test_update_without_residual_lies_in_the_projected_subspace() -> None:
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, 20))
    opt = AdaMeM([p], lr=0.1, weight_decay=0.0, delta=0.0, rank=2)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    P = opt.state[p]["proj"]
    change = p.detach() - before
    assert change.abs().max() > 1e-2
    assert torch.allclose(change - P @ (P.T @ change), torch.zeros_like(change), atol=1e-6)


def _state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    storages = {}
    for value in opt.state[p].values():
        if torch.is_tensor(value):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def _paper_bytes(shape: tuple[int, ...], rank: int, b: int) -> int:
    if len(shape) == 1:
        return b * shape[0]  # unfactored second moment of a vector
    rows, rest = shape[0], math.prod(shape[1:])
    m, n = min(rows, rest), max(rows, rest)
    if rank >= m:
        return b * (rows + rest)  # full-rank Adafactor: m + n
    return b * ((m + n) * rank + rank + 2 * n)  # paper: mr + nr + r + n + n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_equal_the_paper_formula(dtype: torch.dtype) -> None:
    rank = 3
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in PROJECTED_SHAPES + FULL_RANK_SHAPES]
    opt = AdaMeM(params, rank=rank)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        assert all(v.dtype == dtype for v in opt.state[p].values() if torch.is_tensor(v))
        assert _state_bytes(opt, p) == _paper_bytes(tuple(p.shape), rank, torch.finfo(dtype).bits // 8), tuple(p.shape)
    assert set().union(*(opt.state[p] for p in params)) <= set(AdaMeM.state_roles)


def test_params_without_grad_are_skipped_and_closure_is_supported() -> None:
    a, b = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(5))
    opt = AdaMeM([a, b], rank=2)
    b_before = b.detach().clone()

    def closure() -> torch.Tensor:
        loss = (a * torch.linspace(-1, 1, a.numel()).view_as(a)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and a.grad is not None
    assert b not in opt.state and torch.equal(b, b_before)
    assert opt.state[a]["step"] == 1


def _train(make_opt, steps: int = 100) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    teacher = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))  # 227 params
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_loss_falls_like_adam_on_a_tiny_regression() -> None:
    adam_first, adam_last = _train(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    first, last = _train(lambda ps: AdaMeM(ps, lr=1e-2, weight_decay=0.0, rank=2))
    assert adam_last < adam_first / 20
    assert last < first / 20
    assert last < 3 * adam_last


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.95)}, "betas[0]"),
        ({"betas": (0.9, -0.1)}, "betas[1]"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"delta": -1.0}, "delta"),
        ({"full_rank_min_dim": -1}, "full_rank_min_dim"),
    ],
)
def test_bad_hyperparameter_raises_value_error_naming_it(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}:")):
        AdaMeM([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_registry_builds_it() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = build_optimizer(parse_spec("adamem:lr=1e-3"), model)
    assert isinstance(opt, AdaMeM) and opt.defaults["lr"] == 1e-3
    opt = build_optimizer(parse_spec("adamem:rank=2:update_proj_gap=10"), model)
    model(torch.randn(32, 8)).square().mean().backward()
    opt.step()
    assert opt.state[model[0].weight]["proj"].shape == (8, 2)
    assert opt.state[model[1].weight]["exp_avg"].shape == (2, 16)
