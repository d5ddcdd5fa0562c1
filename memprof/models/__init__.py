"""memprof's offline model zoo: a name becomes a randomly initialised model and an example batch.

``name`` is one of:

* a built-in name (``model_names()``): GPT-2 and GaLore's LLaMA sizes, BERT, RoBERTa, T5-small,
  ALBERT (``memprof.models.hf``) and every torchvision classifier (``memprof.models.vision``);
* a local HF ``config.json``, or a folder holding one (``memprof.models.hf``);
* ``path/to/file.py:function`` (``memprof.models.user``).

Nothing is ever downloaded. Importing this package and ``model_names()`` load neither
transformers nor torchvision; ``build_model`` imports what the name needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from memprof.errors import UsageError, closest
from memprof.limits import check_name, shorten
from memprof.models.base import SEED, BuiltModel, ModelOptions, parameter_count
from memprof.models.catalog import TEXT_MODELS, TORCHVISION_CLASSIFIERS, model_names

if TYPE_CHECKING:
    import torch

__all__ = ["BuiltModel", "ModelOptions", "build_model", "check_fit_setting", "check_model_name", "is_builtin",
           "model_names"]


def build_model(name: str, options: ModelOptions, device: str | torch.device = "cpu", *,
                fake: bool = False, weights_on_meta: bool = False) -> BuiltModel:
    """Build ``name`` on ``device`` (``"meta"`` works: shapes without memory), in train() mode.

    ``fake``: the caller runs a ``FakeTensorMode``; a fake CUDA model needs no GPU.
    ``weights_on_meta``: the model's parameters and buffers on the meta device, the batch on ``device``
    (FSDP2 shards the model first and materialises this rank's shards: ``memprof.strategies.fsdp2``).
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and not fake and not torch.cuda.is_available():
        raise UsageError(f"Device {device} requested but torch sees no CUDA device")
    cuda_devices = [] if device.type != "cuda" or fake else [
        device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):  # fixed-seed weights; the caller's RNG is left alone
        torch.manual_seed(SEED)  # the same weights on every build on one device type
        quant = _quantization(options, weights_on_meta)
        built = _build(name, options, device, weights_on_meta or quant is not None)  # QLoRA: quantized from meta
        if options.lora:
            from memprof.models import lora

            lora.apply(built, options.lora)
        if quant is not None:
            from memprof.models import quant as quantized

            quantized.apply(built, quant, device)
    built.config.update(
        name=name, family=built.family, parameters=parameter_count(built.model), dtype=options.dtype,
        batch_size=options.batch_size, batch={k: [list(v.shape), str(v.dtype)] for k, v in built.batch.items()},
    )
    _refuse_one_value_per_channel(built.model, name)
    return built


def _quantization(options: ModelOptions, weights_on_meta: bool) -> str | None:
    """The layout ``--lora …,quant=`` asks the frozen base in (None: not quantized)."""
    from memprof.lora import parse, sharding_problem

    problem = sharding_problem(options.lora) if weights_on_meta else None
    if problem:
        raise UsageError(problem)
    return parse(options.lora).quant if options.lora else None


def _refuse_one_value_per_channel(model: torch.nn.Module, name: str) -> None:
    """A training BatchNorm layer that would see one value per channel (batch size 1 on a
    classifier head) stops the run with a usage error at its first forward, instead of torch's
    ValueError inside the measurement."""
    import torch
    from torch import nn

    def check(module: nn.Module, args: tuple, layer: str) -> None:
        x = args[0] if args else None
        if module.training and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() == x.shape[1]:
            raise UsageError(f"{name}: BatchNorm layer {layer} needs more than one value per channel in training "
                             f"and a batch of {x.shape[0]} gives it one; use --batch-size 2 or more")

    for layer, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(lambda m, args, layer=layer: check(m, args, layer))


def _build(name: str, options: ModelOptions, device: torch.device, weights_on_meta: bool) -> BuiltModel:
    if name in TEXT_MODELS:
        from memprof.models import hf

        return hf.build_builtin(name, options, device, weights_on_meta)
    if name in TORCHVISION_CLASSIFIERS:
        from memprof.models import vision

        return vision.build(name, options, device, weights_on_meta)
    if _is_hf_config(name):
        from memprof.models import hf

        return hf.build_from_config_file(Path(name).expanduser(), options, device, weights_on_meta)
    from memprof.models import user

    check_model_name(name)
    return user.build(name, options, device, weights_on_meta)


def stacked_depth(name: str) -> int | None:
    """How many repeated blocks ``name`` stacks where a probe can build fewer (Hugging Face text models
    with one stack), else None."""
    if name in TEXT_MODELS or _is_hf_config(name):
        from memprof.models import hf

        return hf.stacked_depth(name)
    return None


def per_layer_config(name: str) -> dict[str, list]:
    """The lists of one value per block in ``name``'s config (``layer_types``), by attribute, where
    ``stacked_depth`` gives its depth; else empty."""
    if name in TEXT_MODELS or _is_hf_config(name):
        from memprof.models import hf

        return hf.per_layer_config(name)
    return {}


def is_builtin(name: str) -> bool:
    """A zoo model (no file of the user's is read to build it)."""
    return name in TEXT_MODELS or name in TORCHVISION_CLASSIFIERS


def check_model_name(name: str) -> None:
    """Raise ``UsageError`` unless ``build_model`` can resolve ``name``; builds nothing (a ``config.json``
    is read: ``memprof.models.hf.read_config`` bounds its layer counts)."""
    from memprof.models.user import is_user_spec

    check_name(name, "model")
    if _is_hf_config(name):
        from memprof.models import hf

        hf.read_config(Path(name).expanduser())
        return
    if name in TEXT_MODELS or name in TORCHVISION_CLASSIFIERS or is_user_spec(name):
        return
    known = [entry[0] for entry in model_names()]
    raise UsageError(f"unknown model {shorten(name)}; closest: {closest(name, known)} (see `memprof models`; or give a "
                     "local config.json, or path/to/file.py:function)")


def check_fit_setting(name: str, setting: str) -> None:
    """``UsageError`` where ``--fit`` searches a ``setting`` (a ``Settings`` field) that ``name``'s batch does not
    have: the sequence length of a torchvision classifier (the search would double it to its limit, unchanged)."""
    if setting == "seq_len" and name in TORCHVISION_CLASSIFIERS:
        raise UsageError(f"--fit seq-len: {name} is an image classifier, whose batch has no sequence length; "
                         "use --fit batch-size")


def _is_hf_config(name: str) -> bool:
    path = Path(name).expanduser()
    try:
        if name.endswith(".json"):
            if not path.is_file():
                raise UsageError(f"No such file: {path}")
            return True
        return path.is_dir() and (path / "config.json").is_file()
    except OSError as exc:  # a name the file system cannot hold (too long), a folder it may not read
        if not name.endswith(".json"):
            return False  # not a folder: maybe path/to/file.py:function, checked by its own builder
        raise UsageError(f"model {shorten(name)}: {exc.strerror}") from None
