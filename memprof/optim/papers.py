"""The five memory-efficient optimizers memprof implements from their papers.

Each lives in its own module and declares the roles of its state keys in ``state_roles``.
"""

from __future__ import annotations

from memprof.optim.entry import OptimizerEntry

PAPERS: tuple[OptimizerEntry, ...] = (
    OptimizerEntry(
        name="smmf",
        target="memprof.optim.smmf:SMMF",
        summary="SMMF: square-matricized rank-1 factored moments + sign bitmap (AAAI 2025)",
        source="memprof (paper)",
    ),
    OptimizerEntry(
        name="alada",
        target="memprof.optim.alada:Alada",
        summary="Alada: rank-one second moment, first moment kept in the gradient buffer",
        source="memprof (paper)",
    ),
    OptimizerEntry(
        name="adamem",
        target="memprof.optim.adamem:AdaMeM",
        summary="AdaMeM: factored preconditioner + low-rank momentum in the gradient's top-r subspace",
        source="memprof (paper)",
        params="named_parameters",  # names select the full_rank layers
    ),
    OptimizerEntry(
        name="adapprox",
        target="memprof.optim.adapprox:Adapprox",
        summary="Adapprox: randomized low-rank second moment with adaptive rank (S-RSI)",
        source="memprof (paper)",
        upper_bound={"rank_init": 2**31 - 1},  # capped at k_max per matrix: every factor at its maximum rank
    ),
    OptimizerEntry(
        name="io_adam",
        target="memprof.optim.io_adam:IOAdam",
        summary="IO-Adam: second moment from layer inputs and output gradients; needs the model",
        source="memprof (paper)",
        params="model",
    ),
)
