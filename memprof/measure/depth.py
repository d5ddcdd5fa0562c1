"""A deep model's estimate from shallow probes: every figure is affine in the number of blocks.

The blocks of a transformer stack are alike: each adds the same parameters, gradients, optimizer
state and saved activations, through the same allocations in the same order. So each figure of an
estimate (bytes per category and component, every phase's peak and its composition, the parameter
count, the counts in its notes) is ``f(d) = f(0) + d·Δ`` at depth ``d``. ``estimate`` runs probes of
1, 2 and 3 blocks, requires every figure's second difference to be exactly zero, and extrapolates
to the configured depth; where some figure is not affine there (the first block differs, FSDP2's
prefetch reaches another block), it probes 2, 3 and 4 blocks, then 3–5, then 4–6, while the blocks
probed in all come to no more than the model's; where no set is affine, it estimates the whole model op by op,
as ``--full-depth`` always does. The global peak is the highest extrapolated phase peak, read with that phase's
composition: it may fall in another phase than at the probes. The per-parameter table repeats the
probe's block rows under each block's name.

A peak can also move within a phase as the model deepens (two points whose bytes grow at different
rates per block cross beyond the probes' depth). Each probe therefore marks where its blocks start and
end (``Capture.watch_blocks``) and records every phase's peak before the blocks, in the first and the
last block, and after them; these are extrapolated too, and one that outgrows its phase's extrapolated
peak sends the model to the op-by-op estimate. Unseen still: such a crossing between two points of one
block. tests/test_depth.py compares extrapolated with full-depth estimates.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Callable, Sequence

from memprof.record import RunRecord
from memprof.settings import Settings

PROBES: tuple[tuple[int, ...], ...] = ((1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 6))
"""Tried in order while the blocks probed in all come to no more than the model's (else it is cheaper whole)."""
MIN_DEPTH = 6
"""Shallower models are estimated whole: their probes would cost about as much."""

_NUMBER = re.compile(r"\d[\d,]*\d|\d")  # an integer in prose, thousands separators allowed


class NotAffine(Exception):
    """A figure of the probes is not affine in the depth; the message names it."""


def estimate(settings: Settings, measure: Callable[[Settings], RunRecord]) -> RunRecord:
    """``measure(settings)`` for an estimate, through probes of a few blocks where the model stacks more."""
    depth = _probed_depth(settings)
    if depth is None:
        return measure(settings)
    probes: dict[int, RunRecord] = {}
    reasons = []
    for depths in PROBES:
        if sum(set(probes) | set(depths)) > depth:
            break
        for blocks in depths:
            if blocks not in probes:
                probes[blocks] = measure(_probe(settings, blocks))
        records = [probes[blocks] for blocks in depths]
        failed = next(((d, r) for d, r in zip(depths, records) if r.status != "ok"), None)
        if failed is not None:  # an optimizer that cannot run on a few blocks cannot run on all of them
            blocks, record = failed
            record.settings = settings
            record.notes.append(f"failed on a probe of {blocks} of the model's {depth} blocks")
            return record
        try:
            record = extrapolate(records, depths, depth)
        except NotAffine as exc:
            reasons.append(f"probes of {', '.join(map(str, depths))} blocks: {exc}")
            continue
        record.settings = settings
        record.notes.append(f"extrapolated to {depth} blocks from probes of {', '.join(map(str, depths))} blocks "
                            "(every figure affine in the depth, exactly, at the probes); no timeline: "
                            "--full-depth estimates op by op")
        return record
    record = measure(settings)
    record.notes.append("estimated op by op at full depth: " + "; ".join(reasons))
    return record


def first_measurements(settings: Settings) -> list[Settings]:
    """What ``estimate(settings, …)`` measures first (its first probes, or the whole model), so that a caller
    can start them ahead, in parallel."""
    if _probed_depth(settings) is None:
        return [settings]
    return [_probe(settings, blocks) for blocks in PROBES[0]]


def _probed_depth(settings: Settings) -> int | None:
    """The model's depth where ``estimate`` probes it, else None (estimated whole)."""
    from memprof.models import stacked_depth

    # A snapshot records every allocation of the whole model: no probes.
    whole = settings.full_depth or settings.snapshot is not None or settings.depth is not None
    depth = None if whole else stacked_depth(settings.model)
    return depth if depth is not None and depth >= MIN_DEPTH else None


