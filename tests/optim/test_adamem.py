"""AdaMeM against a plain transcription of the paper's Algorithms 1–4 (with the digest's fixes)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from training_for_tests import train

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
    losses = train(model, make_opt(model.parameters()), (x, y), steps)
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


class UnbatchedAdaMeM(AdaMeM):
    """Frozen copy of the per-parameter step (commit d0ab4ce), the reference for the batched one."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta2 = group["betas"][1]
            vec = ([], [], [], [])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, group)
                state["step"] += 1
                if "proj" in state:
                    self._old_projected(p, state, group)
                elif "exp_avg_sq_row" in state:
                    self._old_factored(p, state, group)
                else:
                    for lst, item in zip(vec, (p, p.grad, state["exp_avg_sq"], 1.0 - beta2 ** state["step"])):
                        lst.append(item)
            if vec[0]:
                params, grads, sqs, bc2 = vec
                torch._foreach_lerp_(sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
                denoms = torch._foreach_div(sqs, bc2)
                torch._foreach_sqrt_(denoms)
                torch._foreach_add_(denoms, group["eps"])
                if group["weight_decay"] != 0:
                    torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
                torch._foreach_addcdiv_(params, grads, denoms, -group["lr"])

    @staticmethod
    def _old_denominator(row, col, bc2, eps, out):
        total = row.sum().clamp_(min=torch.finfo(row.dtype).tiny)
        torch.outer(row, col, out=out)
        return out.div_(total * bc2).sqrt_().add_(eps)

    def _old_projected(self, p, state, group):
        beta1, beta2 = group["betas"]
        lr, eps, t = group["lr"], group["eps"], state["step"]
        grad = self._wide(p.grad.contiguous())
        proj, exp_avg = state["proj"], state["exp_avg"]
        row, col, os_col = state["exp_avg_sq_row"], state["exp_avg_sq_col"], state["os_exp_avg_sq_col"]
        if (t - 1) % group["update_proj_gap"] == 0:
            proj.copy_(torch.linalg.svd(grad.float(), full_matrices=False)[0][:, : proj.shape[1]])
        low = torch.mm(proj.T, grad)
        residual = torch.addmm(grad, proj, low, alpha=-1.0)
        exp_avg.lerp_(low, 1.0 - beta1)
        row.lerp_(torch.linalg.vector_norm(exp_avg, dim=1).square_(), 1.0 - beta2)
        col.lerp_(torch.linalg.vector_norm(exp_avg, dim=0).square_(), 1.0 - beta2)
        os_col.lerp_(torch.linalg.vector_norm(residual, dim=0).square_(), 1.0 - beta2)
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        n1 = self._old_denominator(row, col, bc2, eps, out=low)
        n1.reciprocal_().mul_(exp_avg)
        os_denom = os_col.div(residual.shape[0] * bc2).sqrt_().add_(eps)
        residual.mul_(os_denom.reciprocal_().mul_(group["delta"]))
        update = residual.addmm_(proj, n1, alpha=1.0 / bc1)
        if group["weight_decay"] != 0:
            p.mul_(1.0 - lr * group["weight_decay"])
        self._wide(p).add_(update, alpha=-lr)

    def _old_factored(self, p, state, group):
        beta2 = group["betas"][1]
        grad = p.grad.reshape(p.shape[0], -1)
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.lerp_(torch.linalg.vector_norm(grad, dim=1).square_(), 1.0 - beta2)
        col.lerp_(torch.linalg.vector_norm(grad, dim=0).square_(), 1.0 - beta2)
        denom = self._old_denominator(row, col, 1.0 - beta2 ** state["step"], group["eps"], torch.empty_like(grad))
        if group["weight_decay"] != 0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.view(p.shape[0], -1).addcdiv_(grad, denom, value=-group["lr"])


# Repeated shapes (wide and tall) so matrices are batched; in each group the largest matrix sets
# the batch budget: 40×90 lets the three 9×30 run as one batch, 9×10 splits the four 4×10 in two.
BATCHED_SHAPES = [(9, 30), (30, 9), (9, 30), (30, 9), (9, 30), (6, 3, 2, 2), (6, 3, 2, 2), (40, 90), (12,), (30,)]
FACTORED_SHAPES = [(5, 7), (7, 5), (8, 9)]  # in a rank=None group: factored Adafactor, (5,7)+(7,5) batched
SPLIT_SHAPES = [(4, 10), (4, 10), (4, 10), (4, 10), (9, 10)]


def test_batches_hold_at_most_the_budget() -> None:
    params = [torch.zeros(s) for s in SPLIT_SHAPES]
    assert [len(b) for b in AdaMeM._batches(params, 90)] == [2, 2, 1]
    assert [len(b) for b in AdaMeM._batches(params, 10)] == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_step_matches_the_unbatched_per_parameter_step(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    shapes = BATCHED_SHAPES + FACTORED_SHAPES + SPLIT_SHAPES
    start = [torch.randn(s).to(dtype) for s in shapes]
    made = [[torch.nn.Parameter(w.clone()) for w in start] for _ in range(2)]
    opts = []
    for cls, params in zip((AdaMeM, UnbatchedAdaMeM), made):
        a, b = len(BATCHED_SHAPES), len(BATCHED_SHAPES) + len(FACTORED_SHAPES)
        groups = [{"params": params[:a]}, {"params": params[a:b], "rank": None}, {"params": params[b:]}]
        opts.append(cls(groups, lr=0.05, weight_decay=0.1, delta=0.7, rank=2, update_proj_gap=3))
    for step in range(7):
        grads = [torch.randn(s).to(dtype) for s in shapes]
        for params in made:
            for i, (p, g) in enumerate(zip(params, grads)):
                # Parameter 1 skips steps 2 and 3, so its step count lags: a batch of its own.
                p.grad = None if (i == 1 and step in (1, 2)) else g.clone()
        for opt in opts:
            opt.step()
        # fp32: the whole run agrees to round-off. bf16: each step, from the same state, agrees to
        # about two bf16 ulps (the steps round in different places); then the reference is re-synced.
        atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2**-6)
        for fast, slow in zip(*made):
            assert torch.allclose(fast.float(), slow.float(), atol=atol, rtol=rtol), (tuple(fast.shape), step)
            for key, value in opts[1].state[slow].items():
                got = opts[0].state[fast][key]
                if key == "step":
                    assert got == value
                else:
                    assert torch.allclose(got.float(), value.float(), atol=atol, rtol=rtol), (key, step)
                    if dtype == torch.bfloat16:
                        value.copy_(got)
            if dtype == torch.bfloat16:
                slow.detach().copy_(fast)


def test_steady_state_step_never_reads_a_tensor_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s)) for s in BATCHED_SHAPES + FACTORED_SHAPES]
    groups = [{"params": params[: len(BATCHED_SHAPES)]}, {"params": params[len(BATCHED_SHAPES) :], "rank": None}]
    opt = AdaMeM(groups, rank=2, update_proj_gap=5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the SVD refresh at step 1 may sync; steps 2..5 must not

    def sync(*args: object) -> None:
        raise AssertionError("host-device sync in the step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    opt.step()
    monkeypatch.undo()
    assert all(opt.state[p]["step"] == 2 for p in params)


class TinyLM(torch.nn.Module):
    """Embedding, two blocks and a head, named like GPT-2 (``wte``, ``h.<i>``, ``lm_head``)."""

    def __init__(self, blocks: int = 11) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(40, 8)
        self.h = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(blocks))
        self.lm_head = torch.nn.Linear(8, 40, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.h:
            x = torch.tanh(block(x))
        return self.lm_head(x)


def _step_once(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.arange(12).view(3, 4)).square().mean().backward()
    opt.step()


FULL = {"exp_avg_sq_row", "exp_avg_sq_col"}
PROJECTED = {"proj", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "os_exp_avg_sq_col"}


@pytest.mark.parametrize(
    ("full_rank", "full_names"),
    [
        (("wte", "lm_head"), {"wte.weight", "lm_head.weight"}),
        ("wte", {"wte.weight"}),  # a lone string is one pattern
        (["h.1"], {"h.1.weight", "h.1.bias"}),  # whole name parts: "h.1" is not a prefix of "h.10"
        (("h.1*.weight",), {"h.1.weight", "h.10.weight"}),  # fnmatch within a part
        (("lm_head", "no_such_layer"), {"lm_head.weight"}),  # GPT-2 ties lm_head to wte: may match nothing
    ],
)
def test_full_rank_names_select_the_parameters_that_stay_full_rank(full_rank, full_names: set[str]) -> None:
    torch.manual_seed(4)
    model = TinyLM()
    opt = AdaMeM(model.named_parameters(), rank=2, full_rank=full_rank)
    _step_once(model, opt)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert set(opt.state[p]) == {"step", "exp_avg_sq"}, name
        else:
            assert set(opt.state[p]) == {"step"} | (FULL if name in full_names else PROJECTED), name
    # Matched names go to a rank=None copy of the group; every group keeps torch's param_names.
    assert [g["rank"] for g in opt.param_groups] == [2, None]
    assert set(opt.param_groups[1]["param_names"]) == full_names
    by_name = dict(model.named_parameters())
    for group in opt.param_groups:
        assert all(by_name[n] is p for n, p in zip(group["param_names"], group["params"], strict=True))


def test_full_rank_matches_the_same_optimizer_with_a_rank_none_group() -> None:
    torch.manual_seed(5)
    models = [TinyLM(blocks=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    named = AdaMeM(models[0].named_parameters(), lr=0.05, rank=2, full_rank=("wte", "lm_head"))
    full = [models[1].wte.weight, models[1].lm_head.weight]
    rest = [p for p in models[1].parameters() if all(p is not q for q in full)]
    grouped = AdaMeM([{"params": rest}, {"params": full, "rank": None}], lr=0.05, rank=2)
    for _ in range(3):
        for model, opt in zip(models, (named, grouped)):
            opt.zero_grad()
            _step_once(model, opt)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(models[0].wte.weight, TinyLM(blocks=2).wte.weight)


def test_named_parameters_without_full_rank_change_nothing_and_state_dict_round_trips() -> None:
    torch.manual_seed(6)
    models = [TinyLM(blocks=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [AdaMeM(models[0].named_parameters(), rank=2), AdaMeM(models[1].parameters(), rank=2)]
    for model, opt in zip(models, opts):
        _step_once(model, opt)
    assert len(opts[0].param_groups) == 1 and opts[0].param_groups[0]["param_names"][0] == "wte.weight"
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    again = AdaMeM(TinyLM(blocks=2).named_parameters(), rank=2)
    again.load_state_dict(opts[0].state_dict())
    assert again.param_groups[0]["param_names"] == opts[0].param_groups[0]["param_names"]


def test_registry_passes_names_so_the_command_line_can_choose_full_rank_layers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = build_optimizer(parse_spec('adamem:rank=2:full_rank=("0.weight",)'), model)
    model(torch.randn(32, 8)).square().mean().backward()
    opt.step()
    assert set(opt.state[model[0].weight]) == {"step"} | FULL
    assert set(opt.state[model[1].weight]) == {"step"} | PROJECTED
    opt = build_optimizer(parse_spec("adamem:rank=2:full_rank=1.weight"), model)  # a bare string
    assert opt.param_groups[1]["param_names"] == ["1.weight"]


@pytest.mark.parametrize(
    ("full_rank", "params"),
    [
        (3, "named"),
        ((b"wte",), "named"),
        (("wte.",), "named"),  # empty name part
        (("no_such_layer",), "named"),  # selects nothing: a typo
        (("wte",), "plain"),  # names are needed to match
    ],
)
def test_bad_full_rank_raises_value_error_naming_it(full_rank, params: str) -> None:
    model = TinyLM(blocks=1)
    given = model.named_parameters() if params == "named" else model.parameters()
    with pytest.raises(ValueError, match="Invalid full_rank:"):
        AdaMeM(given, full_rank=full_rank)


def test_registry_reports_bad_full_rank_as_usage_error() -> None:
    from memprof.errors import UsageError

    with pytest.raises(UsageError, match="full_rank"):
        build_optimizer(parse_spec("adamem:full_rank=7"), torch.nn.Linear(4, 4))
