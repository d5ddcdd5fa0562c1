"""Adapprox Table 2, Alada Table IV and IO-Adam Tables 2 and 4; paper numbers from the digests in
shared/papers/ (each reproduction names its section)."""

from __future__ import annotations

from memprof.report.papers.model import Estimate, Printed, Reproduction, Run, cell, difference, with_reasons

MEGATRON_117M = "reports/configs/gpt2-117m-megatron/config.json"
MEGATRON_345M = "reports/configs/gpt2-345m-megatron/config.json"
K_MAX = "rank_init=2147483647"  # memprof estimate's upper end of Adapprox's range: every factor at k_max


def adapprox_table2() -> Reproduction:
    rows = (  # beta1, name, spec, 117M, 345M
        (0.9, "AdamW", "adamw", 949.7, 2707.5),
        (0.9, "Adafactor", "hf_adafactor:beta1=0.9", 476.1, 1356.7),
        (0.9, "CAME", "came", 476.8, 1358.4),
        (0.9, "Adapprox (k_init)", "adapprox", 476.1, 1356.7),
        (0.9, "Adapprox (k_max)", f"adapprox:{K_MAX}", Printed("622.0"), 1791.1),
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
        gpu_runs=("adapprox-table2-h200.json",),
        explanation=[
            "All 18 cells agree to 0.05 MiB. The paper's \"MB\" is MiB, its state is fp32, and its Adafactor is "
            "the HF/fairseq one: a first moment only with β1 > 0, a dense second moment for 1-D tensors, row and "
            "column factors for every ≥2-D tensor including the embeddings. CAME matches the official layout "
            "(pytorch_optimizer's is the same: momentum, two factored statistics, dense for 1-D).",
            "Adapprox's rank depends on the data, so `memprof estimate` gives its state as a range: the lower end at "
            "the initial rank (k_init = 1: one factor pair per matrix, Adafactor's size) and the upper end with every "
            "factor at k_max = ⌊0.25 · min(m, n)⌋. The two ends are the paper's k_init and k_max columns, β1 = 0.9 "
            "(with the momentum) and β1 = 0 (without).",
            "AdamW at β1 = 0 still allocates its first moment, so its row equals β1 = 0.9, as the paper says.",
            "The vocabulary must be Megatron's 50,304 (50,257 padded to a multiple of 128): with HF's 50,257 the "
            "AdamW cells would be 0.28 MiB (117M) and 0.37 MiB (345M) lower and miss the 0.1 MiB target.",
            "The committed H200 run at the paper's batch 16 × 1024 (gpu/adapprox-table2-h200.json) holds the same "
            "state bytes; the table prints no peak.",
        ],
    )


ALADA_REASONS = (
    ({"model": "GPT2-Small + LM (bsz 1, seq 1024)", "optimizer": ("Adam", "Adafactor (β1 = 0)")},
     "the paper's {paper} GiB is {gap} GiB above memprof's H100 peak, close to GPT-2's 0.464 GiB of fp32 "
     "gradients (124.4M × 4 B): memprof frees them at zero_grad before the forward in which the peak falls, the "
     "paper's loop kept them (Alada, whose momentum lives in the gradient buffer, agrees within 1 %)."),
    ({"model": "GPT2-XL + LM (bsz 1, seq 1024)", "optimizer": "Adam"},
     "the paper's {paper} GiB is {gap} GiB above the estimate, about GPT2-XL's 5.80 GiB of fp32 gradients "
     "(1.558B × 4 B) kept through the next forward, as in the GPT2-Small row."),
    ({"model": "GPT2-XL + LM (bsz 1, seq 1024)", "optimizer": "Adafactor (β1 = 0)"},
     "the paper's {paper} GiB is {gap} GiB above the estimate: GPT2-XL's 5.80 GiB of fp32 gradients kept "
     "through the forward (as for Adam) plus the same 1.77 GiB the paper's Alada holds above its estimate."),
    ({"model": "GPT2-XL + LM (bsz 1, seq 1024)", "optimizer": "Alada"},
     "1.77 GiB (37.7 MiB per layer of 48) above the estimate, which already has Alada's gradient-buffer momentum "
     "live in the forward; neither state nor gradients account for it, and the paper's Adafactor (β1 = 0), which "
     "keeps no such buffer, sits at the same 22.39 GiB."),
    ({"model": "T5-Small + NMT (bsz 1)"},
     "the paper's {paper} GiB is {gap} GiB above memprof's H100 peak, more than T5-small's 0.225 GiB of fp32 "
     "gradients (60.5M × 4 B): the rest is activations of translation batches longer than the 128 tokens "
     "assumed (the paper does not state its lengths)."),
)


