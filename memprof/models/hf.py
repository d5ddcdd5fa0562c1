"""Hugging Face transformers models from configs only: built-in sizes or a local ``config.json``.

Choices, the same for every HF model memprof builds:

* Random init with ``Auto*.from_config``; nothing is downloaded (``local_files_only=True``).
* Built directly on the target device and in the target dtype (``with torch.device(device)`` and
  ``dtype=``), so a large model never passes through CPU memory or through fp32.
* Attention: transformers' own default, ``"sdpa"`` where the class supports it (the realistic
  training default), else ``"eager"``; recorded in ``config["attn_implementation"]``.
* Mixture-of-experts layers: transformers' default experts implementation, ``"grouped_mm"`` (one
  ``torch._grouped_mm`` per projection, as on CPU and on CUDA from sm80; an estimate's fake tensors get
  its shape from ``memprof.measure.fake_kernels``); recorded in ``config["experts_implementation"]``.
* Dropout stays at the library/config defaults; ``use_cache=False`` (no KV cache in training).
* Tied weights stay tied (GPT-2 ``wte``/``lm_head``, T5 and the masked-LM decoders).
* BERT, RoBERTa and ALBERT use their masked-LM heads (the pre-training objective; every weight of
  the checkpoint, bar BERT's pooler, gets a gradient). For GLUE-style fine-tuning pass a
  ``config.json`` whose ``architectures`` names ``*ForSequenceClassification``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from transformers.models.auto import modeling_auto

from memprof.errors import UsageError
from memprof.models.base import SEED, BuiltModel, ModelOptions, move_batch, outside_dispatch_modes
from memprof.models.catalog import TEXT_MODELS

# Task -> (Auto class, model-type -> class-name mapping used to recognise `architectures`).
TASKS: dict[str, tuple[Any, dict[str, Any]]] = {
    "seq2seq-lm": (transformers.AutoModelForSeq2SeqLM, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    "masked-lm": (transformers.AutoModelForMaskedLM, modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    "causal-lm": (transformers.AutoModelForCausalLM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "sequence-classification": (transformers.AutoModelForSequenceClassification,
                                modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
}

# Built-in family -> (config class, task).
FAMILIES: dict[str, tuple[type[transformers.PretrainedConfig], str]] = {
    "gpt2": (transformers.GPT2Config, "causal-lm"),
    "llama": (transformers.LlamaConfig, "causal-lm"),
    "bert": (transformers.BertConfig, "masked-lm"),
    "roberta": (transformers.RobertaConfig, "masked-lm"),
    "t5": (transformers.T5Config, "seq2seq-lm"),
    "albert": (transformers.AlbertConfig, "masked-lm"),
}

MASK_FRACTION = 0.15  # masked-LM: share of positions replaced by the mask token and scored (BERT's rate)


def build_builtin(name: str, options: ModelOptions, device: torch.device,
                  weights_on_meta: bool = False) -> BuiltModel:
    """Build a built-in text model (a key of ``TEXT_MODELS``); ``weights_on_meta`` as ``build_model``'s."""
    spec = TEXT_MODELS[name]
    if spec.max_seq_len is not None and options.seq_len > spec.max_seq_len:
        raise UsageError(f"Invalid seq_len: {options.seq_len} ({name} has learned positions for {spec.max_seq_len})")
    return _build(name, spec.family, _builtin_config(name), FAMILIES[spec.family][1], options, device,
                  weights_on_meta)


def _builtin_config(name: str) -> transformers.PretrainedConfig:
    spec = TEXT_MODELS[name]
    return FAMILIES[spec.family][0](**spec.config)


def stacked_depth(name: str) -> int | None:
    """How many repeated blocks the text model ``name`` (built-in or a ``config.json``) stacks, or None
    where its depth is not one number (an encoder-decoder has two stacks)."""
    config = _config_of(name)
    depth = getattr(config, "num_hidden_layers", None)
    return depth if isinstance(depth, int) and not config.is_encoder_decoder else None