def _probe(settings: Settings, blocks: int) -> Settings:
    return settings.replace(depth=blocks, timeline=False)  # a probe's timeline would be thrown away


def extrapolate(records: Sequence[RunRecord], depths: Sequence[int], depth: int) -> RunRecord:
    """The record at ``depth`` blocks from records at consecutive ``depths``; ``NotAffine`` where a figure
    is not affine in them."""
    data = [r.to_dict() for r in records]
    for item in data:
        item.pop("timeline")
    settings = [item.pop("settings") for item in data][-1]
    telemetry = [item.pop("telemetry") for item in data]
    parameters = _parameters([item.pop("parameters") for item in data], depths, depth)
    out = _affine(data, depths, depth, "record")
    out.update(settings=settings, parameters=parameters,
               telemetry=telemetry[0] if all(t == telemetry[0] for t in telemetry) else [])
    record = RunRecord.from_dict(out)
    _check_blocks(records[-1], record, depth)
    _settle_peak(records[-1], record)
    record.phase_peaks = [dataclasses.replace(p, blocks={}) for p in record.phase_peaks]  # the probes' alone
    return record


def _check_blocks(probe: RunRecord, record: RunRecord, depth: int) -> None:
    """Every phase's peak at ``depth`` must be the extrapolated one: no point before, in or after the blocks
    may outgrow it (the peak of a middle block lies between the first's and the last's)."""
    if not any(p.blocks for p in probe.phase_peaks):
        raise NotAffine("no one module list holds the blocks, so the peaks within phases cannot be followed")
    for phase in record.phase_peaks:
        where, most = max(phase.blocks.items(), key=lambda item: item[1], default=("", 0))
        if most > phase.peak:
            raise NotAffine(f"{phase.phase} (step {phase.step}) peaks {where} at {depth} blocks, not where it "
                            "peaked at the probes")


def _affine(values: list[Any], depths: Sequence[int], depth: int, where: str) -> Any:
    first = values[0]
    if all(type(v) is type(first) and v == first for v in values):
        return first
    if any(type(v) is not type(first) for v in values):
        raise NotAffine(f"{where} changes type")
    if isinstance(first, dict):
        if any(v.keys() != first.keys() for v in values):
            raise NotAffine(f"{where} has other keys")
        return {k: _affine([v[k] for v in values], depths, depth, f"{where}.{k}") for k in first}
    if isinstance(first, list) and all(_is_rows(v) for v in values):
        return _rows(values, depths, depth, where)
    if isinstance(first, (list, tuple)):
        if any(len(v) != len(first) for v in values):
            raise NotAffine(f"{where} has another length")
        return type(first)(_affine([v[i] for v in values], depths, depth, f"{where}[{i}]")
                           for i in range(len(first)))
    if isinstance(first, int) and not isinstance(first, bool):
        return _line(values, depths, depth, where)
    if isinstance(first, str):
        return _prose(values, depths, depth, where)
    raise NotAffine(f"{where} differs: {values}")


def _is_rows(value: list) -> bool:
    return all(isinstance(row, dict) and row.keys() == {"category", "component", "bytes", "basis"} for row in value)


def _rows(values: list[list[dict]], depths: Sequence[int], depth: int, where: str) -> list[dict]:
    """Rows of bytes by (category, component): a row missing at a probe holds 0 bytes there (a component a
    shallow model does not have at its peak). Rows that come to 0 bytes are left out where the probes left
    them out; the deepest probe's order is kept (sorted where it was)."""
    keyed = [{(r["category"], r["component"], r["basis"]): r["bytes"] for r in rows} for rows in values]
    keys = list(dict.fromkeys(key for rows in reversed(keyed) for key in rows))
    if values[-1] == sorted(values[-1], key=lambda r: (r["category"], r["component"])):
        keys.sort(key=lambda key: key[:2])
    out = []
    for key in keys:
        nbytes = _line([rows.get(key, 0) for rows in keyed], depths, depth, f"{where}[{key[0]}/{key[1]}]")
        if nbytes or all(key in rows for rows in keyed):
            out.append(dict(zip(("category", "component", "basis"), key), bytes=nbytes))
    return out