def alada_table4() -> Reproduction:
    cells = []
    peaks = (("GPT2-Small + LM (bsz 1, seq 1024)", "gpt2", (3.483, 2.534, 2.571)),
             ("GPT2-XL + LM (bsz 1, seq 1024)", "gpt2-xl", (34.278, 22.388, 22.386)),
             ("T5-Small + NMT (bsz 1)", "t5-small", (1.605, 1.155, Printed("1.130"))))
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
        cells=with_reasons(cells, ALADA_REASONS), estimated=("gpt2-xl",), estimate=Estimate("a100-80gb", "A800 80GB"),
        gpu_runs=("alada-table4.json",),
        explanation=[
            "Peaks of GPT2-Small and T5-Small come from one H100 run at batch 1 (sequence 1024 for GPT-2; T5's NMT "
            "lengths are not stated, 128 assumed); GPT2-XL (1.56B parameters) is estimated for an A800 80GB (the "
            "A100 80GB's figures) at batch 1 × 1024, the estimate being within 1 % of GPU runs on GPT-2 "
            "(estimate-accuracy.md). A peak is torch's peak allocated bytes, the cuBLAS workspace included.",
            "Alada agrees on GPT2-Small (+0.6 %). Adam and Adafactor sit 0.42 GiB under the paper, about GPT-2's "
            "0.46 GiB of gradients: memprof's loop frees gradients at zero_grad (set_to_none), Alada cannot (its "
            "momentum lives in the gradient buffer), and the paper's baselines evidently kept theirs through the next "
            "forward, where the peak falls (zero_grad(set_to_none=False), as older HF Trainer versions did).",
            "Which measurement the paper's ratios follow: the Adam − Adafactor peak gap is the gap in optimizer state "
            "(Adam's two fp32 moments) when \"GB\" is read as GiB: T5 0.450 vs 0.450, GPT-2 0.949 vs 0.926, GPT2-XL "
            "11.890 vs 11.597. Read as 10⁹ B the state gaps are 5–8 % off. So the table reports peak allocated "
            "memory in GiB, and Adam's peak exceeds Adafactor's by its state.",
            "Alada and Adafactor (β1 = 0) hold the same state within 1 MiB (factor vectors only), yet the paper's "
            "peaks differ by +0.037 (GPT-2), −0.025 (T5) and −0.002 GiB (XL). In memprof Alada's peak is one "
            "gradient buffer above Adafactor's (its momentum is live through the forward).",
        ],
    )


ROBERTA_COLA = "reports/configs/roberta-base-cola/config.json"


