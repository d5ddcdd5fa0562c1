"""Activation checkpointing (``--checkpointing``), applied to a built model with the engines people use.

* ``full``: every repeated block is recomputed in backward. A Hugging Face model gets its own activation
  checkpointing (``activation_checkpointing_enable``, or ``gradient_checkpointing_enable`` where the
  installed transformers has only that), non-reentrant; any other model gets torch's
  ``apply_activation_checkpointing`` with a non-reentrant ``checkpoint_wrapper`` on its blocks
  (``repeated_blocks``).
* ``selective``: op-level selective checkpointing in every block, through ``torch.utils.checkpoint``'s
  ``create_selective_checkpoint_contexts`` with a save list like torchtitan's (``SAVED_OPS``: matmul,
  attention and convolution outputs saved, everything else recomputed).
* ``every:N``: blocks 0, N, 2N… fully checkpointed, the others keep their activations (transformers'
  ``every_n_layers`` convention, used for every model).

What the capture sees (``memprof.measure.attribution``): the block inputs that checkpoint keeps reach
memprof's saved-tensor hook (activations); the outputs that selective checkpointing keeps are stored by
its dispatch mode outside autograd's hooks, so ``_SavedOutputs`` tags them as saved activations too; each
recomputation in backward runs inside ``Capture.recomputing``, whose allocations are told apart there.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass_type
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from memprof.errors import UsageError
from memprof.settings import checkpointing_every


def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_mm")
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


SAVED_OPS = _saved_ops()
"""The ops whose outputs selective checkpointing keeps (torchtitan's list: matmuls and attention, plus the
convolutions of vision models); every other op is recomputed in backward."""
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."
"""What ``checkpoint_wrapper`` inserts into parameter names (``clean_names`` takes it out)."""


def apply(model: torch.nn.Module, value: str, capture, name: str) -> str | None:
    """Checkpoint ``model`` (called ``name``) as ``--checkpointing value`` says; ``capture`` is the run's
    ``Capture``. Returns the record's note on how (None for ``none``). A model without repeated blocks is a
    usage error."""
    if value == "none":
        return None
    every = checkpointing_every(value) or 1
    context_fn = functools.partial(_contexts, capture, value == "selective")
    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    how = "selective (op-level: outputs of matmul, attention and convolution kept)" if value == "selective" else (
        "of every block" if every == 1 else f"of blocks 0, {every}, {2 * every}…")
    layers = _hugging_face_layers(model)
    if layers:
        entry = _hugging_face(model, kwargs, every)
        return (f"activation checkpointing {how}: transformers' {entry} (non-reentrant) on the "
                f"{len(layers)} {type(layers[0]).__name__} layers")
    blocks = repeated_blocks(model)
    if not blocks:
        raise UsageError(f"--checkpointing {value}: {name} has no repeated blocks to checkpoint (no ModuleList or "
                         "Sequential holding two modules or more of one type with layers of their own); use "
                         "--checkpointing none")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    chosen = {id(block) for block in blocks[::every]}
    kwargs.pop("use_reentrant")
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: id(m) in chosen)
    kinds = ", ".join(dict.fromkeys(type(block).__name__ for block in blocks))
    return (f"activation checkpointing {how}: torch's apply_activation_checkpointing (checkpoint_wrapper, "
            f"non-reentrant) on {len(chosen)} of the {len(blocks)} repeated blocks ({kinds})")


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, in order: the members of a ``ModuleList`` or ``Sequential`` that share
    their type with another member, hold layers of their own and are no containers themselves (a ResNet's
    BasicBlocks, MobileNetV2's InvertedResiduals, a ViT's encoder blocks, ``nn.TransformerEncoderLayer``s),
    not looking inside a block."""
    containers = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        members = list(module.children())
        counts = collections.Counter(type(m) for m in members)
        listed = isinstance(module, containers[:2])  # a ModuleDict's members may take what they change (DenseNet)
        for member in members:
            if (listed and counts[type(member)] >= 2 and not isinstance(member, containers)
                    and any(True for _ in member.children())):
                found.append(member)
            else:
                visit(member)

    visit(model)
    return found


def clean_names(names: dict[torch.Tensor, str]) -> dict[torch.Tensor, str]:
    """Parameter names as the model has them without ``checkpoint_wrapper`` (as its state dict has them)."""
    return {tensor: name.replace(CHECKPOINT_PREFIX, "") for tensor, name in names.items()}


def _hugging_face_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers transformers checkpoints in ``model`` (none where it is no such model)."""
    import sys

    if "transformers" not in sys.modules or not getattr(model, "supports_gradient_checkpointing", False):
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _hugging_face(model, kwargs: dict, every: int) -> str:
    """transformers' own activation checkpointing on its layers (every ``every``-th from the first); returns
    the method's name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
        return "activation_checkpointing_enable"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for index, layer in enumerate(_hugging_face_layers(model)):
        layer.gradient_checkpointing = index % every == 0
    return "gradient_checkpointing_enable"


def _policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _contexts(capture, selective: bool):
    """The (forward, recomputation) contexts of one checkpointed call: the recomputation inside the capture's
    window, cast as the forward was (an estimate's CUDA autocast on CPU tensors, ``cuda_autocast.recomputation``);
    with ``selective``, torch's selective-checkpointing modes, the kept outputs tagged as saved."""
    from memprof.measure.cuda_autocast import recomputation

    if not selective:
        return contextlib.nullcontext(), _all(recomputation(), capture.recomputing())
    forward, recompute = create_selective_checkpoint_contexts(_policy)
    if hasattr(forward, "respect_saved_tensors_hooks"):
        # torch ≥ 2.12 warns that the outputs kept bypass an active saved-tensor hook (memprof's) unless told
        # what to do: bypass, what every torch has done so far (``_SavedOutputs`` tags them instead).
        forward.respect_saved_tensors_hooks = False
    return _all(forward, _SavedOutputs(capture)), _all(recomputation(), recompute, capture.recomputing())


@contextlib.contextmanager
def _all(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


class _SavedOutputs(TorchDispatchMode):
    """Inside selective checkpointing's caching mode: tags the outputs it keeps for backward (the ops of
    ``SAVED_OPS``) as saved activations."""

    def __init__(self, capture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented  # a DTensor's ops on its local tensors come back here
        out = func(*args, **(kwargs or {}))
        if func in SAVED_OPS:
            self.capture.saved_outputs(out)
        return out
