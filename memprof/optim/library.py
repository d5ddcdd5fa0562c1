"""Optimizers taken from well-kept libraries (the baselines papers compare against), with the roles of their state keys.

Roles are keyed by the key in ``optimizer.state[p]`` (or by ``key.attribute`` for the inner
tensors of a tensor-subclass state, such as torchao's quantized moments). docs/baselines.md
lists every entry's layout, dtype rules and memprof's default overrides.
"""

from __future__ import annotations

from memprof.optim.entry import OptimizerEntry
from memprof.taxonomy import Role

_ADAM_ROLES: dict[str, Role] = {"exp_avg": "moment", "exp_avg_sq": "moment", "max_exp_avg_sq": "moment", "step": "other"}

# Adafactor-family names: *_row / *_col are the factored second moment, *_sq the full one (1-D).
_HF_ADAFACTOR_ROLES: dict[str, Role] = {
    "exp_avg": "moment",
    "exp_avg_sq": "moment",
    "exp_avg_sq_row": "factor",
    "exp_avg_sq_col": "factor",
    "RMS": "other",
    "step": "other",
}

_CAME_ROLES: dict[str, Role] = {
    **_HF_ADAFACTOR_ROLES,
    "exp_avg_res_row": "factor",
    "exp_avg_res_col": "factor",
    "exp_avg_sq_hat": "moment",
}

# SM3 keeps one accumulator per tensor axis (accumulator_0 … accumulator_{ndim-1}).
_SM3_ROLES: dict[str, Role] = {"momentum_buffer": "moment", **{f"accumulator_{i}": "factor" for i in range(8)}}

