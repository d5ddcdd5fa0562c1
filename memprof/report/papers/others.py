"""Adapprox Table 2, Alada Table IV and IO-Adam Tables 2 and 4; paper numbers from the digests in
shared/papers/ (each reproduction names its section)."""

from __future__ import annotations

from memprof.report.papers.model import Estimate, Reproduction, Run, cell, difference

MEGATRON_117M = "reports/configs/gpt2-117m-megatron/config.json"
MEGATRON_345M = "reports/configs/gpt2-345m-megatron/config.json"
K_MAX = "rank_init=2147483647"  # memprof estimate's upper end of Adapprox's range: every factor at k_max


def adapprox_table2() -> Reproduction:
    rows = (  # beta1, name, spec, 117M, 345M
        (0.9, "AdamW", "adamw", 949.7, 2707.5),
        (0.9, "Adafactor", "hf_adafactor:beta1=0.9", 476.1, 1356.7),
        (0.9, "CAME", "came", 476.8, 1358.4),
        (0.9, "Adapprox (k_init)", "adapprox", 476.1, 1356.7),
        (0.9, "Adapprox (k_max)", f"adapprox:{K_MAX}", 622.0, 1791.1),
        (0.0, "AdamW", "adamw:betas=(0.0,0.999)", 949.7, 2707.5),
        (0.0, "Adafactor", "hf_adafactor", 1.2, 2.9),
        (0.0, "Adapprox (k_init)", "adapprox:betas=(0.0,0.999)", 1.2, 2.9),
        (0.0, "Adapprox (k_max)", f"adapprox:betas=(0.0,0.999):{K_MAX}", 147.2, 437.4),
    )
    cells = []
    for beta1, name, spec, p117, p345 in rows:
        for label, model, paper in (("GPT-2 117M (vocab 50,304)", MEGATRON_117M, p117),
                                    ("GPT-2 345M (vocab 50,304)", MEGATRON_345M, p345)):
            cells.append(cell("Adapprox T2", label, f"{name} (β1 = {beta1:g})", Run(model, spec), "state", paper,
                              "MiB", tolerance=("abs", 0.1)))
    return Reproduction(
        name="adapprox-table2", paper="Adapprox",
        title="Adapprox Table 2: optimizer-state memory of GPT-2 117M and 345M",
        source=("Zhao et al., Adapprox (arXiv 2403.14958), Table 2 (\"Quantitative memory usage (MB)\"); paper "
                "numbers from shared/papers/adapprox-digest.md §3. Megatron GPT-2 with the vocabulary padded to "
                "50,304: reports/configs/gpt2-{117m,345m}-megatron/config.json. CAME at β1 = 0 is \"—\" in the "
                "paper (no cell). Adapprox's k_init and k_max columns are the two ends of the range `memprof "
                "estimate` gives for it (its rank depends on the data): at rank_init and with every factor at k_max."),
        cells=cells, estimated=(MEGATRON_345M, "adapprox"), estimate=Estimate("h100", "V100"),
        explanation=[],
    )


def alada_table4() -> Reproduction:
    cells = []
    peaks = (("GPT2-Small + LM (bsz 1, seq 1024)", "gpt2", (3.483, 2.534, 2.571)),
             ("GPT2-XL + LM (bsz 1, seq 1024)", "gpt2-xl", (34.278, 22.388, 22.386)),
             ("T5-Small + NMT (bsz 1)", "t5-small", (1.605, 1.155, 1.130)))
    opts = (("Adam", "adam"), ("Adafactor (β1 = 0)", "hf_adafactor"), ("Alada", "alada"))
    for label, model, values in peaks:
        for (name, spec), paper in zip(opts, values):
            run = Run(model, spec)
            cells.append(cell("Alada T4", label, name, run, "peak", paper, "GiB", note="the paper's GB read as GiB"))
            cells.append(cell("Alada T4", label, name, run, "state", None, "GiB"))
            cells.append(cell("Alada T4", label, name, run, "model_grads_state", None, "GiB"))
        adam, adafactor, alada = (Run(model, spec) for _, spec in opts)
        for unit in ("GiB", "GB"):
            cells.append(difference("Alada T4", label, "Adam − Adafactor", adam, adafactor, "state",
                                    round(values[0] - values[1], 3), unit, label="peak difference vs state difference",
                                    note=f"the paper's peak gap read as {unit} against memprof's state gap"))
        cells.append(difference("Alada T4", label, "Alada − Adafactor", alada, adafactor, "state",
                                round(values[2] - values[1], 3), "GiB", tolerance=("abs", 0.01),
                                label="peak difference vs state difference",
                                note="state cannot explain it: the gap is step transient or activations"))
    return Reproduction(
        name="alada-table4", paper="Alada", title="Alada Table IV: peak memory of GPT2-Small, GPT2-XL and T5-Small",
        source=("Alada (arXiv 2512.13034), Table IV (\"Peak memory usage (GB)\", batch size 1, one A800); paper "
                "numbers from shared/papers/alada-digest.md §3.5. The paper names neither the tool nor GB vs GiB."),
        cells=cells, estimated=("gpt2-xl",), estimate=Estimate("a100-80gb", "A800 80GB"),
        gpu_runs=("alada-table4.json",),
        explanation=[],
    )