IO_ADAM_T2_REASONS = (
    ({"optimizer": "AdamW"},
     "2409.89 is weights + gradients + state (1902.0 MiB) plus 508, about the one parameter-sized copy CUDA's "
     "foreach AdamW makes in the step (475.5 MiB): the step's peak; memprof's H100 peak falls in the backward, "
     "{size} MiB higher with the activations of 16 × 128 tokens."),
    ({"optimizer": "Adafactor"},
     "1133.41 is weights + gradients + state (952.3 MiB) plus 181, about Adafactor's fp32 temporaries of the "
     "largest matrix (the 147 MiB word embedding): the step's peak; memprof's H100 peak falls in the backward, "
     "{size} MiB higher with the activations of 16 × 128 tokens."),
    ({"optimizer": "GaLore (rank 16)"},
     "1768.14 is weights + gradients + state (1266.5 MiB) plus 502; memprof's H100 peak falls in the backward, "
     "{size} MiB higher with the activations of 16 × 128 tokens."),
    ({"optimizer": "IO-Adam (b = 16)"},
     "1599.61 is weights + gradients + state (1259.7 MiB) plus 340; memprof's H100 peak falls in the backward, "
     "{size} MiB higher with the activations of 16 × 128 tokens."),
)


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
        cells=with_reasons(cells, IO_ADAM_T2_REASONS), estimate=Estimate("a100-80gb", "not stated"),
        gpu_runs=("io-adam-table2.json",),
        explanation=[
            "The paper states neither the tool, the sequence length (128 assumed: run_glue's default max length) nor "
            "the precision (fp32 assumed). The peaks come from one H100 run at batch 16; memprof's are 14–59 % above "
            "the paper's, all in the backward pass with the activations of 16 × 128 tokens.",
            "Which measurement the paper's numbers follow: each is memprof's weights + gradients + state plus an "
            "optimizer-specific amount, 508 (AdamW), 502 (GaLore), 181 (Adafactor) and 340 MiB (IO-Adam): not a "
            "common overhead, so most likely peaks inside the optimizer step, where each optimizer adds its own "
            "transient. Two fit: CUDA's foreach AdamW allocates about one parameter-sized copy (475.5 MiB against "
            "508), and Adafactor's fp32 temporaries of the largest matrix, the 147 MiB word embedding, against 181. "
            "The GaLore − AdamW gap equals the gap in weights + gradients + state within 1 %.",
        ],
    )


VIT = "reports/configs/vit_small.py:vit_small"


IO_ADAM_T4_REASONS = (
    ({"quantity": "model_grads_state"},
     "{paper} is weights + gradients + state ({memprof} MiB) plus {gap}, within 15.5–16.8 MiB in every row (the "
     "batch and CUDA workspace of a run whose batch the paper does not state): memory allocated between steps, "
     "not a peak (the estimated peak at batch 128 is about 2 GiB)."),
)


def io_adam_table4() -> Reproduction:
    label = "ViT-small, CIFAR-10"
    opts = (("AdamW", "adamw", 112.02), ("Adafactor", "adafactor", 64.52),
            *((f"IO-Adam (b = {b})", f"io_adam:buffer_size={b}", v)
              for b, v in ((16, Printed("68.40")), (8, 66.84), (4, 66.06), (2, 65.66), (1, 65.47))))
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
        cells=with_reasons(cells, IO_ADAM_T4_REASONS), cpu={"steps": 1, "batch_size": 2},
        estimate=Estimate("a100-80gb", "not stated"),
        explanation=[
            "Which measurement the ratios follow: Table 4 tracks persistent memory, not a peak. Adafactor − AdamW "
            "equals memprof's difference in weights + gradients + state within 0.5 MiB, and every step of the "
            "buffer (16→8→4→2→1) changes the paper's value by memprof's C and R increment within 0.05 MiB. Each "
            "paper value is memprof's weights + gradients + state plus a near-constant 15.5–16.8 MiB (the batch, "
            "CUDA workspaces), so each paper cell is 14–26 % above weights + gradients + state.",
            "That includes the paper's claim that folded layers keep no weight gradient: with gradients kept, "
            "IO-Adam would be about 24 MiB higher. IO-Adam's gap to AdamW is 1.2–1.3 MiB smaller in the paper "
            "than in memprof at every buffer size (−2.8 %): the paper's IO-Adam holds about 1.3 MiB more, "
            "independent of b, which memprof's IO-Adam does not allocate.",
            "The batch size is not stated (128 assumed in the config). The supporting peak rows are estimates for "
            "an A100 at that batch: about 2 GiB, far above every paper cell, so the paper's mem-alloc is not a "
            "peak at any batch near 128.",
        ],
    )
