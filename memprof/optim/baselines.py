"""Baseline optimizers taken from well-kept libraries, with the roles of their state keys."""

from __future__ import annotations

from memprof.optim.registry import OptimizerEntry

_ADAM_ROLES = {"exp_avg": "moment", "exp_avg_sq": "moment", "max_exp_avg_sq": "moment", "step": "other"}

BASELINES: tuple[OptimizerEntry, ...] = (
    OptimizerEntry(
        name="adam",
        target="torch.optim:Adam",
        summary="Adam; foreach/fused/single-tensor selectable (adam:fused=true)",
        source="torch.optim",
        roles=_ADAM_ROLES,
    ),
    OptimizerEntry(
        name="adamw",
        target="torch.optim:AdamW",
        summary="AdamW (decoupled weight decay)",
        source="torch.optim",
        roles=_ADAM_ROLES,
    ),
    OptimizerEntry(
        name="sgd",
        target="torch.optim:SGD",
        summary="SGD with momentum 0.9",
        source="torch.optim",
        roles={"momentum_buffer": "moment"},
        defaults={"lr": 1e-3, "momentum": 0.9},
    ),
    OptimizerEntry(
        name="adafactor",
        target="torch.optim:Adafactor",
        summary="Adafactor (no first moment); row/column factors, full vector for 1-D",
        source="torch.optim",
        roles={"row_var": "factor", "col_var": "factor", "variance": "moment", "step": "other"},
    ),
)
