"""The ``--lora`` setting's text: ``r=8,alpha=16,targets=q_proj+v_proj,dropout=0.05,quant=nf4``.

Keys are separated by commas, target module names by ``+`` (a comma already separates the keys, and ``+``
needs no quoting in a shell, a CSV cell or a TOML string). ``targets`` is ``all-linear`` (PEFT's shorthand:
every linear layer but the output head) or module names as PEFT matches them (a name or the tail of a dotted
path); without it PEFT's default targets for the model's architecture apply. ``quant`` makes it QLoRA: the
frozen base quantized (``nf4``: 4-bit NormalFloat with double quantization; ``int8``: 8-bit with a scale per
row), in the layout ``memprof.models.quant`` documents. A quantized base without adapters trains nothing,
so quantization is a key of ``--lora``, not a setting of its own.

Parsed without torch or PEFT (``memprof --help`` and settings validation read it); applied by
``memprof.models.lora``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memprof.limits import shorten

KEYS = ("r", "alpha", "dropout", "targets", "quant")
QUANT = ("nf4", "int8")
ALL_LINEAR = "all-linear"
FLAG = "--lora"
_MODULE_NAME = re.compile(r"^\w+(\.\w+)*$")


class LoraTextError(ValueError):
    """What is wrong with a ``--lora`` text, in one line naming the valid choices."""


@dataclass(frozen=True)
class LoraRequest:
    """A parsed ``--lora``: PEFT's ``r``, ``lora_alpha`` and ``lora_dropout`` (None: PEFT's default), the
    targets (None: PEFT's default for the architecture) and the base's quantization (None: not quantized)."""

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] | str | None = None  # names, ALL_LINEAR, or None
    quant: str | None = None


def parse(text: str) -> LoraRequest:
    """The request a ``--lora`` text makes; ``LoraTextError`` on anything else."""
    values: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise LoraTextError(f"{FLAG} {shorten(text)}: expected key=value items separated by commas, got "
                                f"{shorten(item.strip())} (keys: {', '.join(KEYS)}; target modules joined by '+': "
                                "r=8,alpha=16,targets=q_proj+v_proj)")
        if key not in KEYS:
            raise LoraTextError(f"{FLAG}: unknown key {shorten(key)}; valid keys: {', '.join(KEYS)}")
        if key in values:
            raise LoraTextError(f"{FLAG}: {key} is given twice; give each key once")
        values[key] = value
    request = LoraRequest(
        r=_integer(values["r"]) if "r" in values else LoraRequest.r,
        alpha=_number("alpha", values["alpha"], positive=True) if "alpha" in values else None,
        dropout=_dropout(values["dropout"]) if "dropout" in values else 0.0,
        targets=_targets(values["targets"]) if "targets" in values else None,
        quant=_quant(values["quant"]) if "quant" in values else None,
    )
    return request


def problem(text: str) -> str | None:
    """What is wrong with a ``--lora`` text (the settings' check), or None."""
    try:
        parse(text)
    except LoraTextError as exc:
        return str(exc)
    return None


def sharding_problem(text: str | None) -> str | None:
    """Why a strategy that builds on the meta device and shards it (FSDP2) cannot run this ``--lora`` (None when
    it can): a quantized base is not sharded."""
    quant = parse(text).quant if text else None
    if quant is None:
        return None
    return (f"{FLAG} quant={quant} cannot be sharded by FSDP2 here: it shards a quantized base only when the codes "
            "are stored in the parameters' dtype (bitsandbytes' quant_storage, FSDP-QLoRA), which memprof does not "
            "model; use --parallel ddp or deepspeed-zero3, or drop quant=")


def _integer(text: str) -> int:
    if not re.fullmatch(r"[+-]?\d{1,9}", text):
        raise LoraTextError(f"{FLAG}: r must be a positive integer (the adapters' rank), got {shorten(text)}")
    value = int(text)
    if value <= 0:
        raise LoraTextError(f"{FLAG}: r must be a positive integer (the adapters' rank), got {value}")
    return value


def _number(key: str, text: str, *, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")) or (positive and value <= 0):
        raise LoraTextError(f"{FLAG}: {key} must be a {'positive ' if positive else ''}number, got {shorten(text)}")
    return value


def _dropout(text: str) -> float:
    value = _number("dropout", text, positive=False)
    if not 0 <= value < 1:
        raise LoraTextError(f"{FLAG}: dropout must be at least 0 and below 1, got {shorten(text)}")
    return value


def _targets(text: str) -> tuple[str, ...] | str:
    if text.lower() == ALL_LINEAR:
        return ALL_LINEAR
    names = tuple(name.strip() for name in text.split("+"))
    for name in names:
        if not _MODULE_NAME.match(name):
            raise LoraTextError(f"{FLAG}: targets must be {ALL_LINEAR} or module names joined by '+' "
                                f"(e.g. targets=q_proj+v_proj), got {shorten(name)}")
    if len(set(names)) != len(names):
        raise LoraTextError(f"{FLAG}: targets names a module twice in {shorten(text)}; name each once")
    return names


def _quant(text: str) -> str:
    if text not in QUANT:
        raise LoraTextError(f"{FLAG}: unknown quant {shorten(text)}; choose {', '.join(QUANT)} (QLoRA's 4-bit NormalFloat, "
                            "or 8-bit), or leave quant out for a base in --dtype")
    return text
