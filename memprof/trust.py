"""What `memprof check` may load to measure a baseline again.

A baseline is data: measuring it again loads only built-in models and registered optimizers, and
the model files, config files and dotted-path optimizers the user names with ``--trust``.
``refuse_untrusted`` checks every run of the baseline before anything is imported or measured, and
imports none of the names itself.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable, Sequence

from memprof.errors import UsageError
from memprof.record import RunRecord
from memprof.settings import group_by_request


def refuse_untrusted(records: Sequence[RunRecord], trust: Iterable[str], source: str | Path) -> None:
    """Raise ``UsageError`` naming every model and optimizer of ``records`` that measuring them again
    (``memprof.api.measure`` on each ``group_by_request`` group) would load and that is neither built
    in nor in ``trust``."""
    from memprof.models import is_builtin
    from memprof.optim.registry import registry, spec_name, split_specs

    trusted, known = set(trust), registry()
    untrusted: dict[str, str] = {}  # name → "model" or "optimizer", in the order found
    for settings, specs in group_by_request(r.settings for r in records):
        if not is_builtin(settings.model) and settings.model not in trusted:
            untrusted.setdefault(settings.model, "model")
        # measure() parses each spec as given and every item of their comma-joined list: a spec
        # text may hold several specs ("sgd:lr=0.01,pkg.Opt"), and a bracket or quote left open
        # in one can swallow the next, so every way of reading them is checked.
        texts = {*specs, *split_specs(",".join(specs)), *(item for text in specs for item in split_specs(text))}
        for name in sorted({spec_name(text) for text in texts}):
            if name not in known and name not in trusted:
                untrusted.setdefault(name, "optimizer")
    if untrusted:
        names = ", ".join(f"{what} {name!r}" for name, what in untrusted.items())
        them = "it" if len(untrusted) == 1 else "them"
        flags = " ".join(f"--trust {shlex.quote(name)}" for name in untrusted)
        raise UsageError(f"{source} names {names}: not a built-in model or registered optimizer; a baseline is "
                         f"data and never makes memprof run code it names: pass {flags} to measure {them} again, "
                         f"or measure {them} yourself and pass --current")
