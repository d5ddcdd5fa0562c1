"""Exact tensor accounting: optimizer state walked recursively, deduplicated by storage.

State is found in ``optimizer.state[p]`` and in anything reachable from it (tuples, lists,
dicts, object attributes such as a GaLore projector, the inner tensors of a tensor subclass such
as torchao's quantized moments). Each storage is counted once, with its
full ``untyped_storage().nbytes()`` so a view that keeps a larger storage alive is charged
honestly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from memprof.taxonomy import role_of


@dataclass(frozen=True)
class StateTensor:
    param_name: str
    key: str  # the state key (first path element), e.g. "exp_avg"
    path: str  # full path, e.g. "projector.ortho_matrix"
    role: str
    inferred: bool
    tensor: torch.Tensor

    @property
    def storage_bytes(self) -> int:
        return self.tensor.untyped_storage().nbytes()


def storage_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that own ``tensor``'s memory: itself, or a wrapper subclass's inner tensors
    (a DTensor's local shard, torchao's quantized codes and scales)."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    inner = (getattr(tensor, attr) for attr in tensor.__tensor_flatten__()[0])
    return [t for item in inner if isinstance(item, torch.Tensor) for t in storage_tensors(item)]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``tensor``: a DTensor's local shard, else the tensor itself."""
    inner = storage_tensors(tensor)
    return inner[0] if len(inner) == 1 else tensor


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """One key per storage: its address, or for a fake tensor (no address) the storage object's identity."""
    storage = tensor.untyped_storage()
    return (str(tensor.device), id(storage) if is_fake(tensor) else storage.data_ptr())


def unique_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights count once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in (t for outer in tensors for t in storage_tensors(outer)):
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            seen[storage_key(tensor)] = tensor.untyped_storage().nbytes()
        elif tensor.device.type == "meta":
            seen[("meta", id(tensor))] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _tensors_in(obj: Any, path: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    if is_traceable_wrapper_subclass(obj):
        # A wrapper subclass (torchao's OptimState8bit, a DTensor) owns no storage; its inner tensors
        # do (a DTensor's local shard; its device mesh is no state).
        for attr in obj.__tensor_flatten__()[0]:
            if isinstance(getattr(obj, attr), torch.Tensor):
                yield from _tensors_in(getattr(obj, attr), f"{path}.{attr}", depth + 1)
    elif isinstance(obj, torch.Tensor):
        yield path, obj
    elif depth > 6 or obj is None or isinstance(obj, (int, float, str, bool, bytes)):
        return
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors_in(value, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors_in(value, f"{path}[{i}]", depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        yield from _tensors_in(vars(obj), path, depth + 1)


def walk_state(
    optimizer: torch.optim.Optimizer,
    names: Mapping[torch.Tensor, str],
    roles: Mapping[str, str],
) -> list[StateTensor]:
    """Every distinct state storage, charged to the first parameter that reaches it."""
    seen: set[tuple[str, int]] = set()
    out: list[StateTensor] = []
    for param, state in optimizer.state.items():
        param_name = names.get(param, f"<unnamed {tuple(param.shape)}>") if isinstance(param, torch.Tensor) else str(param)
        for path, tensor in _tensors_in(state, ""):
            if tensor.layout != torch.strided:
                continue
            key = storage_key(tensor)
            if key in seen or tensor.untyped_storage().nbytes() == 0:
                continue
            seen.add(key)
            state_key = path.split(".")[0].split("[")[0]
            # A role declared for the full path ("exp_avg.codes") wins over the state key's.
            role, inferred = role_of(
                roles, path if path in roles else state_key, tensor, local(param) if isinstance(param, torch.Tensor) else None
            )
            out.append(StateTensor(param_name, state_key, path, role, inferred, tensor))
    return out
