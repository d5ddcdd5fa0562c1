"""The baselines of 2026 (Muon family, SOAP, Shampoo, Kron, APOLLO, Fira, AdEMAMix, MARS, ADOPT, SPAM).

Each formula is written from the installed library's source (see docs/baselines.md), per state
key, in terms of the parameter's shape and dtype; the walker's per-storage bytes must match it
exactly, in fp32 and bf16, with no key missing or extra and no role inferred.
"""

from __future__ import annotations

import itertools
import sys
from typing import Callable

import pytest
import torch
from torch import nn

from memprof.errors import UsageError
from memprof.measure.state import walk_state
from memprof.optim import adapters
from memprof.optim.muon_split import MuonWithAdamW
from memprof.optim.registry import build_optimizer, parse_spec

FP32 = 4


class TinyMixed(nn.Module):
    """An embedding, a square, a wide and a tall hidden matrix, a 4-D conv kernel, biases, a norm, a head, an unused matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 6)
        self.square = nn.Linear(6, 6, bias=False)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)
        self.wide = nn.Linear(64, 12)  # weight 12×64: m < n
        self.tall = nn.Linear(12, 20)  # weight 20×12: m > n
        self.norm = nn.LayerNorm(20)
        self.head = nn.Linear(20, 10)
        self.unused = nn.Parameter(torch.ones(3, 3))  # its grad stays None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.square(self.embed(ids)).transpose(1, 2).reshape(ids.shape[0], 6, 4, 4)
        x = torch.relu(self.wide(self.conv(x).flatten(1)))
        return self.head(self.norm(self.tall(x)))


def run(spec: str, dtype: torch.dtype, steps: int = 2):
    model = TinyMixed().to(dtype)
    parsed = parse_spec(spec)
    optimizer = build_optimizer(parsed, model)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids).float().square().mean().backward()
        optimizer.step()
    names = {p: n for n, p in model.named_parameters()}
    return model, optimizer, walk_state(optimizer, names, parsed.entry.state_roles())


def full(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


# Muon's split of TinyMixed: the hidden matrices (and the unused 2-D one) to Muon; the embedding,
# the conv kernel, 1-D parameters and the head (the last nn.Linear) to AdamW.
HIDDEN = {"square.weight", "wide.weight", "tall.weight", "unused"}
# GaLore/Fira/APOLLO project every 2-D weight but embeddings (a model without
# get_output_embeddings has no declared head, so `head.weight` is projected).
PROJECTED = {"square.weight", "wide.weight", "tall.weight", "head.weight", "unused"}


def adamw_layout(p: torch.Tensor) -> dict[str, int]:
    # torch adam.py: a 0-d fp32 CPU step, exp_avg and exp_avg_sq zeros_like(p).
    return {"step": FP32, "exp_avg": full(p), "exp_avg_sq": full(p)}


def muon_family(hidden: Callable[[torch.Tensor], dict[str, int]]) -> Callable[[str, torch.Tensor], dict[str, int]]:
    return lambda name, p: hidden(p) if name in HIDDEN else adamw_layout(p)


def soap_layout(p: torch.Tensor, max_dim: int = 10000, precondition_1d: bool = False) -> dict[str, int]:
    # soap.py: exp_avg, exp_avg_sq zeros_like(grad); GG[i] a zeros(d, d) per axis in the grad's dtype,
    # [] for an axis above max_precondition_dim and for 1-D unless precondition_1d; Q[i] the
    # flipped eigh eigenvectors of GG[i], same shape and dtype.
    out = {"exp_avg": full(p), "exp_avg_sq": full(p)}
    if p.dim() == 1 and not precondition_1d:
        return out
    for i, d in enumerate(p.shape):
        if d <= max_dim:
            out[f"GG[{i}]"] = out[f"Q[{i}]"] = d * d * p.element_size()
    return out


def _merge_small_dims(shape: list[int], max_dim: int) -> list[int]:
    # utils/shape.py: adjacent dims are multiplied together while the product stays <= max_dim.
    merged, product = [], 1
    for d in shape:
        product *= d
        if product > max_dim:
            merged.append(product // d)
            product = d
    merged.append(product)
    return merged if len(merged) > 1 else [1]


def _block_sizes(d: int, block: int) -> list[int]:
    # utils/partition.py BlockPartitioner: d split into blocks of `block`, the remainder last.
    if block >= d:
        return [d]
    n = (d - 1) // block
    return [block] * n + [d - n * block]


def scalable_shampoo_layout(p: torch.Tensor, block: int = 512, max_dim: int = 8192, adagrad: bool = False) -> dict[str, int]:
    # shampoo.py ScalableShampoo + utils/preconditioner.py: momentum and the graft's momentum
    # zeros_like(p) (an AdaGrad graft adds its statistics); after merging small dims, every block
    # of the merged shape gets a d×d fp32 statistic and inverse root per axis, stacked into one
    # tensor each when all are the same size; none for a 1-D merged shape or a dim above max_dim.
    out = {"momentum": full(p), "graft.momentum": full(p)}
    if adagrad:
        out["graft.statistics"] = full(p)
    merged = _merge_small_dims(list(p.shape), block)
    if len(merged) < 2 or any(d > max_dim for d in p.shape):
        return out
    dims = [d for sizes in itertools.product(*(_block_sizes(d, block) for d in merged)) for d in sizes]
    for key in ("statistics", "pre_conditioners"):
        if len(set(dims)) == 1:
            out[f"pre_conditioner.{key}"] = len(dims) * dims[0] ** 2 * FP32
        else:
            out |= {f"pre_conditioner.{key}[{i}]": d * d * FP32 for i, d in enumerate(dims)}
    return out


def dense_shampoo_layout(p: torch.Tensor) -> dict[str, int]:
    # shampoo.py Shampoo: pre_cond_i and inv_pre_cond_i d×d in the grad's dtype for every axis
    # (1-D too); momentum_buffer is re-bound to the preconditioned grad every step, so it exists
    # even with momentum=0.
    b = p.element_size()
    out = {"momentum_buffer": full(p)}
    for i, d in enumerate(p.shape):
        out[f"pre_cond_{i}"] = out[f"inv_pre_cond_{i}"] = d * d * b
    return out


def kron_layout(p: torch.Tensor, max_size: int = 8192, one_diag: bool = False) -> dict[str, int]:
    # psgd.py initialize_q_expressions: Q[i] fp32 (precondition_dtype), a vector of d for a 1-D
    # tensor, an axis of 1, an axis above max_size_triangular or, under one_diag, the largest axis
    # (the last of equals: numpy's argsort reversed); otherwise a d×d (upper-triangular) matrix.
    # momentum_buffer zeros_like(p).
    shape = list(p.shape)
    largest = max(range(len(shape)), key=lambda i: (shape[i], i))
    out = {"momentum_buffer": full(p)}
    for i, d in enumerate(shape):
        diagonal = d == 1 or d > max_size or p.dim() < 2 or (one_diag and i == largest)
        out[f"Q[{i}]"] = (d if diagonal else d * d) * FP32
    return out


def apollo_layout(name: str, p: torch.Tensor, rank: int) -> dict[str, int]:
    # apollo.py + utils/galore.py, from_random_matrix: u (m×rank) and vh (rank×n) are drawn at the
    # full `rank`, not capped at min(m, n). m >= n keeps vh (rank×n) and moments m×rank, else u
    # (m×rank) and moments rank×n, in p's dtype; scaling_grad is a 0-d norm in p's dtype.
    if name not in PROJECTED:
        return {"exp_avg": full(p), "exp_avg_sq": full(p)}
    b, (m, n) = p.element_size(), p.shape
    ortho, low = (rank * n, m * rank) if m >= n else (m * rank, rank * n)
    return {"projector.ortho_matrix": ortho * b, "exp_avg": low * b, "exp_avg_sq": low * b, "scaling_grad": b}


def fira_layout(name: str, p: torch.Tensor, rank: int) -> dict[str, int]:
    # fira.py + utils/galore.py: the SVD basis is cut at r = min(rank, m, n) and cloned (4.x).
    if name not in PROJECTED:
        return {"exp_avg": full(p), "exp_avg_sq": full(p)}
    b, (m, n) = p.element_size(), p.shape
    r = min(rank, m, n)
    ortho, low = (r * n, m * r) if m >= n else (m * r, r * n)
    return {"projector.ortho_matrix": ortho * b, "exp_avg": low * b, "exp_avg_sq": low * b, "scaling_grad": b}


def spam_layout(p: torch.Tensor, density: float = 1.0) -> dict[str, int]:
    # spam.py: a 2-D parameter has a bool mask (one byte per element) with int(density·N) True
    # entries, and moments of the masked grad (that many elements); others full moments.
    if p.dim() != 2:
        return {"exp_avg": full(p), "exp_avg_sq": full(p)}
    kept = int(density * p.numel()) * p.element_size()
    return {"mask": p.numel(), "exp_avg": kept, "exp_avg_sq": kept}


Layout = Callable[[str, torch.Tensor], dict[str, int]]

CASES: dict[str, Layout] = {
    # torch _muon.py: momentum_buffer zeros_like(grad).
    "muon": muon_family(lambda p: {"momentum_buffer": full(p)}),
    # muon/adamuon.py: m zeros_like(p), v zeros_like(p.flatten()).
    "adamuon": muon_family(lambda p: {"m": full(p), "v": full(p)}),
    # muon/normuon.py: momentum_buffer zeros_like(p), second_momentum_buffer (rows, 1).
    "normuon": muon_family(lambda p: {"momentum_buffer": full(p), "second_momentum_buffer": p.shape[0] * p.element_size()}),
    "soap": lambda name, p: soap_layout(p),
    "soap:max_precondition_dim=16:precondition_1d=true": lambda name, p: soap_layout(p, 16, True),
    "shampoo": lambda name, p: scalable_shampoo_layout(p),
    "shampoo:block_size=8:no_preconditioning_for_layers_with_dim_gt=40:graft_type=2":
        lambda name, p: scalable_shampoo_layout(p, block=8, max_dim=40, adagrad=True),
    "shampoo_dense": lambda name, p: dense_shampoo_layout(p),
    "kron": lambda name, p: kron_layout(p),
    "kron:max_size_triangular=16:memory_save_mode=one_diag": lambda name, p: kron_layout(p, 16, one_diag=True),
    "apollo:rank=3": lambda name, p: apollo_layout(name, p, 3),
    "apollo:rank=16": lambda name, p: apollo_layout(name, p, 16),
    "apollo_mini": lambda name, p: apollo_layout(name, p, 1),
    "fira:rank=3": lambda name, p: fira_layout(name, p, 3),
    "fira:rank=16": lambda name, p: fira_layout(name, p, 16),
    # ademamix.py: exp_avg, exp_avg_sq, exp_avg_slow zeros_like(p).
    "ademamix": lambda name, p: {"exp_avg": full(p), "exp_avg_sq": full(p), "exp_avg_slow": full(p)},
    # mars.py: exp_avg, exp_avg_sq, last_grad zeros_like(p); ams_bound adds max_exp_avg_sq.
    "mars": lambda name, p: {"exp_avg": full(p), "exp_avg_sq": full(p), "last_grad": full(p)},
    "mars:ams_bound=true": lambda name, p: {
        "exp_avg": full(p), "exp_avg_sq": full(p), "last_grad": full(p), "max_exp_avg_sq": full(p),
    },
    # adopt.py: exp_avg, exp_avg_sq zeros_like(p).
    "adopt": lambda name, p: {"exp_avg": full(p), "exp_avg_sq": full(p)},
    "spam": lambda name, p: spam_layout(p),
    "spam:density=0.5": lambda name, p: spam_layout(p, 0.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", list(CASES))
def test_state_bytes_match_library_layout(spec: str, dtype: torch.dtype) -> None:
    model, _, state = run(spec, dtype)
    expected = {
        (name, key): nbytes
        for name, p in model.named_parameters()
        if name != "unused"
        for key, nbytes in CASES[spec](name, p).items()
    }
    if spec.startswith("spam"):  # SPAM masks every 2-D parameter at construction, used or not
        expected[("unused", "mask")] = 9
    assert {(s.param_name, s.path): s.storage_bytes for s in state} == expected
    assert not any(s.inferred for s in state)
    assert not parse_spec(spec).inferred_roles


def test_preconditioner_role_is_declared() -> None:
    for spec, keys in (("soap", {"GG", "Q"}), ("kron", {"Q"}), ("shampoo:block_size=8", {"pre_conditioner"}),
                       ("shampoo_dense", {"pre_cond_0", "inv_pre_cond_0", "pre_cond_1", "inv_pre_cond_1"})):
        _, _, state = run(spec, torch.float32)
        assert {s.key for s in state if s.role == "preconditioner"} >= keys


def test_muon_split_is_recorded() -> None:
    model, optimizer, state = run("muon", torch.float32)
    names = [n for n, _ in model.named_parameters()]
    assert isinstance(optimizer, MuonWithAdamW)
    assert optimizer.param_split == {n: "muon" if n in HIDDEN else "adamw" for n in names}
    assert optimizer.defaults["muon_params"] == [n for n in names if n in HIDDEN]
    assert optimizer.defaults["adamw_params"] == [n for n in names if n not in HIDDEN]
    assert optimizer.defaults["muon_library"] == "torch.optim"
    assert isinstance(optimizer.parts["muon"], torch.optim.Muon)
    assert {s.param_name for s in state if s.key == "momentum_buffer"} == HIDDEN - {"unused"}


def test_muon_split_on_gpt2_keeps_embeddings_and_head_on_adamw() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16))
    split = adapters.muon_split(model)
    assert {n for n, side in split.items() if side == "muon"} == {
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
    }
    assert split["transformer.wte.weight"] == split["transformer.wpe.weight"] == "adamw"  # wte is the tied head


def test_muon_composite_behaves_as_one_optimizer() -> None:
    model, optimizer, _ = run("muon", torch.float32)
    # A scheduler reaches both parts through the shared group dicts.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.parts["muon"].param_groups] == [0.5e-3]
    assert [g["lr"] for g in optimizer.parts["adamw"].param_groups] == [1.5e-4]
    saved = optimizer.state_dict()
    fresh = build_optimizer(parse_spec("muon"), model)
    fresh.load_state_dict(saved)
    assert fresh.param_groups == [g for part in fresh.parts.values() for g in part.param_groups]
    assert torch.equal(fresh.state[model.wide.weight]["momentum_buffer"], optimizer.state[model.wide.weight]["momentum_buffer"])
    assert len(fresh.state) == len(optimizer.state) == len(list(model.parameters())) - 1  # all but unused


def test_muon_without_torch_muon_uses_pytorch_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_optimizer

    monkeypatch.delattr(torch.optim, "Muon")
    model, optimizer, state = run("muon:adjust_lr_fn=match_rms_adamw", torch.float32)
    assert isinstance(optimizer.parts["muon"], pytorch_optimizer.Muon)
    assert optimizer.parts["muon"].param_groups[0]["use_adjusted_lr"] is True
    assert optimizer.defaults["muon_library"] == "pytorch_optimizer"
    expected = {(n, k): b for n, p in model.named_parameters() if n != "unused" for k, b in CASES["muon"](n, p).items()}
    assert {(s.param_name, s.path): s.storage_bytes for s in state} == expected
    with pytest.raises(UsageError, match="torch.optim.Muon"):
        build_optimizer(parse_spec("muon:adjust_lr_fn=spectral_unclamped"), TinyMixed())


def test_run_record_says_where_parameters_went(tmp_path) -> None:
    from memprof.api import measure

    path = tmp_path / "tiny_mlp.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))\n"
        "    return model, {'input': torch.randn(2, 6), 'labels': torch.tensor([0, 2])}\n"
    )
    (record,) = measure(f"{path}:build", "muon", device="cpu", steps=1)
    assert record.status == "ok" and not record.inferred_roles
    assert record.hyperparameters["muon_params"] == ["0.weight", "2.weight"]
    assert record.hyperparameters["adamw_params"] == ["0.bias", "2.bias", "4.weight", "4.bias"]
    state = {row.component for row in record.breakdown if row.category == "optimizer_state"}
    assert state == {"moment", "other"}


@pytest.mark.parametrize("name", ["soap", "shampoo", "kron", "ademamix", "mars", "adopt", "spam",
                                  "apollo", "apollo_mini", "fira", "adamuon", "normuon"])
def test_missing_pytorch_optimizer_is_one_line(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # not importable, whatever is installed
    with pytest.raises(UsageError, match=r"needs pytorch_optimizer.*pip install pytorch-optimizer"):
        build_optimizer(parse_spec(name), TinyMixed())


def test_ao_fp8_without_torchao_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(UsageError, match="needs torchao"):  # building it (an estimate uses the analytic layout)
        build_optimizer(parse_spec("ao_adamw_fp8"), TinyMixed())


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("soap:max_precondition_dims=16", "unknown hyperparameter 'max_precondition_dims'"),  # **kwargs would drop it
        ("adopt:cautious=true", "unknown hyperparameter 'cautious'"),
        ("kron:memory_save_mode=half", "memory_save_mode must be one of"),  # the library checks at step time
        ("shampoo:graft_type=7", "graft_type must be one of"),  # the library silently drops the graft
        ("soap:data_format=nhwc", "data_format must be one of"),
        ("apollo:scale_type=row", "scale_type must be 'channel' or 'tensor'"),
        ("muon:momentum=-1", "momentum"),
    ],
)
def test_bad_hyperparameter_is_one_line(spec: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        build_optimizer(parse_spec(spec), TinyMixed())


def test_kron_without_opt_einsum_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without opt_einsum torch.einsum contracts left to right: GPT-2's embedding would build 50257×768×768.
    monkeypatch.setattr(torch.backends.opt_einsum, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"needs opt_einsum.*pip install opt-einsum"):
        build_optimizer(parse_spec("kron"), TinyMixed())
