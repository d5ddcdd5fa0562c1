"""Muon's usual split as one optimizer: an orthogonalized update for hidden matrices, AdamW for the rest.

Muon and its variants (AdaMuon, NorMuon) are meant for the hidden 2-D weight matrices only; the
embedding tables, the output head and every parameter that is not 2-D (biases, norm gains, conv
kernels) are trained with AdamW. ``memprof.optim.adapters.muon_split`` decides which parameter
goes where; :class:`MuonWithAdamW` steps the two optimizers as one ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch

MUON, ADAMW = "muon", "adamw"
SIDES: tuple[str, ...] = (MUON, ADAMW)


class _JoinedState(Mapping[torch.Tensor, Any]):
    """Read-only view of the parts' ``state``, keyed by parameter (read live: a part may rebind it)."""

    def __init__(self, parts: Mapping[str, torch.optim.Optimizer]) -> None:
        self._parts = parts

    def __getitem__(self, param: torch.Tensor) -> Any:
        for part in self._parts.values():
            if param in part.state:
                return part.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for part in self._parts.values():
            yield from part.state

    def __len__(self) -> int:
        return sum(len(part.state) for part in self._parts.values())


class MuonWithAdamW(torch.optim.Optimizer):
    """A Muon-family optimizer on the hidden matrices and AdamW on every other parameter, stepped as one.

    ``parts`` maps ``"muon"`` and/or ``"adamw"`` to the optimizer of that side. ``param_groups``
    are the parts' own group dicts, so a learning-rate scheduler reaches both; ``state`` reads
    through to the parts. ``param_split`` maps each parameter name to its side, and ``defaults``
    carries the same split as ``muon_params`` / ``adamw_params`` name lists, which the run
    record's hyperparameters keep.
    """

    def __init__(
        self,
        parts: Mapping[str, torch.optim.Optimizer],
        param_split: Mapping[str, str],
        defaults: Mapping[str, Any],
    ) -> None:
        if not parts or set(parts) - set(SIDES):
            raise ValueError(f"parts must be a non-empty subset of {SIDES}, got {sorted(parts)}")
        self.parts = dict(parts)
        self.param_split = dict(param_split)
        super().__init__([group for part in self.parts.values() for group in part.param_groups], {})
        self.state = _JoinedState(self.parts)  # type: ignore[assignment]
        self.defaults = {
            **defaults,
            **{f"{side}_params": [n for n, s in self.param_split.items() if s == side] for side in SIDES},
        }

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Each part's own state dict, by side."""
        return {side: part.state_dict() for side, part in self.parts.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load each part's state dict; the parts rebuild their groups, so ours are re-collected."""
        for side, part in self.parts.items():
            part.load_state_dict(state_dict[side])
        self.param_groups = [group for part in self.parts.values() for group in part.param_groups]
