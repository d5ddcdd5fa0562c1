"""``--lora``: LoRA adapters injected by PEFT (the library people fine-tune with) into a built model.

``peft.inject_adapter_in_model`` with a ``peft.LoraConfig`` replaces each targeted layer by PEFT's LoRA
layer in place (parameter names keep their paths: ``….c_attn.base_layer.weight`` and
``….c_attn.lora_A.default.weight``), freezes every other parameter (``requires_grad`` False: no gradient,
no optimizer state) and, as ``get_peft_model`` does, casts bf16/fp16 adapters to fp32. The optimizer is then
built on the trainable parameters alone (``memprof.optim.registry.build_optimizer``). Applied the same way at
every depth (a depth probe's shallow model), on the meta device (FSDP2 shards the adapted model) and on fake
tensors. With ``quant`` the frozen base is quantized afterwards (``memprof.models.quant``).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from memprof.errors import UsageError
from memprof.lora import ALL_LINEAR, FLAG, LoraRequest, parse
from memprof.models.base import outside_dispatch_modes

if TYPE_CHECKING:
    from memprof.models.base import BuiltModel

ADAPTABLE = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d")
"""Layer classes PEFT's LoRA adapts (by class name: transformers' ``Conv1D`` is GPT-2's linear layer)."""


def apply(built: "BuiltModel", text: str) -> None:
    """Inject the adapters ``text`` asks for into ``built.model`` (in place) and say so in its config and notes."""
    request = parse(text)
    try:
        with outside_dispatch_modes():  # PEFT makes tensors as it is imported: real ones, untracked
            import peft
    except ImportError:
        raise UsageError(f"{FLAG} needs PEFT, which is not installed: pip install 'memprof[lora]' "
                         "(or pip install peft)") from None
    model = built.model
    targets = _targets(model, request, built.name)
    config = peft.LoraConfig(r=request.r, lora_dropout=request.dropout, target_modules=targets, bias="none",
                             **({"lora_alpha": request.alpha} if request.alpha is not None else {}))
    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}
    with warnings.catch_warnings(), outside_dispatch_modes():  # adapters on the meta device, then materialised
        # PEFT turns fan_in_fan_out on for transformers' Conv1D (GPT-2) itself, and says so each time.
        warnings.filterwarnings("ignore", message=r".*fan_in_fan_out.*")
        try:
            peft.inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
        except ValueError as exc:  # a target PEFT cannot adapt
            raise UsageError(f"{FLAG}: {_first_line(exc)} (layers LoRA adapts here: {_adaptable(model)})") from None
    materialise_adapters(model)
    adapted = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if hasattr(m, "lora_A")})
    count = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    built.config["lora"] = {"r": request.r, "alpha": config.lora_alpha, "dropout": request.dropout,
                            "targets": adapted, "adapted_layers": count, "trainable_parameters": trainable,
                            "peft": peft.__version__}
    built.notes.append(f"LoRA (PEFT {peft.__version__}): rank {request.r} adapters on {count} layers "
                       f"({', '.join(adapted)}); {trainable:,} of {total:,} parameters trained, the frozen base has "
                       "no gradient and no optimizer state" + _frozen_note(frozen_before))


def materialise_adapters(model: torch.nn.Module) -> None:
    """Give the adapters PEFT made on the meta device (``low_cpu_mem_usage``, with the dispatch modes set aside)
    storage beside their base layer's weight, made under the run's modes (its tracker, an estimate's fake
    tensors) and initialised by PEFT (``reset_lora_parameters``). PEFT's own placement (``module.to``) cannot
    move an estimate's fake parameters, which torch only swaps; a base on the meta device keeps them there."""
    for module in model.modules():
        if not hasattr(module, "reset_lora_parameters"):
            continue
        device = next(module.get_base_layer().parameters()).device
        if device.type == "meta":
            continue
        for owner in module.modules():
            for key, param in list(owner._parameters.items()):
                if param is not None and param.device.type == "meta":
                    owner._parameters[key] = torch.nn.Parameter(torch.empty_like(param, device=device),
                                                                requires_grad=param.requires_grad)
        with torch.no_grad():
            for adapter in module.active_adapters:
                module.reset_lora_parameters(adapter, True)  # PEFT's default init (init_lora_weights=True)


def _targets(model: torch.nn.Module, request: LoraRequest, model_name: str) -> list[str] | str:
    """PEFT's ``target_modules``: ``all-linear``, the names asked for (each must name a layer of the model),
    or PEFT's default for the architecture (a usage error where PEFT has none)."""
    if request.targets == ALL_LINEAR:
        if not any(type(m).__name__ in ("Linear", "Conv1D") for m in model.modules()):
            raise UsageError(f"{FLAG} targets={ALL_LINEAR}: {model_name} has no linear layer; layers LoRA "
                             f"adapts here: {_adaptable(model)}")
        return ALL_LINEAR
    if request.targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULTS:
            raise UsageError(f"{FLAG}: PEFT has no default targets for {model_name}; give targets={ALL_LINEAR} or "
                             f"layer names joined by '+' from: {_adaptable(model)}")
        return list(DEFAULTS[model_type])
    names = [name for name, _ in model.named_modules()]
    for target in request.targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise UsageError(f"{FLAG} targets: {model_name} has no layer named {target!r}; layers LoRA adapts here: "
                             f"{_adaptable(model)} (or targets={ALL_LINEAR})")
    return list(request.targets)


def _adaptable(model: torch.nn.Module) -> str:
    """The names (last path element) of the model's layers LoRA can adapt, in model order."""
    found = dict.fromkeys(name.rpartition(".")[2] for name, m in model.named_modules()
                          if name and type(m).__name__ in ADAPTABLE)
    return ", ".join(found) if found else "none"


def _frozen_note(frozen_before: set[str]) -> str:
    return f" (the model froze {len(frozen_before)} parameters itself)" if frozen_before else ""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
