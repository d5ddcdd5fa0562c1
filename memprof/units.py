"""Byte units, always labelled: binary (KiB, MiB, GiB) and decimal (KB, MB, GB)."""

from __future__ import annotations

import math

from memprof.errors import UsageError

UNITS: dict[str, int] = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def scale(unit: str) -> int:
    if unit not in UNITS:
        raise UsageError(f"unknown unit {unit!r}; choose one of {', '.join(UNITS)}")
    return UNITS[unit]


def fmt(nbytes: int | float | None, unit: str = "MiB", digits: int = 1) -> str:
    if nbytes is None:
        return "n/a"
    return f"{nbytes / scale(unit):,.{digits}f}"


def parse_size(text: str) -> int:
    """'20MiB' -> 20971520; '1.5 GB' -> 1500000000; '512' -> 512 bytes. A size is finite and not negative."""
    stripped = text.strip().replace(" ", "")
    for unit in sorted(UNITS, key=len, reverse=True):
        if stripped.endswith(unit):
            number = stripped[: -len(unit)]
            break
    else:
        unit, number = "B", stripped
    try:
        value = float(number) * UNITS[unit]
    except ValueError:
        raise UsageError(f"cannot read size {text!r}; write e.g. 20MiB, 1.5GB or 4096") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"size {text!r} must be finite and not negative; write e.g. 20MiB, 1.5GB or 4096")
    return int(value)