# bitsandbytes: state1/state2 are uint8 codes (fp32 below min_8bit_size elements), absmax*/max*
# the block scales, qmap1/qmap2 the code books shared by every parameter (one storage each).
_BNB_ROLES: dict[str, Role] = {
    **{key: "quant" for key in ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")},
    **{key: "quant" for key in ("max1", "max2", "new_max1", "new_max2")},
    "unorm_vec": "other",
    "gnorm_vec": "other",
    "step": "other",
}

# torchao: a moment of a parameter with >= 4096 elements is an OptimState8bit/4bit/Fp8 tensor
# subclass whose storage is its inner codes, scale and (not Fp8) qmap; smaller ones stay plain tensors.
_AO_ROLES: dict[str, Role] = {
    **_ADAM_ROLES,
    **{f"{key}.{inner}": "quant" for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") for inner in ("codes", "scale", "qmap")},
}

# The Muon family (muon, adamuon, normuon) is one MuonWithAdamW: the hidden side's keys plus torch
# AdamW's on every other parameter.
_MUON_ROLES: dict[str, Role] = {"momentum_buffer": "moment", **_ADAM_ROLES}
_ADAMUON_ROLES: dict[str, Role] = {"m": "moment", "v": "moment", **_ADAM_ROLES}
_NORMUON_ROLES: dict[str, Role] = {"momentum_buffer": "moment", "second_momentum_buffer": "factor", **_ADAM_ROLES}

# Plain Shampoo keeps one statistic and one inverse root per axis: pre_cond_i, inv_pre_cond_i.
_SHAMPOO_DENSE_ROLES: dict[str, Role] = {
    "momentum_buffer": "moment",
    **{f"{key}_{i}": "preconditioner" for key in ("pre_cond", "inv_pre_cond") for i in range(8)},
}

# GaLore-style projectors (Fira, APOLLO): the projector object holds the basis; scaling_grad is a
# 0-d norm kept between steps.
_LOW_RANK_ROLES: dict[str, Role] = {
    "exp_avg": "moment", "exp_avg_sq": "moment", "projector": "projection", "scaling_grad": "other",
}

LIBRARY: tuple[OptimizerEntry, ...] = (
    OptimizerEntry(
        name="adam",
        target="memprof.optim.adapters:adam",
        summary="torch.optim.Adam; foreach/fused/single-tensor selectable (adam:fused=true), resolved choice recorded",
        source="torch.optim",
        roles=_ADAM_ROLES,
    ),
    OptimizerEntry(
        name="adamw",
        target="memprof.optim.adapters:adamw",
        summary="torch.optim.AdamW (decoupled weight decay); foreach/fused/single-tensor selectable",
        source="torch.optim",
        roles=_ADAM_ROLES,
    ),
    OptimizerEntry(
        name="sgd",
        target="memprof.optim.adapters:sgd",
        summary="torch.optim.SGD with momentum 0.9",
        source="torch.optim",
        roles={"momentum_buffer": "moment"},
        defaults={"lr": 1e-3, "momentum": 0.9},
    ),
    OptimizerEntry(
        name="adafactor",
        target="memprof.optim.adapters:adafactor",
        summary="torch.optim.Adafactor (no first moment); row/column factors, full vector for 1-D",
        source="torch.optim",
        roles={"row_var": "factor", "col_var": "factor", "variance": "moment", "step": "other"},
    ),
    OptimizerEntry(
        name="hf_adafactor",
        target="transformers.optimization:Adafactor",
        summary="transformers Adafactor, fixed lr; first moment with hf_adafactor:beta1=0.9; fp32 state",
        source="transformers",
        roles=_HF_ADAFACTOR_ROLES,
        defaults={"lr": 1e-3, "relative_step": False, "scale_parameter": False, "warmup_init": False},
    ),
    OptimizerEntry(
        name="came",
        target="pytorch_optimizer:CAME",
        summary="CAME: Adafactor factors + factored confidence residual, full first moment",
        source="pytorch_optimizer",
        roles=_CAME_ROLES,
    ),
    OptimizerEntry(
        name="sm3",
        target="pytorch_optimizer:SM3",
        summary="SM3: one accumulator per axis; momentum_buffer always allocated by the library",
        source="pytorch_optimizer",
        roles=_SM3_ROLES,
    ),
    OptimizerEntry(
        name="lion",
        target="pytorch_optimizer:Lion",
        summary="Lion: sign update, one momentum buffer",
        source="pytorch_optimizer",
        roles={"exp_avg": "moment", "exp_grad_adanorm": "other"},
    ),
    OptimizerEntry(
        name="galore",
        target="memprof.optim.adapters:galore",
        summary="GaLore AdamW: 2-D weights projected to rank r (galore:rank=128:update_proj_gap=200:scale=0.25)",
        source="pytorch_optimizer",
        roles={"exp_avg": "moment", "exp_avg_sq": "moment", "projector": "projection"},
        params="model",
    ),
    OptimizerEntry(
        name="adam_mini",
        target="memprof.optim.adapters:adam_mini",
        summary="Adam-mini: full first moment, one second moment per block; dims from the model config",
        source="pytorch_optimizer",
        roles={"m": "moment", "v": "moment", "v_mean": "factor", "dimension": "other"},
        params="model",
    ),
    OptimizerEntry(
        name="adam8bit",
        target="bitsandbytes.optim:Adam8bit",
        summary="bitsandbytes 8-bit blockwise Adam (CUDA)",
        source="bitsandbytes",
        roles=_BNB_ROLES,
        requires="cuda",
        analytic="memprof.optim.analytic:bnb_adam8bit",
    ),
    OptimizerEntry(
        name="ao_adamw8bit",
        target="torchao.optim:AdamW8bit",
        summary="torchao 8-bit AdamW: tensor-subclass moments, codes + block scales (CUDA)",
        source="torchao",
        roles=_AO_ROLES,
        requires="cuda",
        analytic="memprof.optim.analytic:ao_adamw8bit",
    ),
    OptimizerEntry(
        name="ao_adamw4bit",
        target="torchao.optim:AdamW4bit",
        summary="torchao 4-bit AdamW: tensor-subclass moments, packed codes + block scales (CUDA)",
        source="torchao",
        roles=_AO_ROLES,
        requires="cuda",
        analytic="memprof.optim.analytic:ao_adamw4bit",
    ),
    OptimizerEntry(
        name="ao_adamw_fp8",
        target="torchao.optim:AdamWFp8",
        summary="torchao FP8 AdamW: tensor-subclass moments, float8_e4m3fn codes + block scales (CUDA)",
        source="torchao",
        roles=_AO_ROLES,
        requires="cuda",
        analytic="memprof.optim.analytic:ao_adamw_fp8",
    ),
    OptimizerEntry(
        name="muon",
        target="memprof.optim.adapters:muon",
        summary="Muon on hidden 2-D matrices, AdamW on embeddings/head/non-2-D (torch.optim.Muon, else pytorch_optimizer)",
        source="torch.optim",
        roles=_MUON_ROLES,
        params="model",
    ),
    OptimizerEntry(
        name="adamuon",
        target="memprof.optim.adapters:adamuon",
        summary="AdaMuon: Muon with an elementwise second moment of the orthogonalized update; AdamW on the rest",
        source="pytorch_optimizer",
        roles=_ADAMUON_ROLES,
        params="model",
    ),
    OptimizerEntry(
        name="normuon",
        target="memprof.optim.adapters:normuon",
        summary="NorMuon: Muon with a per-row second moment (neuron-wise normalization); AdamW on the rest",
        source="pytorch_optimizer",
        roles=_NORMUON_ROLES,
        params="model",
    ),
    OptimizerEntry(
        name="soap",
        target="memprof.optim.adapters:soap",
        summary="SOAP: Adam in Shampoo's eigenbasis; per-axis GG statistics and Q eigenbases (axes <= 10000)",
        source="pytorch_optimizer",
        roles={"exp_avg": "moment", "exp_avg_sq": "moment", "GG": "preconditioner", "Q": "preconditioner"},
    ),
    OptimizerEntry(
        name="shampoo",
        target="memprof.optim.adapters:shampoo",
        summary="Shampoo as distributed: dims merged, blocks of 512, fp32 statistics + inverse roots, SGD grafting",
        source="pytorch_optimizer",
        roles={"momentum": "moment", "graft": "moment", "pre_conditioner": "preconditioner"},
    ),
    OptimizerEntry(
        name="shampoo_dense",
        target="memprof.optim.adapters:shampoo_dense",
        summary="Plain Shampoo: one dense statistic + inverse root per axis, no size cap (an embedding gets V x V)",
        source="pytorch_optimizer",
        roles=_SHAMPOO_DENSE_ROLES,
    ),
    OptimizerEntry(
        name="kron",
        target="memprof.optim.adapters:kron",
        summary="PSGD Kron: momentum + one fp32 triangular Q per axis (diagonal above 8192 or for 1-D)",
        source="pytorch_optimizer",
        roles={"momentum_buffer": "moment", "Q": "preconditioner"},
    ),
    OptimizerEntry(
        name="apollo",
        target="memprof.optim.adapters:apollo",
        summary="APOLLO: AdamW moments in a random rank-r projection, channel-wise scaling (apollo:rank=256)",
        source="pytorch_optimizer",
        roles=_LOW_RANK_ROLES,
        params="model",
    ),
    OptimizerEntry(
        name="apollo_mini",
        target="memprof.optim.adapters:apollo",
        summary="APOLLO-Mini: rank-1 random projection, tensor-wise scaling, scale 128",
        source="pytorch_optimizer",
        roles=_LOW_RANK_ROLES,
        params="model",
        defaults={"rank": 1, "scale_type": "tensor", "scale": 128.0},
    ),
    OptimizerEntry(
        name="fira",
        target="memprof.optim.adapters:fira",
        summary="Fira: GaLore's low-rank AdamW plus a scaled full-rank residual (fira:rank=128)",
        source="pytorch_optimizer",
        roles=_LOW_RANK_ROLES,
        params="model",
    ),
    OptimizerEntry(
        name="ademamix",
        target="memprof.optim.adapters:ademamix",
        summary="AdEMAMix: Adam plus a slow EMA of the gradient (three full moments)",
        source="pytorch_optimizer",
        roles={"exp_avg": "moment", "exp_avg_sq": "moment", "exp_avg_slow": "moment"},
    ),
    OptimizerEntry(
        name="mars",
        target="memprof.optim.adapters:mars",
        summary="MARS (AdamW flavour): variance-reduced gradient, keeps the last gradient",
        source="pytorch_optimizer",
        roles={"exp_avg": "moment", "exp_avg_sq": "moment", "last_grad": "moment", "max_exp_avg_sq": "moment"},
    ),
    OptimizerEntry(
        name="adopt",
        target="memprof.optim.adapters:adopt",
        summary="ADOPT: Adam with the second moment of the previous step; two full moments",
        source="pytorch_optimizer",
        roles={"exp_avg": "moment", "exp_avg_sq": "moment"},
    ),
    OptimizerEntry(
        name="spam",
        target="memprof.optim.adapters:spam",
        summary="SPAM: Adam with momentum resets and spike clipping; bool update mask + masked moments on 2-D",
        source="pytorch_optimizer",
        roles={"exp_avg": "moment", "exp_avg_sq": "moment", "mask": "other"},
    ),
)
