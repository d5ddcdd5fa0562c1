"""The offline model zoo: names resolve, sizes match the published configs, losses train."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest
import torch

from memprof.errors import UsageError
from memprof.models import BuiltModel, ModelOptions, build_model, model_names
from memprof.models.catalog import TEXT_MODELS, TORCHVISION_CLASSIFIERS

SMALL = ModelOptions(batch_size=2, seq_len=8)


def _gpt2_params(layers: int, d: int, vocab: int = 50257, positions: int = 1024) -> int:
    return vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d  # lm_head tied to wte


def _llama_params(d: int, ff: int, layers: int, vocab: int = 32000) -> int:
    return 2 * vocab * d + layers * (4 * d * d + 3 * d * ff + 2 * d) + d  # untied head, no biases


EXPECTED_PARAMS = {
    "gpt2": _gpt2_params(12, 768),  # 124,439,808
    "gpt2-medium": _gpt2_params(24, 1024),
    "gpt2-large": _gpt2_params(36, 1280),
    "gpt2-xl": _gpt2_params(48, 1600),
    "llama-60m": _llama_params(512, 1376, 8),  # io-adam digest §4: 58,073,600
    "llama-130m": _llama_params(768, 2048, 12),  # 134,105,856
    "llama-350m": _llama_params(1024, 2736, 24),  # 367,969,280
    "llama-1b": _llama_params(2048, 5461, 24),  # 1,339,082,752
    "llama-7b": _llama_params(4096, 11008, 32),
    "bert-base-uncased": 109_514_298,  # BertForMaskedLM: no pooler, decoder tied, own bias
    "roberta-base": 124_697_433,
    "t5-small": 60_506_624,
    "albert-base-v2": 11_683_584 - 590_592 + 128_688,  # AlbertModel - pooler + MLM head (decoder tied)
}


def _train_step_ok(built: BuiltModel) -> torch.Tensor:
    loss = built.loss(built.model, built.batch)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in built.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return loss


def test_model_names_import_neither_transformers_nor_torchvision():
    code = ("import sys; from memprof.models import model_names; n = model_names(); "
            "print(len(n), [m for m in sys.modules if m.split('.')[0] in ('transformers', 'torchvision')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out[1].strip() == "[]"
    names = [name for name, _, _ in model_names()]
    assert int(out[0]) == len(names) == len(set(names)) == len(TEXT_MODELS) + len(TORCHVISION_CLASSIFIERS)
    assert {family for _, family, _ in model_names()} == {"gpt2", "llama", "bert", "roberta", "t5", "albert",
                                                          "torchvision"}


def test_torchvision_table_equals_the_library():
    import torchvision

    assert sorted(TORCHVISION_CLASSIFIERS) == sorted(torchvision.models.list_models(module=torchvision.models))
    assert len(set(TORCHVISION_CLASSIFIERS)) == len(TORCHVISION_CLASSIFIERS)


@pytest.mark.parametrize("name", list(TEXT_MODELS))
def test_text_builtins_have_published_sizes_on_meta(name):
    built = build_model(name, SMALL, device="meta")
    assert built.config["parameters"] == EXPECTED_PARAMS[name]
    assert built.family == TEXT_MODELS[name].family and built.model.training
    assert all(p.is_meta and p.dtype == torch.float32 for p in built.model.parameters())
    assert built.batch["input_ids"].shape == (2, 8) and built.batch["input_ids"].is_meta
    assert built.config["attn_implementation"] == "sdpa"
    json.dumps(built.config)


def test_gpt2_ties_lm_head_and_keeps_its_sizes():
    built = build_model("gpt2", SMALL, device="meta")
    model = built.model
    assert model.lm_head.weight is model.transformer.wte.weight
    assert built.config["parameters"] == 124_439_808
    assert built.config["hf_config"]["vocab_size"] == 50257 and built.config["hf_config"]["n_positions"] == 1024
    assert built.config["hf_config"]["use_cache"] is False
    assert built.batch["labels"] is built.batch["input_ids"]


def test_torchvision_builds_pass_num_classes_and_image_size():
    assert build_model("resnet50", SMALL, device="meta").config["parameters"] == 25_557_032
    assert build_model("mobilenet_v2", SMALL, device="meta").config["parameters"] == 3_504_872
    # SMMF digest: MobileNetV2 has 2.352M parameters at 100 classes.
    hundred = build_model("mobilenet_v2", ModelOptions(num_classes=100), device="meta")
    assert round(hundred.config["parameters"], -3) == 2_352_000
    # RegNet computes its widths with torch and reads them back: built on meta all the same.
    regnet = build_model("regnet_x_400mf", SMALL, device="meta")
    assert regnet.config["parameters"] == 5_495_976
    assert all(t.is_meta for t in regnet.model.state_dict().values())
    vit = build_model("vit_b_16", ModelOptions(image_size=64, dtype="bfloat16"), device="meta")
    assert vit.model.image_size == 64 and vit.batch["pixel_values"].shape == (2, 3, 64, 64)
    assert vit.batch["pixel_values"].dtype == torch.bfloat16
    assert {p.dtype for p in vit.model.parameters()} == {torch.bfloat16}


def _write_config(tmp_path, **config) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_tiny_gpt2_from_config_json_trains(tmp_path):
    path = _write_config(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=2, n_embd=32,
                         n_head=2, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    rng = torch.get_rng_state()
    built = build_model(path, SMALL)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is left alone
    assert built.family == "hf-config" and built.config["task"] == "causal-lm"
    assert built.model.lm_head.weight is built.model.transformer.wte.weight
    assert built.batch["labels"] is built.batch["input_ids"] and int(built.batch["input_ids"].max()) < 97
    again = build_model(str(tmp_path), SMALL)  # the folder works too, and builds are deterministic
    assert all(torch.equal(a, b) for a, b in zip(built.model.parameters(), again.model.parameters()))
    assert torch.equal(built.batch["input_ids"], again.batch["input_ids"])
    _train_step_ok(built)
    json.dumps(built.config)


TINY_BERT = dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, vocab_size=50, max_position_embeddings=32)


def test_config_json_head_from_architectures_or_model_type(tmp_path):
    built = build_model(_write_config(tmp_path, architectures=["BertForSequenceClassification"], num_labels=3,
                                      **TINY_BERT), SMALL)
    assert built.config["task"] == "sequence-classification"
    assert built.batch["labels"].shape == (2,) and int(built.batch["labels"].max()) < 3
    _train_step_ok(built)


def test_masked_lm_masks_fifteen_percent_and_trains_in_bfloat16(tmp_path):
    # No architectures: a bert model_type gets its masked-LM head (bert-base-uncased's path, tiny sizes).
    path = _write_config(tmp_path, mask_token_id=7, **TINY_BERT)
    built = build_model(path, ModelOptions(batch_size=2, seq_len=20, dtype="bfloat16"))
    assert built.config["class"] == "BertForMaskedLM"
    assert {p.dtype for p in built.model.parameters()} == {torch.bfloat16}
    scored = built.batch["labels"] != -100
    assert scored.sum(dim=1).tolist() == [3, 3]  # round(0.15 * 20) per row
    assert (built.batch["input_ids"][scored] == 7).all()
    _train_step_ok(built)


def test_seq2seq_trains_with_decoder_labels(tmp_path):
    # t5-small's family and head at tiny sizes (full t5-small is checked on meta above).
    path = _write_config(tmp_path, model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=16,
                         d_kv=4, d_ff=32, num_layers=1, num_heads=2, vocab_size=50, decoder_start_token_id=0)
    built = build_model(path, ModelOptions(batch_size=1, seq_len=8))
    assert built.config["task"] == "seq2seq-lm" and built.batch["labels"].shape == (1, 8)
    assert built.model.lm_head.weight is built.model.shared.weight
    _train_step_ok(built)


def test_builtin_batches_on_meta():
    t5 = build_model("t5-small", ModelOptions(batch_size=1, seq_len=8), device="meta")
    assert t5.batch["labels"].shape == (1, 8) and t5.model.lm_head.weight is t5.model.shared.weight
    bert = build_model("bert-base-uncased", ModelOptions(dtype="bfloat16"), device="meta")
    assert {p.dtype for p in bert.model.parameters()} == {torch.bfloat16}
    assert bert.config["class"] == "BertForMaskedLM" and bert.config["hf_config"]["mask_token_id"] == 103


def test_resnet18_trains_and_batch_matches_options():
    built = build_model("resnet18", ModelOptions(batch_size=2, image_size=16, num_classes=10))
    assert built.batch["pixel_values"].shape == (2, 3, 16, 16) and int(built.batch["labels"].max()) < 10
    assert built.model.fc.out_features == 10 and built.model.training
    _train_step_ok(built)


def test_auxiliary_heads_enter_the_loss():
    from memprof.models.vision import classification_loss

    Outputs = namedtuple("Outputs", ["logits", "aux_logits"])
    logits, aux = torch.randn(2, 5), torch.randn(2, 5)
    batch = {"pixel_values": torch.zeros(2, 1), "labels": torch.tensor([1, 4])}
    ce = torch.nn.functional.cross_entropy
    loss = classification_loss(lambda x: Outputs(logits, aux), batch, aux_weight=0.4)
    torch.testing.assert_close(loss, ce(logits, batch["labels"]) + 0.4 * ce(aux, batch["labels"]))


def test_unknown_names_say_what_is_close(tmp_path):
    with pytest.raises(UsageError, match="gpt2") as err:
        build_model("gtp2", SMALL)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="resnet50"):
        build_model("resnet5O", SMALL)
    with pytest.raises(UsageError, match="No such file"):
        build_model(str(tmp_path / "missing.json"), SMALL)


def test_options_are_validated():
    with pytest.raises(UsageError, match="dtype"):
        ModelOptions(dtype="fp8")
    with pytest.raises(UsageError, match="batch_size"):
        ModelOptions(batch_size=0)
    with pytest.raises(UsageError, match="image_size"):
        build_model("inception_v3", ModelOptions(image_size=224), device="meta")
    with pytest.raises(UsageError, match="seq_len"):
        build_model("bert-base-uncased", ModelOptions(seq_len=513), device="meta")


USER_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    def classifier(options):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        n = options.batch_size
        return model, {"input": torch.randn(n, 4, dtype=torch.float64), "labels": torch.tensor([0, 2])[:n]}

    def bare():
        return nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 2))

    def with_loss():
        return nn.Linear(3, 1), torch.ones(2, 3), lambda model, batch: model(batch["input"]).sum()

    def two_inputs():
        return nn.Bilinear(2, 2, 1)
''')


def test_user_file_function(tmp_path):
    path = tmp_path / "mymodels.py"
    path.write_text(USER_FILE)
    built = build_model(f"{path}:classifier", SMALL)
    assert built.family == "user" and built.config["loss"] == "default"
    assert built.batch["input"].dtype == torch.float32  # cast to options.dtype
    loss = _train_step_ok(built)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(
        built.model(built.batch["input"]), built.batch["labels"]))
    bare = build_model(f"{path}:bare", ModelOptions(batch_size=3, seq_len=5))
    assert bare.batch["input"].shape == (3, 5) and int(bare.batch["input"].max()) < 11
    _train_step_ok(bare)
    custom = build_model(f"{path}:with_loss", SMALL)
    assert custom.config["loss"] == "user"
    with torch.no_grad():
        torch.testing.assert_close(custom.loss(custom.model, custom.batch), custom.model(torch.ones(2, 3)).sum())
    with pytest.raises(UsageError, match="cannot make its input"):
        build_model(f"{path}:two_inputs", SMALL)
    with pytest.raises(UsageError, match="classifier"):
        build_model(f"{path}:clasifier", SMALL)
