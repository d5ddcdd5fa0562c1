"""SMMF (Park & Lee, AAAI 2025): the shared pieces of its tables, Table 1 (CNNs) and Table 8 (SQuAD).

Paper numbers are copied from shared/papers/smmf-digest.md §3; each cell names its table. "Adafactor"
is the HF/fairseq one with β1 = 0.9 (digest §2.3); SMMF's tables count the sign at 1 bit per element
(digest §2.5), so an SMMF state cell is set against the factor vectors in 512-B blocks plus the sign at
exactly one bit (``state_blocks_exact_sign``), with the plain state beside it.
"""

from __future__ import annotations

from memprof.report.papers.model import Cell, Estimate, Reproduction, Run, cell

OPTS = (("Adam", "adam"), ("Adafactor", "hf_adafactor:beta1=0.9"), ("SM3", "sm3"), ("CAME", "came"),
        ("SMMF", "smmf"))
SIGN8 = ("SMMF (8-bit signs)", "smmf:sign_bits=8")
SOURCE = "Park & Lee, SMMF (AAAI 2025)"
STATE_BLOCKS_NOTE = "the sign at 1 bit/element, the factor vectors in 512-B blocks (what the tables count, §2.5)"


def state_cells(table: str, model: str, optimizer: str, run: Run, paper: float, unit: str = "MiB", *,
                label: str = "", supporting: bool = True, reason: str = "") -> list[Cell]:
    """A printed optimizer-memory number: for SMMF the state with the sign at one bit and the factor vectors
    in 512-B blocks (the paper cell) beside the plain state; for the others the state (the paper cell)
    beside the state in 512-B blocks (``supporting``)."""
    is_smmf = run.spec == "smmf"
    primary = cell(table, model, optimizer, run, "state_blocks_exact_sign" if is_smmf else "state", paper, unit,
                   label=label or ("optimizer memory, sign at 1 bit" if is_smmf else ""), reason=reason)
    if not supporting:
        return [primary]
    other = cell(table, model, optimizer, run, "state" if is_smmf else "state_blocks", paper, unit,
                 primary=False)
    return [primary, other]


def sign8_cell(table: str, model: str, run_model: str, classes: int | None = None, lora: str | None = None) -> Cell:
    return cell(table, model, SIGN8[0], Run(run_model, SIGN8[1], classes, lora), "state", None, "MiB",
                note="no paper cell: the official code's torch.bool sign")


# -- Table 1 -------------------------------------------------------------------------------------------
T1_ROWS = (  # label, model, classes, optimizer MiB (Adam, Adafactor, SM3, CAME, SMMF), end-to-end MiB
    ("ResNet-50, ImageNet", "resnet50", None, (195, 220, 99, 346, 3.7), (394, 419, 298, 546, 197)),
    ("MobileNetV2, ImageNet", "mobilenet_v2", None, (27, 30, 14, 47, 0.8), (54, 58, 41, 75, 28)),
    ("ResNet-50, CIFAR-100", "resnet50", 100, (184, 215, 93, 340, 3.5), (366, 397, 227, 526, 185)),
    ("MobileNetV2, CIFAR-100", "mobilenet_v2", 100, (18, 26, 9, 43, 0.7), (36, 43, 27, 60, 19)),
    ("YOLOv5s, COCO", "reports/configs/yolov5.py:yolov5s", None, (57, 61, 28, 94, 1.4), (121, 92, 92, 159, 65)),
    ("YOLOv5m, COCO", "reports/configs/yolov5.py:yolov5m", None, (168, 174, 84, 267, 3.4), (340, 258, 260, 438, 176)),
)


def table1() -> Reproduction:
    cells = []
    for label, model, classes, state, e2e in T1_ROWS:
        for (name, spec), paper, paper_e2e in zip(OPTS, state, e2e):
            run = Run(model, spec, classes)
            cells += state_cells("SMMF T1", label, name, run, paper)
            cells.append(cell("SMMF T1", label, name, run, "model_grads_state", paper_e2e, "MiB",
                              label="end-to-end vs weights+grads+state"))
        cells.append(sign8_cell("SMMF T1", label, model, classes))
    cells.append(Cell("SMMF §5.3", "ResNet-50, ImageNet", "Adam ÷ SMMF (8-bit signs)", "state",
                      ((1, Run("resnet50", "adam")), (1, Run("resnet50", SIGN8[1]))), 7.8, "×",
                      label="\"memory reduction\", state ratio", ratio=True, primary=False,
                      note="§5.3 quotes 7.8× next to the 8-bit-sign timings"))
    return Reproduction(
        name="smmf-table1", paper="SMMF", title="SMMF Table 1: optimizer memory of the CNNs",
        source=(f"{SOURCE}, Table 1 (cells \"(optimizer, end-to-end) memory [MiB]\"); paper numbers from "
                "shared/papers/smmf-digest.md §3. YOLOv5s/m: reports/configs/yolov5.py."),
        cells=cells, cpu={"steps": 1, "batch_size": 2, "image_size": 32},
        estimate=Estimate("rtx4090", "RTX 3090"),
        explanation=[],
    )


# -- Table 8 -------------------------------------------------------------------------------------------
T8_ROWS = (  # label, memprof model, optimizer MiB per optimizer, end-to-end MiB per optimizer
    ("RoBERTa-base", "roberta-base", (972, 488, 488, 488, 16.3), (1440, 967, 968, 967, 507)),
    ("ALBERT-base-v2", "albert-base-v2", (85, 43, 43, 43, 1.5), (146, 102, 102, 103, 61)),
    ("BERT-base", "bert-base-uncased", (856, 430, 430, 430, 14), (1270, 850, 850, 850, 450)),
    ("GPT-2 (124M)", "gpt2", (957, 483, 483, 484, 16), (1454, 983, 983, 983, 522)),
)


def table8() -> Reproduction:
    cells = []
    for label, model, state, e2e in T8_ROWS:
        for (opt, spec), paper, paper_e2e in zip(OPTS, state, e2e):
            run = Run(model, spec)
            cells += state_cells("SMMF T8", label, opt, run, paper)
            cells.append(cell("SMMF T8", label, opt, run, "model_state", paper_e2e, "MiB",
                              label="end-to-end vs weights+state"))
            cells.append(cell("SMMF T8", label, opt, run, "model_grads_state", paper_e2e, "MiB",
                              label="end-to-end vs weights+grads+state", primary=False))
        cells.append(sign8_cell("SMMF T8", label, model))
    return Reproduction(
        name="smmf-table8", paper="SMMF",
        title="SMMF Table 8: optimizer memory on SQuAD (RoBERTa, ALBERT, BERT, GPT-2)",
        source=(f"{SOURCE}, Table 8 (\"(optimizer, end-to-end) [MiB]\", SQuAD F1); paper numbers from "
                "shared/papers/smmf-digest.md §3."),
        cells=cells, estimate=Estimate("l40s", "RTX A6000"),
        explanation=[],
    )
