"""SMMF Tables 2, 3 and 9–13: the Transformers trained from scratch on WMT32k, the Megatron pre-training
runs, and the seq2seq fine-tuning (SQuADv2, WMT16, summarization); paper numbers from
shared/papers/smmf-digest.md §3. Model files: reports/configs/ (each cites its dimensions)."""

from __future__ import annotations

from typing import Sequence

from memprof.report.papers.model import Estimate, Reproduction, Run, cell
from memprof.report.papers.smmf import OPTS, SOURCE, sign8_cell, state_cells


def _rows(table: str, rows: Sequence[tuple], opts: Sequence[tuple[str, str]], state_unit: str, e2e_unit: str,
          e2e_quantity: str, e2e_label: str) -> list:
    cells = []
    for label, model, state, e2e in rows:
        for (name, spec), paper, paper_e2e in zip(opts, state, e2e):
            run = Run(model, spec)
            cells += state_cells(table, label, name, run, paper, state_unit)
            cells.append(cell(table, label, name, run, e2e_quantity, paper_e2e, e2e_unit, label=e2e_label))
        cells.append(sign8_cell(table, label, model))
    return cells


WMT_BASE = "reports/configs/wmt_transformer.py:transformer_base"
WMT_BIG = "reports/configs/wmt_transformer.py:transformer_big"


def table2() -> Reproduction:
    rows = (("Transformer-base, WMT32k", WMT_BASE, (0.7, 0.4, 0.4, 0.4, 0.01), (1.4, 1.1, 1.1, 1.1, 0.8)),
            ("Transformer-big, WMT32k", WMT_BIG, (2.1, 1.1, 1.1, 1.1, 0.04), (4.2, 3.2, 3.2, 3.2, 2.1)))
    return Reproduction(
        name="smmf-table2", paper="SMMF", title="SMMF Table 2: Transformer-base and -big trained on WMT32k",
        source=(f"{SOURCE}, Table 2 (\"(Optimizer, End-to-End Memory [GiB])\"); paper numbers from "
                "shared/papers/smmf-digest.md §3. Model: reports/configs/wmt_transformer.py (torch.nn.Transformer "
                "with Vaswani et al.'s base and big dimensions, a 32,768-subword vocabulary, untied source, target "
                "and output embeddings)."),
        cells=_rows("SMMF T2", rows, OPTS, "GiB", "GiB", "model_grads_state", "end-to-end vs weights+grads+state"),
        estimated=(WMT_BIG,), estimate=Estimate("l40s", "RTX A6000"),
        explanation=[],
    )


MEGATRON = (("BERT-345M (Megatron)", "reports/configs/bert-345m-megatron/config.json",
             (2.5, 1.3, 1.3, 1.3, 0.04), (6.3, 5.0, 5.0, 5.0, 3.8)),
            ("GPT-2 345M (Megatron)", "reports/configs/gpt2-345m-megatron/config.json",
             (2.6, 1.3, 1.3, 1.3, 0.04), (6.7, 5.3, 5.3, 5.3, 4.0)),
            ("T5-220M (Megatron)", "reports/configs/t5-220m-megatron/config.json",
             (1.7, 0.8, 0.8, 0.9, 0.03), (4.2, 3.4, 3.4, 3.4, 2.5)))


def table3() -> Reproduction:
    return Reproduction(
        name="smmf-table3", paper="SMMF", title="SMMF Table 3: BERT, GPT-2 and T5 pre-trained with Megatron-LM",
        source=(f"{SOURCE}, Table 3 (\"(Optimizer, End-to-End [GiB])\", BookCorpus and Wikipedia); paper numbers "
                "from shared/papers/smmf-digest.md §3 and §4 (the Megatron-LM example sizes: BERT-345M, GPT-2 345M, "
                "T5-220M). Models: reports/configs/{bert-345m,gpt2-345m,t5-220m}-megatron/config.json."),
        cells=_rows("SMMF T3", MEGATRON, OPTS, "GiB", "GiB", "model_grads_state", "end-to-end vs weights+grads+state"),
        estimated=tuple(model for _, model, _, _ in MEGATRON), estimate=Estimate("a100-80gb", "A100 / RTX A6000"),
        explanation=[],
    )


T5 = "t5-small"
MARIAN = "reports/configs/marian-en-ro/config.json"
BART = "reports/configs/bart-base/config.json"
MBART = "reports/configs/mbart-large-cc25/config.json"
ADAM_SMMF = (OPTS[0], OPTS[4])


def table9_13() -> Reproduction:
    e2e = ("model_state", "end-to-end vs weights+state")
    cells = _rows("SMMF T9", (("T5-small, SQuADv2", T5, (463, 233, 234, 234, 8), (706, 481, 481, 481, 256)),),
                  OPTS, "MiB", "MiB", *e2e)
    cells += _rows("SMMF T10", (("T5-small, WMT16 En→Ro", T5, (462, 8.3), (719, 265)),
                                ("MarianMT, WMT16 En→Ro", MARIAN, (569, 10.2), (875, 316))),
                   ADAM_SMMF, "MiB", "MiB", *e2e)
    cells += _rows("SMMF T11–13", (("T5-small, CNN/DM", T5, (462, 8.3), (750, 294)),
                                   ("T5-small, XSUM", T5, (462, 8.3), (740, 260)),
                                   ("BART-base, CNN/DM", BART, (1068, 18.5), (1639, 582)),
                                   ("BART-base, XSUM", BART, (1071, 18.5), (1620, 575)),
                                   ("mBART-large, Il Post", MBART, (4661, 77.8), (7046, 2477)),
                                   ("mBART-large, Fanpage", MBART, (4663, 77.5), (7093, 2499))),
                   ADAM_SMMF, "MiB", "MiB", *e2e)
    return Reproduction(
        name="smmf-table9-13", paper="SMMF",
        title="SMMF Tables 9–13: T5-small, MarianMT, BART-base and mBART fine-tuned (QA, translation, summaries)",
        source=(f"{SOURCE}, Tables 9 (SQuADv2), 10 (WMT16 En→Ro) and 11–13 (CNN/DailyMail, XSUM, Il Post, "
                "Fanpage), each \"(Opt, E2E [MiB])\"; paper numbers from shared/papers/smmf-digest.md §3. Models "
                "built from configs with the published dimensions: reports/configs/{marian-en-ro,bart-base,"
                "mbart-large-cc25}/config.json; T5-small is memprof's built-in."),
        cells=cells, estimated=(MBART,), estimate=Estimate("l40s", "RTX A6000"),
        explanation=[],
    )