ROBERTA_COLA = "reports/configs/roberta-base-cola/config.json"


def io_adam_table2() -> Reproduction:
    label = "RoBERTa-base, CoLA (bsz 16)"
    opts = (("AdamW", "adamw", 2409.89), ("Adafactor", "hf_adafactor", 1133.41),
            ("GaLore (rank 16)", "galore:rank=16", 1768.14), ("IO-Adam (b = 16)", "io_adam:buffer_size=16", 1599.61))
    cells = []
    for name, spec, paper in opts:
        run = Run(ROBERTA_COLA, spec)
        cells.append(cell("IO-Adam T2", label, name, run, "peak", paper, "MiB", note="paper's MB read as MiB"))
        cells.append(cell("IO-Adam T2", label, name, run, "state", None, "MiB"))
        cells.append(cell("IO-Adam T2", label, name, run, "model_grads_state", None, "MiB"))
    adamw = Run(ROBERTA_COLA, "adamw")
    for name, spec, paper in opts[1:]:
        cells.append(difference("IO-Adam T2", label, f"{name} − AdamW", Run(ROBERTA_COLA, spec), adamw,
                                "model_grads_state", round(paper - opts[0][2], 2), "MiB",
                                label="peak difference vs weights+grads+state difference"))
    return Reproduction(
        name="io-adam-table2", paper="IO-Adam", title="IO-Adam Table 2: peak memory of RoBERTa-base fine-tuned on CoLA",
        source=("IO-Adam, Table 2 (\"peak memory allocation … collected on CoLA with a batch size of 16\", MB); "
                "paper numbers from shared/papers/io-adam-digest.md §3.1. Model: "
                f"{ROBERTA_COLA} (RobertaForSequenceClassification, 2 labels)."),
        cells=cells, estimate=Estimate("a100-80gb", "not stated"), gpu_runs=("io-adam-table2.json",),
        explanation=[],
    )


VIT = "reports/configs/vit_small.py:vit_small"


def io_adam_table4() -> Reproduction:
    label = "ViT-small, CIFAR-10"
    opts = (("AdamW", "adamw", 112.02), ("Adafactor", "adafactor", 64.52),
            *((f"IO-Adam (b = {b})", f"io_adam:buffer_size={b}", v)
              for b, v in ((16, 68.40), (8, 66.84), (4, 66.06), (2, 65.66), (1, 65.47))))
    cells = []
    for name, spec, paper in opts:
        run = Run(VIT, spec)
        cells.append(cell("IO-Adam T4", label, name, run, "model_grads_state", paper, "MiB",
                          label="mem-alloc vs weights+grads+state", note="paper's MB read as MiB"))
        cells.append(cell("IO-Adam T4", label, name, run, "peak", paper, "MiB", primary=False))
        cells.append(cell("IO-Adam T4", label, name, run, "state", None, "MiB"))
    adamw = Run(VIT, "adamw")
    for name, spec, paper in opts[1:]:
        cells.append(difference("IO-Adam T4", label, f"{name} − AdamW", Run(VIT, spec), adamw, "model_grads_state",
                                round(paper - opts[0][2], 2), "MiB", tolerance=("abs", 0.5),
                                label="mem-alloc difference vs weights+grads+state difference"))
    io_adam = opts[2:]
    for (name, spec, paper), (_, smaller, paper_smaller) in zip(io_adam, io_adam[1:]):
        cells.append(difference("IO-Adam T4", label, f"{name} − {smaller.split('=')[1]}", Run(VIT, spec),
                                Run(VIT, smaller), "model_grads_state", round(paper - paper_smaller, 2), "MiB",
                                tolerance=("abs", 0.05), label="buffer increment: mem-alloc vs weights+grads+state"))
    return Reproduction(
        name="io-adam-table4", paper="IO-Adam", title="IO-Adam Table 4: memory of the small ViT on CIFAR-10",
        source=("IO-Adam, Table 4 (\"mem-alloc(MB)\"); paper numbers from shared/papers/io-adam-digest.md §3.3. "
                f"Model: {VIT} (vit-pytorch's ViT layout, 6,324,970 parameters). The Adafactor is PyTorch's (the "
                "paper quotes its default lr 1e-2)."),
        cells=cells, cpu={"steps": 1, "batch_size": 2}, estimate=Estimate("a100-80gb", "not stated"),
        explanation=[],
    )
