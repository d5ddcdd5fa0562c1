"""HF models build and run without library chatter that is not about the user's run."""

from __future__ import annotations

import json
import logging
import warnings

from transformers.utils import logging as hf_logging

from memprof.models import ModelOptions, build_model


def test_tiny_gpt2_builds_and_trains_without_transformers_warnings(tmp_path):
    config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=1, n_embd=16, n_head=2,
                  vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    hf_logging.warning_once.cache_clear()  # an earlier test may already have emitted a once-only warning
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")  # transformers does not propagate to the root logger
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            built = build_model(str(path), ModelOptions(batch_size=2, seq_len=8))
            built.loss(built.model, built.batch).backward()
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [] and [str(w.message) for w in caught] == []
