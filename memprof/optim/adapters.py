"""Factories that build library optimizers the way memprof measures them.

Each factory returns the library's own optimizer, unchanged in behaviour (for the Muon family,
two library optimizers stepped as one). It only supplies what the class cannot work out alone
(the param groups of GaLore, Fira and APOLLO, Adam-mini's model dimensions, which parameters
Muon takes), or pins down what the class would otherwise decide silently at step time (torch's
foreach/fused choice), so that the run record says which implementation was measured.
"""

from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.optim.optimizer import _default_to_fused_or_foreach

from memprof.errors import UsageError
from memprof.optim.entry import OptimizerEntry
from memprof.optim.muon_split import ADAMW, MUON, MuonWithAdamW

# torch.optim classes whose functional API turns foreach=None into "foreach when every parameter
# is on a foreach device (CUDA)". torch.optim.Adafactor does not: None means single-tensor.
_FOREACH_BY_DEFAULT: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.SGD)


_RESOLVE_FOR: ContextVar[str | None] = ContextVar("memprof_resolve_for", default=None)


@contextlib.contextmanager
def resolving_for(device_type: str) -> Iterator[None]:
    """Resolve torch's foreach default as on ``device_type`` parameters (a CUDA estimate made on fake
    CPU tensors: ``memprof.measure.cuda_choices``)."""
    token = _RESOLVE_FOR.set(device_type)
    try:
        yield
    finally:
        _RESOLVE_FOR.reset(token)


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
                if _RESOLVE_FOR.get() == "cuda":
                    foreach = not group.get("differentiable", False)
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
    build.builds = cls  # type: ignore[attr-defined] - the class (memprof.optim.registry.entry_of)
    return build


def _from_library(target: str, optimizer: str) -> Any:
    """``module:attribute`` from an optional library, or the registry's one-line "needs X (pip install X)" UsageError."""
    return OptimizerEntry(name=optimizer, target=target, summary="", source="").load()


adam = _pinned(torch.optim.Adam)
adamw = _pinned(torch.optim.AdamW)
sgd = _pinned(torch.optim.SGD)
adafactor = _pinned(torch.optim.Adafactor)


