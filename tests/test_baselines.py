"""Library baselines: exact state bytes per key against each library's documented layout.

Each formula below is written from the library's source (see docs/baselines.md), per state key,
in terms of the parameter's shape and dtype; the walker's per-storage bytes must match it
exactly, with no key missing or extra and no role inferred.
"""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from torch import nn

from memprof.errors import UsageError
from memprof.measure.state import walk_state
from memprof.optim import adapters
from memprof.optim.registry import build_optimizer, parse_spec, registry

FP32 = 4


def tiny_net() -> nn.Module:
    """Conv (4-D + 1-D), a wide 2-D weight (m < n), a tall one (m > n), and a parameter never used."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 12))
    model.register_parameter("unused", nn.Parameter(torch.ones(3, 3)))  # grad stays None: no state
    return model


def run(spec: str, dtype: torch.dtype, model: nn.Module | None = None, steps: int = 2):
    model = (model or tiny_net()).to(dtype)
    parsed = parse_spec(spec)
    optimizer = build_optimizer(parsed, model)
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Embedding)))
    x = torch.randn(3, 2, 6, 6, dtype=dtype) if isinstance(first, nn.Conv2d) else torch.randint(0, 32, (2, 5))
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).float().square().mean().backward()
        optimizer.step()
    names = {p: n for n, p in model.named_parameters()}
    return model, optimizer, walk_state(optimizer, names, parsed.entry.state_roles())


def measured(state) -> dict[tuple[str, str], int]:
    return {(s.param_name, s.path): s.storage_bytes for s in state}


# Expected layout: for a parameter p (its grad is used), {state path: bytes}.
Layout = Callable[[torch.Tensor], dict[str, int]]


def adam_layout(p: torch.Tensor, amsgrad: bool = False) -> dict[str, int]:
    # torch adam.py _init_group: step is a 0-d fp32 CPU tensor; moments zeros_like(p).
    out = {"step": FP32, "exp_avg": p.numel() * p.element_size(), "exp_avg_sq": p.numel() * p.element_size()}
    if amsgrad:
        out["max_exp_avg_sq"] = p.numel() * p.element_size()
    return out


def torch_adafactor_layout(p: torch.Tensor) -> dict[str, int]:
    # torch _adafactor.py: keepdim row (…, m, 1) and col (…, 1, n) in the grad's dtype; 1-D full.
    b, shape = p.element_size(), p.shape
    if p.dim() > 1:
        return {"step": FP32, "row_var": p.numel() // shape[-1] * b, "col_var": p.numel() // shape[-2] * b}
    return {"step": FP32, "variance": p.numel() * b}


def hf_adafactor_layout(p: torch.Tensor, beta1: bool = False) -> dict[str, int]:
    # transformers optimization.py: grads upcast, so every tensor is fp32; RMS a 0-d fp32 tensor.
    shape = p.shape
    out = {"RMS": FP32}
    if beta1:
        out["exp_avg"] = p.numel() * FP32
    if p.dim() >= 2:
        out["exp_avg_sq_row"] = math.prod(shape[:-1]) * FP32
        out["exp_avg_sq_col"] = math.prod(shape[:-2] + shape[-1:]) * FP32
    else:
        out["exp_avg_sq"] = p.numel() * FP32
    return out


def came_layout(p: torch.Tensor) -> dict[str, int]:
    # pytorch_optimizer came.py: parameter dtype (no upcast); RMS is a 0-d tensor of p's dtype.
    b, shape = p.element_size(), p.shape
    out = {"exp_avg": p.numel() * b, "RMS": b}
    if p.dim() >= 2:
        row, col = math.prod(shape[:-1]) * b, math.prod(shape[:-2] + shape[-1:]) * b
        out |= {"exp_avg_sq_row": row, "exp_avg_sq_col": col, "exp_avg_res_row": row, "exp_avg_res_col": col}
    else:
        out["exp_avg_sq"] = p.numel() * b
    return out


def sm3_layout(p: torch.Tensor) -> dict[str, int]:
    # pytorch_optimizer sm3.py: momentum_buffer always (even momentum=0), one accumulator per axis.
    b = p.element_size()
    return {"momentum_buffer": p.numel() * b, **{f"accumulator_{i}": n * b for i, n in enumerate(p.shape)}}


def galore_layout(p: torch.Tensor, rank: int) -> dict[str, int]:
    # pytorch_optimizer galore.py 'std': m >= n keeps Vh[:r] (r×n) and moments m×r; else U[:, :r]
    # (m×r) and moments r×n. The projector matrix is cloned (no view of the SVD factor).
    b = p.element_size()
    if p.dim() != 2:
        return {"exp_avg": p.numel() * b, "exp_avg_sq": p.numel() * b}
    m, n = p.shape
    r = min(rank, m, n)
    ortho, low = (r * n, m * r) if m >= n else (m * r, r * n)
    return {"projector.ortho_matrix": ortho * b, "exp_avg": low * b, "exp_avg_sq": low * b}


CASES: dict[str, Layout] = {
    "adam": adam_layout,
    "adam:foreach=true": adam_layout,
    "adam:fused=true": adam_layout,
    "adamw:amsgrad=true": lambda p: adam_layout(p, amsgrad=True),
    # torch sgd.py: momentum_buffer = grad.clone() (memprof sets momentum 0.9).
    "sgd": lambda p: {"momentum_buffer": p.numel() * p.element_size()},
    "adafactor": torch_adafactor_layout,
    "hf_adafactor": hf_adafactor_layout,
    "hf_adafactor:beta1=0.9": lambda p: hf_adafactor_layout(p, beta1=True),
    "came": came_layout,
    "sm3": sm3_layout,
    # pytorch_optimizer lion.py: one exp_avg = zeros_like(p).
    "lion": lambda p: {"exp_avg": p.numel() * p.element_size()},
    "galore:rank=3": lambda p: galore_layout(p, rank=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", list(CASES))
def test_state_bytes_match_library_layout(spec: str, dtype: torch.dtype) -> None:
    model, _, state = run(spec, dtype)
    expected = {
        (name, key): nbytes
        for name, p in model.named_parameters()
        if name != "unused"
        for key, nbytes in CASES[spec](p).items()
    }
    assert measured(state) == expected
    assert not any(s.inferred for s in state)
    assert not parse_spec(spec).inferred_roles


def test_galore_projector_counts_as_projection() -> None:
    _, _, state = run("galore:rank=3", torch.float32)
    projection = [s for s in state if s.role == "projection"]
    # Both 2-D weights are projected, the conv kernel and the biases are not.
    assert sorted(s.param_name for s in projection) == ["2.weight", "4.weight"]
    assert all(s.path == "projector.ortho_matrix" for s in projection)


def test_galore_leaves_embeddings_plain() -> None:
    model = nn.Sequential(nn.Embedding(32, 6), nn.Linear(6, 4))
    optimizer = adapters.galore(model, rank=2)
    by_rank = {("rank" in g): [tuple(p.shape) for p in g["params"]] for g in optimizer.param_groups}
    assert by_rank == {False: [(32, 6), (4,)], True: [(4, 6)]}


class TinyAttention(nn.Module):
    """Names Adam-mini's blocks recognise, and a transformers-like config (4 heads, 2 KV heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8, num_attention_heads=4, num_key_value_heads=2)
        self.embed_tokens = nn.Embedding(32, 8)
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.k_proj = nn.Linear(8, 4, bias=False)
        self.o_proj = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        return torch.cat([self.o_proj(self.q_proj(x)), self.k_proj(x)], dim=-1)