def per_layer_config(name: str) -> dict[str, list]:
    """The config's lists of one value per block (``layer_types``), by attribute: a probe of fewer blocks
    takes the first values of each (``memprof.measure.depth``)."""
    return _per_layer(_config_of(name))


def _per_layer(config: transformers.PretrainedConfig) -> dict[str, list]:
    depth = getattr(config, "num_hidden_layers", None)
    return {key: value for key, value in vars(config).items() if isinstance(value, list) and len(value) == depth}


def _config_of(name: str) -> transformers.PretrainedConfig:
    return _builtin_config(name) if name in TEXT_MODELS else read_config(Path(name).expanduser())


MAX_LAYERS = 10_000
"""The most layers a ``config.json`` may give one stack: ten times the deepest transformer trained
(DeepNet's 1,000), and a bound on the time to build or estimate it (10,000 blocks of GPT-2's with
width 64: about 30 s to estimate on one core; time grows faster than the depth beyond)."""

LAYER_COUNT = re.compile(r"(n|num)_(\w+_)?layers?|(encoder|decoder)_layers")
"""Config keys that count layers: n_layer, num_hidden_layers, num_layers, num_decoder_layers, encoder_layers…"""


def read_config(path: Path) -> transformers.PretrainedConfig:
    """The config of a local ``config.json`` (or a folder holding one); one unreadable, or counting layers
    outside 0 to ``MAX_LAYERS``, is a usage error."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise UsageError(f"Cannot read HF config {path}: {str(err).splitlines()[0]}") from None
    for key, layers in _layer_counts(config.to_dict()):
        if not 0 <= layers <= MAX_LAYERS:
            raise UsageError(f"{path}: {key}={layers:,} is outside the layer counts memprof builds (0 to "
                             f"{MAX_LAYERS:,}, ten times the deepest transformer trained); give a count in that range")
    return config


def _layer_counts(config: dict, prefix: str = "") -> Iterator[tuple[str, int]]:
    """Every layer count of a config's dict (``LAYER_COUNT``), its sub-configs' (``text_config.…``) included."""
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _layer_counts(value, f"{prefix}{key}.")
        elif isinstance(value, int) and not isinstance(value, bool) and LAYER_COUNT.fullmatch(key):
            yield prefix + key, value


def build_from_config_file(path: Path, options: ModelOptions, device: torch.device,
                           weights_on_meta: bool = False) -> BuiltModel:
    """Build from a local ``config.json`` (or a folder holding one).

    The head comes from the config's ``architectures`` when one of them is a causal-LM, seq2seq-LM,
    masked-LM or sequence-classification class; without it, encoder-decoder configs get a seq2seq
    LM, model types with a masked-LM head get that, and the rest a causal LM. A ``seq_len`` longer
    than the model's learned absolute positions (``learned_positions``) is a usage error.
    """
    config = read_config(path)
    built = _build(str(path), "hf-config", config, _task_of(config, path), options, device, weights_on_meta)
    limit = learned_positions(built.model)
    if limit is not None and options.seq_len > limit:
        raise UsageError(f"--seq-len {options.seq_len} is longer than {path} allows: its model has learned "
                         f"positions for {limit} tokens; use --seq-len {limit} or less")
    return built


POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions")
"""Names transformers gives learned absolute position tables (GPT-2/GPT-Neo, BERT family, OPT/BART)."""


def learned_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence a model's learned absolute position tables hold (None: no such table;
    rotary and relative positions have no limit). Rows before the first position (a padding index,
    OPT's and BART's offset of 2) do not count."""
    if getattr(model.config, "position_embedding_type", "absolute") != "absolute":
        return None
    limits = [module.num_embeddings - getattr(module, "offset", 0)
              - (module.padding_idx + 1 if module.padding_idx is not None else 0)
              for name, module in model.named_modules()
              if isinstance(module, torch.nn.Embedding) and name.rpartition(".")[2] in POSITION_TABLES]
    return min(limits, default=None)