def _line(values: Sequence[int], depths: Sequence[int], depth: int, where: str) -> int:
    """The affine function through ``values`` at ``depths`` (consecutive), at ``depth``."""
    per_block = values[1] - values[0]
    if any(b - a != per_block for a, b in itertools.pairwise(values)):
        raise NotAffine(f"{where} is {', '.join(map(str, values))} at {', '.join(map(str, depths))} blocks")
    return values[-1] + per_block * (depth - depths[-1])


def _prose(values: Sequence[str], depths: Sequence[int], depth: int, where: str) -> str:
    """Text whose integers are affine in the depth and whose words are the same."""
    words = [_NUMBER.split(v) for v in values]
    numbers = [_NUMBER.findall(v) for v in values]
    if any(w != words[0] for w in words) or any(len(n) != len(numbers[0]) for n in numbers):
        raise NotAffine(f"{where} differs in words: {values[0]!r} / {values[-1]!r}")
    out = [words[0][0]]
    for i, word in enumerate(words[0][1:]):
        found = [n[i] for n in numbers]
        if all(n == found[0] for n in found):  # a number the depth does not change, written as it was
            out += [found[0], word]
            continue
        value = _line([int(n.replace(",", "")) for n in found], depths, depth, where)
        out += [f"{value:,}" if "," in found[-1] else str(value), word]
    return "".join(out)


def _parameters(tables: list[list[dict]], depths: Sequence[int], depth: int) -> list[dict]:
    """The per-parameter table at ``depth``: the deepest probe's, its block rows repeated for every block,
    in the order a full-depth record has (most state first; ties in the model's parameter order)."""
    if all(t == tables[0] for t in tables):
        return tables[0]  # no per-block parameters (ALBERT shares one block's)
    prefix = _block_prefix([[row["name"] for row in t] for t in tables], depths)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    deepest = tables[-1]
    blocks: dict[int, list[dict]] = {}
    for row in deepest:
        match = pattern.match(row["name"])
        if match:
            blocks.setdefault(int(match[1]), []).append({**row, "name": match[2]})
    if any(rows != blocks[0] for rows in blocks.values()):
        raise NotAffine(f"the blocks under {prefix} hold different parameters or state")
    # State created in backward (IO-Adam's hooks) lists the blocks last to first.
    order = [int(m[1]) for m in map(pattern.match, (r["name"] for r in deepest)) if m and m[2] == blocks[0][0]["name"]]
    sign = -1 if order != sorted(order) else 1
    keyed = []
    for index, row in enumerate(deepest):
        match = pattern.match(row["name"])
        if match is None:  # before the blocks in parameter order unless a block row of its size came first
            after = any(pattern.match(r["name"]) and r["state_bytes"] == row["state_bytes"] for r in deepest[:index])
            keyed.append(((-row["state_bytes"], 2 if after else 0, 0, index), row))
        elif match[1] == "0":
            keyed += [((-row["state_bytes"], 1, sign * b, index), {**row, "name": f"{prefix}.{b}.{match[2]}"})
                      for b in range(depth)]
    return [row for _, row in sorted(keyed, key=lambda item: item[0])]


def _block_prefix(names: list[list[str]], depths: Sequence[int]) -> str:
    """The module path under which each probe numbers its blocks 0 … depth−1."""
    candidates = None
    for probe, depth in zip(names, depths):
        indices: dict[str, set[int]] = {}
        for name in probe:
            for match in re.finditer(r"\.(\d+)\.", name):
                indices.setdefault(name[: match.start()], set()).add(int(match[1]))
        found = {prefix for prefix, seen in indices.items() if seen == set(range(depth))}
        candidates = found if candidates is None else candidates & found
    if not candidates or len(candidates) > 1:
        raise NotAffine("no one module path numbers the blocks")
    return candidates.pop()


def _settle_peak(probe: RunRecord, record: RunRecord) -> None:
    """The global peak at full depth: the highest extrapolated phase peak, which may lie in another phase
    than at the probes (a step transient that grows faster per block than the activations)."""
    from memprof.measure.attribution import move_global_peak

    if not probe.phase_peaks or max(p.peak for p in probe.phase_peaks) != probe.peaks.allocated:
        return  # the probes' global peak came before the first phase (nothing to compare)
    top = max(record.phase_peaks, key=lambda p: p.peak)
    if top.peak > (record.peaks.allocated or 0):
        move_global_peak(record, top)