def adam_mini_layout(name: str, p: torch.Tensor, dim: int, heads: int) -> dict[str, int]:
    # pytorch_optimizer adam_mini.py: m is fp32 whatever p's dtype. Embeddings keep a full v;
    # q/k keep one v_mean per head (blocks of dim²/heads elements); the rest a 0-d v_mean plus a
    # 0-d fp32 "dimension".
    n = p.numel()
    if "embed" in name:
        return {"m": n * FP32, "v": n * FP32}
    if "q_proj" in name or "k_proj" in name:
        return {"m": n * FP32, "v_mean": n // (dim * dim // heads) * FP32}
    return {"m": n * FP32, "v_mean": FP32, "dimension": FP32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adam_mini_named_blocks_from_config(dtype: torch.dtype) -> None:
    model, optimizer, state = run("adam_mini", dtype, model=TinyAttention())
    assert optimizer.num_embeds == 8 and optimizer.num_heads == 4 and optimizer.num_query_groups == 2
    assert [g["name"] for g in optimizer.param_groups] == [n for n, _ in model.named_parameters()]
    expected = {
        (name, key): nbytes
        for name, p in model.named_parameters()
        for key, nbytes in adam_mini_layout(name, p, dim=8, heads=4).items()
    }
    assert measured(state) == expected
    assert not any(s.inferred for s in state)


def test_adam_mini_explicit_dims_override_config() -> None:
    optimizer = build_optimizer(parse_spec("adam_mini:num_heads=2:num_query_groups=1"), TinyAttention())
    assert (optimizer.num_embeds, optimizer.num_heads, optimizer.num_query_groups) == (8, 2, 1)


@pytest.mark.parametrize(
    ("spec", "foreach", "fused", "name"),
    [
        ("adam", False, False, "single-tensor"),  # CPU: torch's default resolves to single-tensor
        ("adam:foreach=true", True, False, "foreach"),
        ("adamw:fused=true", False, True, "fused"),
        ("sgd:foreach=false", False, False, "single-tensor"),
    ],
)
def test_torch_implementation_is_pinned_and_reported(spec: str, foreach: bool, fused: bool, name: str) -> None:
    optimizer = build_optimizer(parse_spec(spec), tiny_net())
    assert (optimizer.defaults["foreach"], optimizer.defaults["fused"], optimizer.defaults["implementation"]) == (
        foreach, fused, name,
    )
    assert all(g["foreach"] is foreach and g["fused"] is fused for g in optimizer.param_groups)


def test_pinning_follows_torch_rule_on_a_foreach_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where torch's default picks foreach (CUDA), Adam and SGD pin foreach; Adafactor's functional
    # API never defaults to foreach; Adam with a Tensor lr and capturable=False falls back.
    monkeypatch.setattr(adapters, "_default_to_fused_or_foreach", lambda params, differentiable, use_fused: (False, True))
    params = [nn.Parameter(torch.zeros(2))]
    assert adapters.adam(params).defaults["implementation"] == "foreach"
    assert adapters.sgd(params, momentum=0.9).defaults["implementation"] == "foreach"
    assert adapters.adafactor(params).defaults["implementation"] == "single-tensor"
    assert adapters.adamw(params, lr=torch.tensor(1e-3)).defaults["implementation"] == "single-tensor"
    assert adapters.adam(params, fused=False).defaults["implementation"] == "single-tensor"


@pytest.fixture
def tiny_file(tmp_path) -> str:
    path = tmp_path / "tiny.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))\n"
        "    return model, {'input': torch.randn(2, 6), 'labels': torch.tensor([0, 2])}\n"
    )
    return f"{path}:build"


def test_dotted_path_end_to_end_is_flagged_inferred(tiny_file: str) -> None:
    from memprof.api import measure

    radam, adam = measure(tiny_file, "torch.optim.RAdam,adam", device="cpu", steps=2)
    n_params = 6 * 8 + 8 + 8 * 3 + 3
    for record in (radam, adam):
        state = {row.component: row.bytes for row in record.breakdown if row.category == "optimizer_state"}
        assert record.status == "ok"
        assert state == {"moment": 2 * n_params * FP32, "other": 4 * FP32}  # 2 moments + 4 step scalars
    assert radam.inferred_roles and not adam.inferred_roles
    assert adam.hyperparameters["implementation"] == "single-tensor"


def test_dotted_path_into_pytorch_optimizer() -> None:
    spec = parse_spec("pytorch_optimizer.Adalite:lr=1e-3")
    assert spec.inferred_roles and spec.kwargs == {"lr": 1e-3}
    _, _, state = run("pytorch_optimizer.Adalite:lr=1e-3", torch.float32)
    assert state and all(s.inferred for s in state)


USER_OPTIMIZER = """
import torch


class HeavyBall(torch.optim.Optimizer):
    state_roles = {"buf": "moment"}

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                    p.sub_(buf.mul_(0.9).add_(p.grad), alpha=group["lr"])
"""


def test_dotted_path_to_a_users_own_module(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_optimizers_for_memprof.py").write_text(USER_OPTIMIZER)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_spec("my_optimizers_for_memprof.HeavyBall:lr=0.05")
    assert not spec.inferred_roles  # the class declares its roles
    model, optimizer, state = run("my_optimizers_for_memprof.HeavyBall:lr=0.05", torch.float32)
    assert optimizer.defaults["lr"] == 0.05
    assert measured(state) == {(n, "buf"): p.numel() * FP32 for n, p in model.named_parameters() if n != "unused"}
    assert {s.role for s in state} == {"moment"} and not any(s.inferred for s in state)


@pytest.mark.parametrize("path", ["torch.optim.NoSuchOptimizer", "no_such_package_xyz.Opt", "torch.nn.Linear"])
def test_bad_dotted_path_is_a_usage_error(path: str) -> None:
    with pytest.raises(UsageError):
        parse_spec(path)


@pytest.mark.parametrize(("name", "module"), [("adam8bit", "bitsandbytes"), ("ao_adamw8bit", "torchao")])
def test_low_bit_without_library_is_a_usage_error(name: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # not importable, whatever is installed
    spec = parse_spec(name)  # parses: an estimate can still use the documented (analytic) layout
    with pytest.raises(UsageError, match=f"needs {module}.*pip install {module}"):
        spec.entry.load()


def test_low_bit_without_cuda_is_a_usage_error(tiny_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("bitsandbytes.optim")
    fake.Adam8bit = torch.optim.Adam  # importable stand-in: the CUDA check must still refuse
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake)
    from memprof.api import measure

    with pytest.raises(UsageError, match="CUDA"):
        measure(tiny_file, "adam8bit", device="cpu", steps=1)


class Quantized(torch.Tensor):
    """A minimal wrapper subclass laid out like torchao's OptimState8bit: codes, scale, qmap."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32, device=codes.device)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> None:
        self.codes, self.scale, self.qmap = codes, scale, qmap

    def __tensor_flatten__(self):
        return ["codes", "scale", "qmap"], None

    @classmethod
    def __tensor_unflatten__(cls, inner, ctx, outer_size, outer_stride):
        return cls(inner["codes"], inner["scale"], inner["qmap"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_tensor_subclass_state_counts_inner_storages() -> None:
    big, small = torch.zeros(64, 64), torch.zeros(10)

    def q(signed: bool) -> Quantized:
        return Quantized(torch.zeros(64, 64, dtype=torch.uint8), torch.zeros(4096 // 256), torch.zeros(256 if signed else 255))

    state = {
        big: {"step": torch.tensor(1.0), "exp_avg": q(True), "exp_avg_sq": q(False)},
        small: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(10), "exp_avg_sq": torch.zeros(10)},
    }
    walked = walk_state(SimpleNamespace(state=state), {big: "w", small: "b"}, registry()["ao_adamw8bit"].state_roles())
    roles = {(s.param_name, s.path): (s.role, s.storage_bytes) for s in walked}
    assert roles == {
        ("w", "step"): ("other", 4),
        ("w", "exp_avg.codes"): ("quant", 4096),
        ("w", "exp_avg.scale"): ("quant", 16 * FP32),
        ("w", "exp_avg.qmap"): ("quant", 256 * FP32),
        ("w", "exp_avg_sq.codes"): ("quant", 4096),
        ("w", "exp_avg_sq.scale"): ("quant", 16 * FP32),
        ("w", "exp_avg_sq.qmap"): ("quant", 255 * FP32),
        ("b", "step"): ("other", 4),
        ("b", "exp_avg"): ("moment", 10 * FP32),  # below 4096 elements: a plain fp32 moment
        ("b", "exp_avg_sq"): ("moment", 10 * FP32),
    }
    assert not any(s.inferred for s in walked)


def test_bnb_shared_code_books_counted_once() -> None:
    # bitsandbytes Optimizer2State: every 8-bit parameter's qmap1/qmap2 is the same tensor.
    qmap1, qmap2 = torch.zeros(256), torch.zeros(256)
    params = [torch.zeros(8192), torch.zeros(4096)]
    state = {
        p: {
            "step": 2,
            "state1": torch.zeros(p.numel(), dtype=torch.uint8),
            "state2": torch.zeros(p.numel(), dtype=torch.uint8),
            "qmap1": qmap1,
            "qmap2": qmap2,
            "absmax1": torch.zeros(p.numel() // 256),
            "absmax2": torch.zeros(p.numel() // 256),
        }
        for p in params
    }
    walked = walk_state(SimpleNamespace(state=state), {params[0]: "a", params[1]: "b"}, registry()["adam8bit"].state_roles())
    assert {s.role for s in walked} == {"quant"} and not any(s.inferred for s in walked)
    assert sum(s.key.startswith("qmap") for s in walked) == 2  # one per code book, not per parameter
    n = 8192 + 4096
    assert sum(s.storage_bytes for s in walked) == 2 * n + 2 * (n // 256) * FP32 + 2 * 256 * FP32
