"""Factories that build library optimizers the way memprof measures them.

Each factory returns the library's own optimizer, unchanged in behaviour. It only supplies what
the class cannot work out alone (GaLore's param groups, Adam-mini's model dimensions), or pins
down what the class would otherwise decide silently at step time (torch's foreach/fused choice),
so that the run record says which implementation was measured.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.optimizer import _default_to_fused_or_foreach

from memprof.optim.entry import OptimizerEntry

# torch.optim classes whose functional API turns foreach=None into "foreach when every parameter
# is on a foreach device (CUDA)". torch.optim.Adafactor does not: None means single-tensor.
_FOREACH_BY_DEFAULT: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.SGD)


def implementation(optimizer: torch.optim.Optimizer) -> str:
    """Name of the update implementation a pinned torch optimizer runs: fused, foreach or single-tensor."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    return "foreach" if group.get("foreach") else "single-tensor"


def pin_implementation(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Replace ``foreach=None`` / ``fused=None`` by what torch resolves them to on these parameters.

    Uses torch's own rule (``_default_to_fused_or_foreach`` with ``use_fused=False``, and Adam's
    "no foreach with a Tensor lr unless capturable"), evaluated at construction on the same
    parameters the step will see, so the update that runs is the one torch would have chosen.
    ``optimizer.defaults`` then holds booleans and ``implementation`` (fused, foreach or
    single-tensor), which the run record's hyperparameters show.
    """
    for group in optimizer.param_groups:
        fused = bool(group.get("fused"))
        foreach = group.get("foreach")
        if foreach is None:
            foreach = False
            # torch picks a default only when neither is given: an explicit fused=False means single-tensor.
            if group.get("fused") is None and isinstance(optimizer, _FOREACH_BY_DEFAULT):
                _, foreach = _default_to_fused_or_foreach(
                    group["params"], group.get("differentiable", False), use_fused=False
                )
                if isinstance(optimizer, torch.optim.Adam) and isinstance(group["lr"], torch.Tensor):
                    foreach = foreach and group.get("capturable", False)
        group["foreach"] = bool(foreach)
        if "fused" in group:
            group["fused"] = fused
    for key in ("foreach", "fused"):
        if key in optimizer.defaults:
            optimizer.defaults[key] = optimizer.param_groups[0][key]
    optimizer.defaults["implementation"] = implementation(optimizer)
    return optimizer


def _pinned(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    """A factory with ``cls``'s signature that builds it and pins its implementation."""

    def build(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return pin_implementation(cls(params, **kwargs))

    build.__signature__ = inspect.signature(cls)  # type: ignore[attr-defined]
    build.__doc__ = f"{cls.__module__}.{cls.__qualname__} with foreach/fused resolved at construction."
    build.__name__ = build.__qualname__ = cls.__name__
    return build


def _from_library(target: str, optimizer: str) -> Any:
    """``module:attribute`` from an optional library, or the registry's one-line "needs X (pip install X)" UsageError."""
    return OptimizerEntry(name=optimizer, target=target, summary="", source="").load()


adam = _pinned(torch.optim.Adam)
adamw = _pinned(torch.optim.AdamW)
sgd = _pinned(torch.optim.SGD)
adafactor = _pinned(torch.optim.Adafactor)


def _embedding_weights(model: nn.Module) -> set[nn.Parameter]:
    """Embedding tables and the output head: GaLore's own scripts leave them unprojected."""
    found = {m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            found.add(module.weight)
    return found


def _low_rank_groups(model: nn.Module, **group_keys: Any) -> list[dict[str, Any]]:
    """Param groups for GaLore-style optimizers: every 2-D weight but embeddings and the head carries ``group_keys``.

    Paper ambiguity (GaLore projects "attention and MLP" weights): a generic model has no such
    names. We project every 2-D weight but the embedding tables and the output head
    (the official scripts leave those plain too), so a LLaMA gets exactly attn+mlp projected.
    Every other parameter (biases, norms, conv kernels, embeddings) is in a plain group.
    """
    if group_keys["rank"] < 1:
        raise ValueError(f"Invalid rank: {group_keys['rank']}")
    if group_keys["update_proj_gap"] < 1:
        raise ValueError(f"Invalid update_proj_gap: {group_keys['update_proj_gap']}")
    skipped = _embedding_weights(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    projected = [p for p in trainable if p.dim() == 2 and p not in skipped]
    plain = [p for p in trainable if p.dim() != 2 or p in skipped]
    groups: list[dict[str, Any]] = []
    if plain:
        groups.append({"params": plain})
    if projected:
        groups.append({"params": projected, **group_keys})
    return groups


def galore(
    model: nn.Module,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-6,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    projection_type: str = "std",
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """pytorch_optimizer's GaLore with every 2-D weight projected, except embeddings and the output head.

    Two param groups: the projected 2-D weights carry ``rank``, ``update_proj_gap``, ``scale``
    and ``projection_type``; every other parameter (biases, norms, conv kernels, embeddings) gets
    plain AdamW state. Defaults follow the GaLore README (rank 128, gap 200, scale 0.25).
    """
    GaLore = _from_library("pytorch_optimizer:GaLore", "galore")

    groups = _low_rank_groups(
        model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, projection_type=projection_type
    )
    return GaLore(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, foreach=foreach)


def _config_dims(model: nn.Module) -> dict[str, int]:
    """Hidden size, attention heads and KV heads from a transformers config, where present."""
    config = getattr(model, "config", None)
    dims = {
        "num_embeds": getattr(config, "hidden_size", None),
        "num_heads": getattr(config, "num_attention_heads", None),
        "num_query_groups": getattr(config, "num_key_value_heads", None),
    }
    return {key: value for key, value in dims.items() if isinstance(value, int)}


def adam_mini(
    model: nn.Module,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    num_embeds: int | None = None,
    num_heads: int | None = None,
    num_query_groups: int | None = None,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """pytorch_optimizer's AdamMini on ``model``'s named parameters, sized from ``model.config``.

    ``num_embeds``/``num_heads``/``num_query_groups`` default to the config's ``hidden_size``,
    ``num_attention_heads`` and ``num_key_value_heads``; a model without a config gets the
    library's defaults (2048 and 32), which only matter for parameters named like q/k projections.
    """
    AdamMini = _from_library("pytorch_optimizer:AdamMini", "adam_mini")

    dims = _config_dims(model)
    given = {"num_embeds": num_embeds, "num_heads": num_heads, "num_query_groups": num_query_groups}
    dims.update({key: value for key, value in given.items() if value is not None})
    return AdamMini(model, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, foreach=foreach, **dims)