def _task_of(config: transformers.PretrainedConfig, path: Path) -> str:
    for architecture in config.architectures or ():
        for task, (_, names) in TASKS.items():
            if any(architecture == n or (isinstance(n, tuple) and architecture in n) for n in names.values()):
                return task
    if config.is_encoder_decoder and config.model_type in TASKS["seq2seq-lm"][1]:
        return "seq2seq-lm"
    for task in ("masked-lm", "causal-lm"):
        if config.model_type in TASKS[task][1]:
            return task
    raise UsageError(f"No supported head for {path} (model_type {config.model_type!r}, architectures "
                     f"{config.architectures}); memprof builds: {', '.join(TASKS)}")


def _build(name: str, family: str, config: transformers.PretrainedConfig, task: str,
           options: ModelOptions, device: torch.device, weights_on_meta: bool) -> BuiltModel:
    auto_class, _ = TASKS[task]
    config.use_cache = False
    if options.blocks is not None:  # a probe of memprof.measure.depth: the first ``blocks`` blocks
        for key, values in _per_layer(config).items():
            setattr(config, key, values[: options.blocks])
        config.num_hidden_layers = options.blocks
    with outside_dispatch_modes(weights_on_meta), torch.device("meta" if weights_on_meta else device):
        model = auto_class.from_config(config, dtype=options.torch_dtype)
    if task == "causal-lm" and getattr(model, "loss_type", None) is None:
        # transformers picks the loss from the class name; GPT2LMHeadModel matches none, so every
        # run logged "`loss_type=None` ... Using the default loss: `ForCausalLMLoss`". We name that
        # same loss: the numbers are unchanged and the note, not about the user's run, goes away.
        model.loss_type = "ForCausalLM"
    model.train()
    text_config = model.config.get_text_config()
    batch = _batch(task, text_config, options, device)
    record = {
        "class": type(model).__name__,
        "task": task,
        "attn_implementation": model.config._attn_implementation,
        "vocab_size": text_config.vocab_size,
        "seq_len": options.seq_len,
        "hf_config": json.loads(model.config.to_json_string(use_diff=False)),
    }
    if getattr(model, "_can_set_experts_implementation", lambda: False)():  # a mixture of experts (transformers 5)
        record["experts_implementation"] = model.config._experts_implementation
    return BuiltModel(name=name, family=family, model=model, batch=batch, loss=hf_loss, config=record)


def hf_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss transformers computes from ``labels`` (shifted inside for causal LMs)."""
    return model(**batch).loss


def _batch(task: str, config: transformers.PretrainedConfig, options: ModelOptions,
           device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids from a fixed-seed CPU generator (the same batch on every device), then moved.

    causal-lm: ``labels`` is ``input_ids`` itself (one storage; transformers shifts it).
    masked-lm: ``round(0.15 * seq_len)`` positions per row (at least one) become the mask token and
    are the only scored labels (-100 elsewhere). seq2seq-lm: decoder ``labels`` of length seq_len.
    sequence-classification: one class per row (a float target when ``num_labels == 1``).
    """
    gen = torch.Generator().manual_seed(SEED)
    shape = (options.batch_size, options.seq_len)
    input_ids = torch.randint(0, config.vocab_size, shape, generator=gen)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(shape, dtype=torch.long)}
    if task == "causal-lm":
        batch["labels"] = input_ids
    elif task == "masked-lm":
        n_masked = max(1, round(MASK_FRACTION * options.seq_len))
        positions = torch.rand(shape, generator=gen).argsort(dim=1)[:, :n_masked]
        labels = torch.full(shape, -100, dtype=torch.long)
        labels.scatter_(1, positions, input_ids.gather(1, positions))
        mask_token_id = getattr(config, "mask_token_id", None)
        if mask_token_id is not None:  # a config.json may not name its mask token: keep the ids then
            input_ids.scatter_(1, positions, mask_token_id)
        batch["labels"] = labels
    elif task == "seq2seq-lm":
        batch["labels"] = torch.randint(0, config.vocab_size, shape, generator=gen)
    elif config.num_labels == 1:
        batch["labels"] = torch.randn(options.batch_size, generator=gen).to(options.torch_dtype)
    else:
        batch["labels"] = torch.randint(0, config.num_labels, (options.batch_size,), generator=gen)
    return move_batch(batch, device)