class _LibraryClass:
    """A library optimizer class, imported when first used, that refuses what it would silently ignore.

    Many pytorch_optimizer classes take ``**kwargs`` and drop what they do not know, and some
    check an option only at their first step (or never): a misspelt hyperparameter or a bad
    choice would be measured silently as the default, or crash mid-run. The signature shown
    here leaves out ``**kwargs``, so the registry's key check refuses unknown keys, and
    ``choices`` lists the accepted values of the options the class does not check itself;
    ``check`` raises a UsageError for what the class needs beyond its library.
    """

    def __init__(
        self,
        target: str,
        optimizer: str,
        choices: dict[str, tuple[Any, ...]] | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.target, self.optimizer, self.choices, self.check = target, optimizer, choices or {}, check

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(_from_library(self.target, self.optimizer))
        return signature.replace(
            parameters=[p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        )

    @property
    def builds(self) -> type | None:
        """The class, where its library is imported already (None otherwise: nothing is imported for it)."""
        import sys

        module, _, attr = self.target.partition(":")
        return getattr(sys.modules[module], attr, None) if module in sys.modules else None

    def __call__(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if self.check is not None:
            self.check()
        for key, allowed in self.choices.items():
            if key in kwargs and kwargs[key] not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {kwargs[key]!r}")
        return _from_library(self.target, self.optimizer)(params, **kwargs)


soap = _LibraryClass("pytorch_optimizer:SOAP", "soap", {"data_format": ("channels_first", "channels_last")})
# LayerWiseGrafting NONE..SQRTN and PreConditionerType ALL/INPUT/OUTPUT: an unknown graft silently
# becomes no graft, an unknown preconditioner type fails at the first step.
shampoo = _LibraryClass(
    "pytorch_optimizer:ScalableShampoo", "shampoo", {"graft_type": (0, 1, 2, 3, 4), "pre_conditioner_type": (0, 1, 2)}
)
shampoo_dense = _LibraryClass("pytorch_optimizer:Shampoo", "shampoo_dense")
def _kron_einsum_order() -> None:
    """Kron's einsums need opt_einsum's contraction order: left to right, a V×d weight builds V×d×d."""
    if not torch.backends.opt_einsum.is_available():
        raise UsageError(
            "optimizer 'kron' needs opt_einsum, which is not installed (pip install opt-einsum); without it "
            "torch.einsum contracts left to right and builds a V×d×d tensor for a V×d weight"
        )


# Kron checks memory_save_mode only when it first meets a parameter.
kron = _LibraryClass(
    "pytorch_optimizer:Kron",
    "kron",
    {"memory_save_mode": (None, "one_diag", "smart_one_diag", "all_diag")},
    check=_kron_einsum_order,
)
ademamix = _LibraryClass("pytorch_optimizer:AdEMAMix", "ademamix")
mars = _LibraryClass("pytorch_optimizer:MARS", "mars")
adopt = _LibraryClass("pytorch_optimizer:ADOPT", "adopt")
spam = _LibraryClass("pytorch_optimizer:SPAM", "spam")


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

    Paper ambiguity (GaLore, Fira and APOLLO project "attention and MLP" weights): a generic model
    has no such names. We project every 2-D weight but the embedding tables and the output head
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


def fira(
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
    """pytorch_optimizer's Fira (GaLore's SVD projection plus a full-rank residual term), grouped as ``galore``.

    Defaults follow the Fira LLaMA-60M script (rank 128, gap 200, scale 0.25).
    """
    Fira = _from_library("pytorch_optimizer:Fira", "fira")

    groups = _low_rank_groups(
        model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, projection_type=projection_type
    )
    return Fira(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, foreach=foreach)


def apollo(
    model: nn.Module,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-6,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    projection_type: str = "random",
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """pytorch_optimizer's APOLLO (random projection, channel- or tensor-wise scaling), grouped as ``galore``.

    Defaults are APOLLO's: rank 256, gap 200, channel-wise scaling. ``apollo_mini`` is the same
    factory with rank 1, tensor-wise scaling and scale 128.
    """
    APOLLO = _from_library("pytorch_optimizer:APOLLO", "apollo")

    if scale_type not in ("channel", "tensor"):
        raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")
    groups = _low_rank_groups(
        model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, projection_type=projection_type
    )
    return APOLLO(
        groups, lr=lr, betas=betas, scale_type=scale_type, weight_decay=weight_decay, eps=eps, foreach=foreach
    )


def _output_head(model: nn.Module) -> nn.Module | None:
    """The layer that produces the outputs: ``get_output_embeddings()`` where it gives one, else the last ``nn.Linear``."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    return head


def muon_split(model: nn.Module) -> dict[str, str]:
    """Each trainable parameter's name mapped to ``"muon"`` (a hidden 2-D matrix) or ``"adamw"`` (the rest).

    AdamW takes the embedding tables, the output head (``get_output_embeddings()``, else the
    last ``nn.Linear``) and every parameter that is not 2-D: biases, norm gains, conv kernels.
    """
    head = _output_head(model)
    plain = {id(p) for p in _embedding_weights(model)} | {id(p) for p in (head.parameters() if head is not None else ())}
    return {
        name: MUON if p.dim() == 2 and id(p) not in plain else ADAMW
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _muon_with_adamw(
    model: nn.Module,
    build_hidden: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    hidden_defaults: dict[str, Any],
    adamw_kwargs: dict[str, Any],
) -> MuonWithAdamW:
    """Split ``model`` with ``muon_split`` and build each non-empty side (AdamW: torch's, implementation pinned)."""
    split = muon_split(model)
    params = dict(model.named_parameters())
    sides = {side: [params[n] for n, s in split.items() if s == side] for side in (MUON, ADAMW)}
    parts: dict[str, torch.optim.Optimizer] = {}
    if sides[MUON]:
        parts[MUON] = build_hidden(sides[MUON])
    if sides[ADAMW]:
        parts[ADAMW] = adamw(
            sides[ADAMW],
            lr=adamw_kwargs["adamw_lr"],
            betas=adamw_kwargs["adamw_betas"],
            weight_decay=adamw_kwargs["adamw_wd"],
            eps=adamw_kwargs["adamw_eps"],
        )
    if not parts:
        raise ValueError("the model has no trainable parameters")
    defaults = {**hidden_defaults, **adamw_kwargs}
    if ADAMW in parts:
        defaults["adamw_implementation"] = parts[ADAMW].defaults["implementation"]
    return MuonWithAdamW(parts, split, defaults)


def muon(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    adamw_lr: float = 3e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_wd: float = 0.0,
    adamw_eps: float = 1e-10,
) -> MuonWithAdamW:
    """Muon on the hidden 2-D matrices, AdamW on the rest (``muon_split``), as one optimizer.

    The Muon side is ``torch.optim.Muon`` (torch >= 2.9) with torch's defaults, else
    pytorch_optimizer's ``Muon`` on a single ``use_muon`` group (``adjust_lr_fn`` "match_rms_adamw"
    becomes its ``use_adjusted_lr``). The AdamW side is ``torch.optim.AdamW`` with Keller Jordan's
    recipe (lr 3e-4, betas (0.9, 0.95), no weight decay, eps 1e-10), as pytorch_optimizer's Muon
    defaults its AdamW groups.
    """
    hidden = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
    if hasattr(torch.optim, "Muon"):
        library = "torch.optim"

        def build_hidden(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return torch.optim.Muon(params, adjust_lr_fn=adjust_lr_fn, **hidden)
    else:
        Muon = _from_library("pytorch_optimizer:Muon", "muon")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} needs torch.optim.Muon (torch >= 2.9)")
        library = "pytorch_optimizer"

        def build_hidden(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            groups = [{"params": params, "use_muon": True}]
            return Muon(groups, use_adjusted_lr=adjust_lr_fn == "match_rms_adamw", **hidden)

    adamw_kwargs = dict(adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_wd=adamw_wd, adamw_eps=adamw_eps)
    defaults = {**hidden, "adjust_lr_fn": adjust_lr_fn, "muon_library": library}
    return _muon_with_adamw(model, build_hidden, defaults, adamw_kwargs)


def adamuon(
    model: nn.Module,
    lr: float = 2e-2,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    ns_steps: int = 5,
    use_adjusted_lr: bool = True,
    eps: float = 1e-10,
    adamw_lr: float = 3e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_wd: float = 0.0,
    adamw_eps: float = 1e-10,
) -> MuonWithAdamW:
    """pytorch_optimizer's AdaMuon on the hidden 2-D matrices (library defaults), AdamW on the rest, as ``muon``."""
    AdaMuon = _from_library("pytorch_optimizer:AdaMuon", "adamuon")

    hidden = dict(
        lr=lr, betas=betas, weight_decay=weight_decay, ns_steps=ns_steps, use_adjusted_lr=use_adjusted_lr, eps=eps
    )

    def build_hidden(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return AdaMuon([{"params": params, "use_muon": True}], **hidden)

    adamw_kwargs = dict(adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_wd=adamw_wd, adamw_eps=adamw_eps)
    return _muon_with_adamw(model, build_hidden, {**hidden, "muon_library": "pytorch_optimizer"}, adamw_kwargs)


def normuon(
    model: nn.Module,
    lr: float = 2e-2,
    momentum: float = 0.95,
    beta2: float = 0.95,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    ns_steps: int = 5,
    update_scale: str = "preserve_norm",
    use_adjusted_lr: bool = False,
    eps: float = 1e-10,
    adamw_lr: float = 3e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_wd: float = 0.0,
    adamw_eps: float = 1e-10,
) -> MuonWithAdamW:
    """pytorch_optimizer's NorMuon on the hidden 2-D matrices (library defaults), AdamW on the rest, as ``muon``."""
    NorMuon = _from_library("pytorch_optimizer:NorMuon", "normuon")

    hidden = dict(
        lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps,
        update_scale=update_scale, use_adjusted_lr=use_adjusted_lr, eps=eps,
    )

    def build_hidden(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return NorMuon([{"params": params, "use_muon": True}], **hidden)

    adamw_kwargs = dict(adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_wd=adamw_wd, adamw_eps=adamw_eps)
    return _muon_with_adamw(model, build_hidden, {**hidden, "muon_library": "pytorch_optimizer"}, adamw_kwargs)


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
