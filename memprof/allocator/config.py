"""The caching allocator's settings: ``PYTORCH_CUDA_ALLOC_CONF`` read as torch reads it.

Torch parses the text in ``c10::CachingAllocator::AcceleratorAllocatorConfig::parseArgs`` (c10/core/
AllocatorConfig.cpp: the keys every device allocator shares) and ``CUDAAllocatorConfig::parseArgs``
(c10/cuda/CUDAAllocatorConfig.cpp: the CUDA-only keys); its tokenizer (``ConfigTokenizer``, c10/core/
AllocatorConfig.h) splits at ``, : [ ]`` and drops whitespace. Checked against torch 2.14.1's own parser
(tests/test_allocator.py); ``large_segment_size_mb`` is not in older releases (see ``KEYS``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from memprof.errors import UsageError

MIB = 1 << 20
K_LARGE_BUFFER = 20 * MIB  # kLargeBuffer (CUDACachingAllocator.cpp): the large pool's segment for 1-10 MiB requests
NO_LIMIT = (1 << 64) - 1  # std::numeric_limits<size_t>::max(): max_split_size's default
DIVISION_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: one entry per power of two from 1 MiB to 32 GiB (and above)

SIMULATED = {
    "max_split_size_mb": "blocks of at least this size are never split, nor handed out for smaller requests",
    "max_non_split_rounding_mb": "how much larger than a request an unsplittable (oversize) block may be",
    "roundup_power2_divisions": "requests rounded up to one of N divisions of their power of two",
    "expandable_segments": "one segment per pool and stream, mapped page by page",
    "garbage_collection_threshold": "free old cached blocks before a new segment (with a memory fraction)",
    "large_segment_size_mb": "the large pool's segment for 1-10 MiB requests (torch >= 2.12; default 20)",
    "per_process_memory_fraction": "the share of the device the allocator may reserve",
}
"""Keys whose values change what the allocator reserves: simulated."""
NO_EFFECT = ("release_lock_on_cudamalloc", "release_lock_on_hipmalloc", "pinned_use_cuda_host_register",
             "pinned_use_hip_host_register", "pinned_num_register_threads", "pinned_use_background_threads",
             "pinned_max_round_threshold_mb", "pinned_max_cached_size_mb", "pinned_reserve_segment_size_mb",
             "pinned_free_catch_all", "graph_capture_record_stream_reuse", "throw_on_cudamalloc_oom")
"""Keys torch accepts that change nothing the device pools reserve (pinned host memory, locking, when an OOM is
raised): accepted, not simulated."""
KEYS = (*SIMULATED, "backend", *NO_EFFECT)
ENVIRONMENT = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
"""Where torch reads the settings, first found first (CUDAAllocatorConfig::instance)."""


@dataclass(frozen=True)
class AllocatorConfig:
    """The settings that decide what the caching allocator reserves (torch's defaults unless ``text`` said)."""

    max_split_size: int = NO_LIMIT
    max_non_split_rounding: int = K_LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * DIVISION_INTERVALS
    expandable_segments: bool = False
    garbage_collection_threshold: float = 0.0
    large_segment_size: int = K_LARGE_BUFFER
    memory_fraction: float | None = None  # per_process_memory_fraction (None: not set)
    text: str = field(default="", compare=False)

    def divisions(self, size: int) -> int:
        """The power-of-two divisions for a request of ``size`` bytes
        (``AcceleratorAllocatorConfig::roundup_power2_divisions(size)``): the interval of its power of two,
        counted from 1 MiB, clamped to the table."""
        index = max(0, (size.bit_length() - 1) - 20)
        return self.roundup_power2_divisions[min(index, DIVISION_INTERVALS - 1)]


def from_environment() -> str:
    """The allocator settings this process's environment gives torch ('' where none)."""
    return next((os.environ[name] for name in ENVIRONMENT if os.environ.get(name)), "")


def problem(text: str) -> str | None:
    """What is wrong with ``text`` as allocator settings, in one line naming the valid choices (None: fine)."""
    try:
        parse(text)
    except UsageError as exc:
        return str(exc)
    return None


def parse(text: str) -> AllocatorConfig:
    """``text`` (``max_split_size_mb:64,expandable_segments:True``) as torch reads it; UsageError where torch
    would refuse it, or where it asks for something not simulated (the cudaMallocAsync backend)."""
    tokens = [t for t in re.split(r"([,:\[\]])", re.sub(r"\s+", "", text)) if t]
    values: dict = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key not in KEYS:
            raise UsageError(f"--alloc-conf: unknown key {key!r}; choose from {', '.join(KEYS)}")
        if i + 2 >= len(tokens) or tokens[i + 1] != ":":
            raise UsageError(f"--alloc-conf: {key} needs a value (key:value)")
        i, value = _value(tokens, i + 2, key)
        values[key] = value
        if i < len(tokens):
            if tokens[i] != ",":
                raise UsageError(f"--alloc-conf: expected ',' after {key}'s value, got {tokens[i]!r}")
            i += 1
    return _config(values, text)


def _value(tokens: list[str], i: int, key: str) -> tuple[int, object]:
    """The value of ``key`` starting at token ``i`` (a list in brackets, or one token), and the next index."""
    if tokens[i] != "[":
        return i + 1, tokens[i]
    end = tokens.index("]", i) if "]" in tokens[i:] else None
    if end is None:
        raise UsageError(f"--alloc-conf: {key}'s list has no closing ']'")
    return end + 1, tokens[i + 1:end]


def _config(values: dict, text: str) -> AllocatorConfig:
    if values.get("backend", "native") != "native":
        raise UsageError(f"--alloc-conf: backend:{values['backend']} is not simulated (cudaMallocAsync leaves "
                         "pooling to the driver); choose backend:native or leave it out")
    for key in ("expandable_segments", *(k for k in NO_EFFECT if not k.endswith(("_mb", "_threads")))):
        if key in values and values[key] not in ("True", "False"):
            raise UsageError(f"--alloc-conf: {key} takes True or False, got {values[key]!r}")
    large = _megabytes(values, "large_segment_size_mb", K_LARGE_BUFFER // MIB)
    if large <= 10:  # parseLargeSegmentSize: must exceed kMinLargeAlloc (10 MiB)
        raise UsageError("--alloc-conf: large_segment_size_mb must be > 10 MB")
    split = _megabytes(values, "max_split_size_mb", None)
    if split is not None and split < K_LARGE_BUFFER // MIB:  # parseMaxSplitSize: at least kLargeBuffer
        raise UsageError(f"--alloc-conf: max_split_size_mb too small, must be >= {K_LARGE_BUFFER // MIB}")
    if split is not None and split < large:
        raise UsageError("--alloc-conf: max_split_size_mb must be >= large_segment_size_mb")
    rounding = _megabytes(values, "max_non_split_rounding_mb", K_LARGE_BUFFER // MIB)
    if rounding < K_LARGE_BUFFER // MIB:  # parseMaxNonSplitRoundingSize
        raise UsageError(f"--alloc-conf: max_non_split_rounding_mb too small, must be >= {K_LARGE_BUFFER // MIB}")
    threshold = _number(values, "garbage_collection_threshold", 0.0)
    if "garbage_collection_threshold" in values and not 0.0 < threshold < 1.0:
        raise UsageError("--alloc-conf: garbage_collection_threshold must lie in (0.0, 1.0)")
    fraction = _number(values, "per_process_memory_fraction", None)
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise UsageError("--alloc-conf: per_process_memory_fraction must lie in [0.0, 1.0]")
    return AllocatorConfig(
        max_split_size=NO_LIMIT if split is None else min(split * MIB, NO_LIMIT),
        max_non_split_rounding=rounding * MIB,
        roundup_power2_divisions=_divisions(values.get("roundup_power2_divisions")),
        expandable_segments=values.get("expandable_segments") == "True",
        garbage_collection_threshold=threshold,
        large_segment_size=large * MIB,
        memory_fraction=fraction,
        text=text,
    )


def _megabytes(values: dict, key: str, default: int | None) -> int | None:
    if key not in values:
        return default
    value = values[key]
    if isinstance(value, list) or not value.isdigit():
        raise UsageError(f"--alloc-conf: {key} takes a whole number of MB, got {value!r}")
    return int(value)


def _number(values: dict, key: str, default: float | None) -> float | None:
    if key not in values:
        return default
    try:
        return float(values[key])
    except (TypeError, ValueError):
        raise UsageError(f"--alloc-conf: {key} takes a number, got {values[key]!r}") from None


def _power_of_two(text: str, what: str, zero: bool = False) -> int:
    value = int(text) if text.isdigit() else -1
    if value < 0 or (value & (value - 1)) or (value == 0 and not zero):
        raise UsageError(f"--alloc-conf: roundup_power2_divisions: {what} must be a power of 2"
                         f"{' or 0' if zero else ''}, got {text!r}")
    return value


def _divisions(value) -> tuple[int, ...]:
    """``parseRoundUpPower2Divisions``: one power of two for every size, or ``[MB:N,…,>:N]`` (each MB a power
    of two naming its interval; the first also sets every interval below it; ``>`` every one after the last
    named)."""
    table = [0] * DIVISION_INTERVALS
    if value is None:
        return tuple(table)
    if isinstance(value, str):
        return (_power_of_two(value, "the divisions"),) * DIVISION_INTERVALS
    items = [t for t in value if t != ","]
    if len(items) % 3 or any(items[k + 1] != ":" for k in range(0, len(items), 3)):
        raise UsageError("--alloc-conf: roundup_power2_divisions takes [MB:N,…,>:N]")
    last, first = 0, True
    for k in range(0, len(items), 3):
        interval, divisions = items[k], _power_of_two(items[k + 2], "the divisions", zero=True)
        if interval == ">":
            table[last + 1:] = [divisions] * (DIVISION_INTERVALS - last - 1)
            continue
        index = min(_power_of_two(interval, "an interval").bit_length() - 1, DIVISION_INTERVALS - 1)
        if first:
            table[:index] = [divisions] * index
            first = False
        table[index] = divisions
        last = index
    return tuple(table)
