"""SMMF Tables 4, 6 and 7: GLUE fine-tuning (GPT-2, T5-small, BERT; LLaMA-7b with LoRA), "(optimizer memory
[MiB], end-to-end [GiB])" per task; paper numbers from shared/papers/smmf-digest.md §3.

The LLaMA-7b rows are LoRA fine-tuning, whose rank and targets the paper does not state. Its numbers fix
them (the arithmetic is on the smmf-table4 page): r = 8 on q, k, v, o, gate, up and down of all 32 layers,
the model LlamaForSequenceClassification (no LM head), fp32: reports/configs/llama-7b-seqcls/.
"""

from __future__ import annotations

from typing import Sequence

from memprof.report.papers.model import Estimate, Reproduction, Run, cell
from memprof.report.papers.smmf import OPTS, SOURCE, sign8_cell, state_cells

GLUE_TASKS = ("QNLI", "MNLI", "QQP", "STSB", "MRPC")
LLAMA = "reports/configs/llama-7b-seqcls/config.json"
LLAMA_LORA = "r=8,targets=q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj"


def glue_cells(table: str, label: str, model: str, state: dict[str, Sequence[float]], e2e: Sequence[float],
               tasks: Sequence[str] = GLUE_TASKS, lora: str | None = None) -> list:
    """Per optimizer and task: the optimizer-memory cell and the end-to-end cell (weights + gradients + state)."""
    cells = []
    for (opt, spec), paper_e2e in zip(OPTS, e2e):
        run = Run(model, spec, None, lora)
        for i, (task, paper) in enumerate(zip(tasks, state[opt])):
            cells += state_cells(table, label, opt, run, paper, label=f"optimizer memory, {task}",
                                 supporting=i == 0)
        for task in tasks:
            cells.append(cell(table, label, opt, run, "model_grads_state", paper_e2e, "GiB",
                              label=f"end-to-end, {task}, vs weights+grads+state"))
    cells.append(sign8_cell(table, label, model, lora=lora))
    return cells


GPT2_T4 = {"Adam": (957, 952, 973, 962, 861), "Adafactor": (478, 478, 488, 481, 481),
           "SM3": (478, 478, 487, 481, 481), "CAME": (468, 479, 489, 481, 478), "SMMF": (16,) * 5}
T5_T4 = {"Adam": (464, 464, 434, 456, 464), "Adafactor": (233,) * 5, "SM3": (233,) * 5,
         "CAME": (233, 234, 233, 233, 234), "SMMF": (8,) * 5}
LLAMA_T4 = {"Adam": (153,) * 5, "Adafactor": (86,) * 5, "SM3": (86,) * 5, "CAME": (86,) * 5, "SMMF": (3.9,) * 5}
LLAMA_E2E = (24.9, 24.9, 24.9, 24.9, 24.8)


def table4() -> Reproduction:
    cells = (glue_cells("SMMF T4", "GPT-2 (124M)", "gpt2", GPT2_T4, (1.89, 1.43, 1.43, 1.43, 0.96))
             + glue_cells("SMMF T4", "T5-small", "t5-small", T5_T4, (0.92, 0.70, 0.70, 0.70, 0.47))
             + glue_cells("SMMF T4", "LLaMA-7b + LoRA", LLAMA, LLAMA_T4, LLAMA_E2E, lora=LLAMA_LORA))
    return Reproduction(
        name="smmf-table4", paper="SMMF",
        title="SMMF Table 4: optimizer memory of GPT-2, T5-small and LLaMA-7b (LoRA) fine-tuned on GLUE",
        source=(f"{SOURCE}, Table 4 (\"(optimizer memory [MiB], end-to-end [GiB])\" per GLUE task); paper "
                f"numbers from shared/papers/smmf-digest.md §3. LLaMA-7b: `{LLAMA}` with `--lora {LLAMA_LORA}`."),
        cells=cells, estimated=(LLAMA,), estimate=Estimate("rtx4090", "RTX 3090"),
        explanation=[],
    )


def table6() -> Reproduction:
    bert = {"Adam": (849, 837, 848, 846, 854), "Adafactor": (425, 420, 424, 424, 428),
            "SM3": (425, 420, 423, 424, 428), "CAME": (426, 421, 425, 425, 429), "SMMF": (15,) * 5}
    return Reproduction(
        name="smmf-table6", paper="SMMF", title="SMMF Table 6: optimizer memory of BERT-base fine-tuned on GLUE",
        source=(f"{SOURCE}, Table 6 (\"(optimizer memory [MiB], end-to-end [GiB])\" per GLUE task); paper numbers "
                "from shared/papers/smmf-digest.md §3."),
        cells=glue_cells("SMMF T6", "BERT-base", "bert-base-uncased", bert, (1.65, 1.24, 1.24, 1.24, 0.83)),
        estimate=Estimate("rtx4090", "RTX 3090"),
        explanation=[],
    )


def table7() -> Reproduction:
    state = {"Adam": (153, 153), "Adafactor": (86, 86), "SM3": (86, 86), "CAME": (96, 96), "SMMF": (3.9, 3.9)}
    return Reproduction(
        name="smmf-table7", paper="SMMF", title="SMMF Table 7: LLaMA-7b with LoRA on CoLA and RTE",
        source=(f"{SOURCE}, Table 7 (\"(Opt [MiB], E2E [GiB])\"); paper numbers from shared/papers/smmf-digest.md "
                f"§3. The LoRA setting is Table 4's (see smmf-table4.md): `{LLAMA}` with `--lora {LLAMA_LORA}`."),
        cells=glue_cells("SMMF T7", "LLaMA-7b + LoRA", LLAMA, state, LLAMA_E2E, tasks=("CoLA", "RTE"),
                         lora=LLAMA_LORA),
        estimated=(LLAMA,), estimate=Estimate("rtx4090", "RTX 3090"),
        explanation=[],
    )
