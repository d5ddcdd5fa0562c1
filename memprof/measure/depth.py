"""A deep model's estimate from shallow probes: every figure is affine in the number of blocks.

The blocks of a transformer stack are alike: each adds the same parameters, gradients, optimizer
state and saved activations, through the same allocations in the same order. So each figure of an
estimate (bytes per category and component, every phase's peak and its composition, the parameter
count, the counts in its notes) is ``f(b) = f(0) + b·Δ`` for a model cut to its first ``b`` blocks.
``estimate`` runs probes of 1, 2 and 3 blocks, requires every figure's second difference to be exactly
zero, and extrapolates to the model's depth; where some figure is not affine there (the first block
differs, FSDP2's prefetch reaches another block), it probes 2, 3 and 4 blocks, then 3–5, then 4–6, while
the blocks probed in all come to no more than the model's; where no set is affine, it estimates the whole
model op by op, as ``--full-depth`` always does. The global peak is the highest extrapolated phase peak,
read with that phase's composition: it may fall in another phase than at the probes. The per-parameter
table repeats the probe's block rows under each block's name. A probe whose run failed gives the model's
failed row the same way (every probe failed alike), or, where it measured nothing, is that row.

A peak can also move within a phase as the model deepens (two points whose bytes grow at different
rates per block cross beyond the probes' depth). Each probe therefore marks where its blocks start and
end (``Capture.watch_blocks``) and records every phase's peak before the blocks, in the first and the
last block, and after them; these are extrapolated too, and one that outgrows its phase's extrapolated
peak sends the model to the op-by-op estimate, as does a phase's start or end that outgrows it (GaLore's
step peaks early, at the embeddings' update, at 1-3 blocks of a small LLaMA, and at its end at 8). Unseen
still: such a crossing between two points of one block, or between two points of an optimizer's step
other than its end (the step's blocks are not followed).

What the probes cannot show is never extrapolated, nor probed: what the caching allocator of a CUDA target
reserves depends on every allocation before (a block's segments serve later blocks' tensors; at 1-6 blocks of
GPT-2 reserved − allocated falls from 460 to 210 MB, at its 12 it is 309 MB), so an estimate for CUDA is made
op by op at full depth and its allocator simulated on the whole stream (``memprof.measure.reserved``). A strategy or an optimizer class that decides something
by a rule over all the parameters says so in its ``whole_model_rule``: ZeroRedundancyOptimizer's greedy
partition (a rank that holds no block's parameters at the probes may hold some at the model's depth);
AdaMeM, Adapprox and Alada, which step the matrices of one shape from every block together (that batch's
transient grows with the depth and may overtake another's beyond the probes). Their figures can look
affine at the probes and not be; such a model is estimated op by op. A config's per-layer lists
(``layer_types``: one value per block) are cut to the probe's blocks, and the record gets the model's; a
set of probes serves only where every block beyond them is of a kind (its values in those lists) that
the blocks the probes added were, so that the per-block step measured it. tests/test_depth.py compares
extrapolated with full-depth estimates.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Callable, Iterator, Sequence

from memprof.record import RunRecord
from memprof.settings import Settings

PROBES: tuple[tuple[int, ...], ...] = ((1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 6))
"""Tried in order while the blocks probed in all come to no more than the model's (else it is cheaper whole)."""
MIN_DEPTH = 6
"""Shallower models are estimated whole: their probes would cost about as much."""

_NUMBER = re.compile(r"\d[\d,]*\d|\d")  # an integer in prose, thousands separators allowed


class NotAffine(Exception):
    """A figure of the probes is not affine in the number of blocks; the message names it."""


@dataclasses.dataclass(frozen=True)
class Probe(Settings):
    """A probe's settings: the run's, with the model cut to its first ``blocks`` blocks. Internal: no flag,
    config key or CSV column has it, and no record keeps it (``estimate`` gives its record the run's)."""

    blocks: int = 1


def probe(settings: Settings, blocks: int) -> Probe:
    """The settings of a probe of ``blocks`` blocks of ``settings``' model (without a timeline: it would be
    thrown away)."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(Settings)}
    return Probe(**{**values, "timeline": False}, blocks=blocks)


def estimate(settings: Settings, measure: Callable[[Settings], RunRecord]) -> RunRecord:
    """``measure(settings)`` for an estimate, through probes of a few blocks where the model stacks more."""
    depth = _probed_depth(settings)
    if depth is None:
        return measure(settings)
    per_layer = _per_layer(settings)
    probes: dict[int, RunRecord] = {}
    reasons = []
    for probed, problem in _probe_sets(settings, depth, per_layer):
        if sum(set(probes) | set(probed)) > depth:
            break
        if problem:
            reasons.append(problem)
            continue
        for blocks in probed:
            if blocks not in probes:
                probes[blocks] = measure(probe(settings, blocks))
        records = [probes[blocks] for blocks in probed]
        empty = next((b for b, r in zip(probed, records) if r.status != "ok" and _measured_nothing(r)), None)
        if empty is not None:  # it failed before the model was measured: nothing in its row depends on depth
            record = probes[empty]
            record.settings = settings
            record.notes.append(f"failed on a probe of {empty} of the model's {depth} blocks, before anything "
                                "was measured")
            return record
        try:
            record = extrapolate(records, probed, depth, per_layer)
        except NotAffine as exc:
            reasons.append(f"probes of {', '.join(map(str, probed))} blocks: {exc}")
            continue
        record.settings = settings
        record.notes.append(f"extrapolated to {depth} blocks from probes of {', '.join(map(str, probed))} blocks "
                            "(every figure affine in the depth, exactly, at the probes); no timeline: "
                            "--full-depth estimates op by op")
        return record
    record = measure(settings)
    record.notes.append("estimated op by op at full depth: " + "; ".join(reasons))
    return record


def first_measurements(settings: Settings) -> list[Settings]:
    """What ``estimate(settings, …)`` measures first (its first probes, or the whole model), so that a caller
    can start them ahead, in parallel."""
    depth = _probed_depth(settings)
    if depth is not None:
        for probed, problem in _probe_sets(settings, depth, _per_layer(settings)):
            if sum(probed) > depth:
                break
            if not problem:
                return [probe(settings, blocks) for blocks in probed]
    return [settings]


def _probed_depth(settings: Settings) -> int | None:
    """The model's depth (its number of blocks) where ``estimate`` probes it, else None (estimated whole)."""
    from memprof.models import stacked_depth

    # A snapshot records every allocation of the whole model, and the caching allocator of a CUDA target is
    # simulated on every allocation (memprof.measure.reserved: what it reserves is not affine in the depth): no
    # probes.
    whole = settings.full_depth or settings.snapshot is not None or settings.device.startswith("cuda")
    depth = None if whole else stacked_depth(settings.model)
    return depth if depth is not None and depth >= MIN_DEPTH else None


def _per_layer(settings: Settings) -> dict[str, list]:
    from memprof.models import per_layer_config

    return per_layer_config(settings.model)


def _spaced(groups: tuple[int, ...], settings: Settings, depth: int) -> tuple[int, ...]:
    """The probes' depths for ``groups`` repeated groups of blocks: one block each, or under ``--checkpointing
    every:N`` N blocks (one checkpointed) after which every probe ends as the model does (``depth`` mod N)."""
    from memprof.settings import checkpointing_every

    every = checkpointing_every(settings.checkpointing) if settings.checkpointing.startswith("every:") else 1
    return tuple(depth % every + every * count for count in groups)




def _probe_sets(settings: Settings, depth: int,
                per_layer: dict[str, list]) -> Iterator[tuple[tuple[int, ...], str | None]]:
    """The sets of probes ``estimate`` tries in turn, each with why it cannot serve (None: it may): the
    strategy or the optimizer decides something over all the parameters, or a block beyond the probes is of
    a kind (its values in the per-layer lists) that no block they added is."""
    rule = _whole_model_rule(settings)
    if rule:
        yield (), rule
        return
    kinds = list(zip(*per_layer.values()))  # each block's values in the per-layer lists
    for probed in (_spaced(groups, settings, depth) for groups in PROBES):
        added = kinds[probed[0]:probed[-1]]
        beyond = next((i for i in range(probed[-1], depth) if kinds and kinds[i] not in added), None)
        yield probed, None if beyond is None else (
            f"probes of {', '.join(map(str, probed))} blocks: block {beyond} has "
            + ", ".join(f"{name} {values[beyond]!r}" for name, values in per_layer.items())
            + ", which no block they added has")


def _whole_model_rule(settings: Settings) -> str | None:
    """What a rule over all the parameters decides for this run, where one does: the strategy's share of each
    rank or the optimizer's batches (their ``whole_model_rule``; a CUDA-only optimizer is estimated from
    its documented layout, which has none)."""
    from memprof.optim.registry import parse_spec
    from memprof.strategies import strategy_class

    strategy = strategy_class(settings.parallel)
    if strategy.whole_model_rule:
        return f"--parallel {settings.parallel}: {strategy.whole_model_rule}"
    spec = parse_spec(settings.spec)
    rule = getattr(spec.entry.load(), "whole_model_rule", None) if spec.entry.requires is None else None
    return f"{spec.name}: {rule}" if rule else None


def _measured_nothing(record: RunRecord) -> bool:
    return record.n_params == 0 and not record.breakdown and not record.phase_peaks


def extrapolate(records: Sequence[RunRecord], probed: Sequence[int], depth: int,
                per_layer: dict[str, list] | None = None) -> RunRecord:
    """The record at ``depth`` blocks from records of probes of consecutive block counts ``probed``, whose
    model has the per-layer config lists ``per_layer`` (of ``depth`` values each); ``NotAffine`` where a
    figure is not affine in the blocks."""
    data = [r.to_dict() for r in records]
    for item, blocks in zip(data, probed):
        item.pop("timeline")
        _give_model_lists(item["model_config"], per_layer or {}, blocks)
    settings = [item.pop("settings") for item in data][-1]
    telemetry = [item.pop("telemetry") for item in data]
    parameters = _parameters([item.pop("parameters") for item in data], probed, depth)
    out = _affine(data, probed, depth, "record")
    out.update(settings=settings, parameters=parameters,
               telemetry=telemetry[0] if all(t == telemetry[0] for t in telemetry) else [])
    record = RunRecord.from_dict(out)
    _check_blocks(records[-1], record, depth)
    _settle_peak(records[-1], record)
    record.phase_peaks = [dataclasses.replace(p, blocks={}) for p in record.phase_peaks]  # the probes' alone
    return record


def _give_model_lists(model_config: dict, per_layer: dict[str, list], blocks: int) -> None:
    """A probe's config (``model_config["hf_config"]``, memprof.models.hf) with the model's per-layer lists
    in place of its own, which must be their first ``blocks`` values."""
    config = model_config.get("hf_config", {})
    for name, values in per_layer.items():
        if config.get(name) != values[:blocks]:
            raise NotAffine(f"record.model_config.hf_config.{name} is not the model's first {blocks} values")
        config[name] = values


def _check_blocks(deepest: RunRecord, record: RunRecord, depth: int) -> None:
    """Every phase's peak at ``depth`` must be the extrapolated one: no point followed in it may outgrow it,
    before, in or after the blocks (the peak of a middle block lies between the first's and the last's), nor
    its start or end (an optimizer's step, whose blocks are not followed, may peak early at the probes and at
    its end at full depth)."""
    if deepest.phase_peaks and not any(p.blocks for p in deepest.phase_peaks):
        raise NotAffine("no one module list holds the blocks, so the peaks within phases cannot be followed")
    for phase in record.phase_peaks:
        points = {**phase.blocks, "at its start": phase.start, "at its end": phase.end}
        where, most = max(points.items(), key=lambda item: item[1])
        if most > phase.peak:
            raise NotAffine(f"{phase.phase} (step {phase.step}) peaks {where} at {depth} blocks, not where it "
                            "peaked at the probes")


def _affine(values: list[Any], probed: Sequence[int], depth: int, where: str) -> Any:
    first = values[0]
    if all(type(v) is type(first) and v == first for v in values):
        return first
    if any(type(v) is not type(first) for v in values):
        raise NotAffine(f"{where} changes type")
    if isinstance(first, dict):
        if any(v.keys() != first.keys() for v in values):
            raise NotAffine(f"{where} has other keys")
        return {k: _affine([v[k] for v in values], probed, depth, f"{where}.{k}") for k in first}
    if isinstance(first, list) and all(_is_rows(v) for v in values):
        return _rows(values, probed, depth, where)
    if isinstance(first, (list, tuple)):
        if any(len(v) != len(first) for v in values):
            raise NotAffine(f"{where} has another length")
        return type(first)(_affine([v[i] for v in values], probed, depth, f"{where}[{i}]")
                           for i in range(len(first)))
    if isinstance(first, int) and not isinstance(first, bool):
        return _line(values, probed, depth, where)
    if isinstance(first, str):
        return _prose(values, probed, depth, where)
    raise NotAffine(f"{where} differs: {values}")


def _is_rows(value: list) -> bool:
    return all(isinstance(row, dict) and row.keys() == {"category", "component", "bytes", "basis"} for row in value)


def _rows(values: list[list[dict]], probed: Sequence[int], depth: int, where: str) -> list[dict]:
    """Rows of bytes by (category, component): a row missing at a probe holds 0 bytes there (a component a
    shallow model does not have at its peak). Rows that come to 0 bytes are left out where the probes left
    them out; the deepest probe's order is kept (sorted where it was)."""
    keyed = [{(r["category"], r["component"], r["basis"]): r["bytes"] for r in rows} for rows in values]
    keys = list(dict.fromkeys(key for rows in reversed(keyed) for key in rows))
    if values[-1] == sorted(values[-1], key=lambda r: (r["category"], r["component"])):
        keys.sort(key=lambda key: key[:2])
    out = []
    for key in keys:
        nbytes = _line([rows.get(key, 0) for rows in keyed], probed, depth, f"{where}[{key[0]}/{key[1]}]")
        if nbytes or all(key in rows for rows in keyed):
            out.append(dict(zip(("category", "component", "basis"), key), bytes=nbytes))
    return out


def _line(values: Sequence[int], probed: Sequence[int], depth: int, where: str) -> int:
    """The affine function through ``values`` at ``probed`` (evenly spaced), at ``depth``."""
    per_probe = values[1] - values[0]
    if any(b - a != per_probe for a, b in itertools.pairwise(values)):
        raise NotAffine(f"{where} is {', '.join(map(str, values))} at {', '.join(map(str, probed))} blocks")
    return values[-1] + per_probe * (depth - probed[-1]) // (probed[1] - probed[0])


def _prose(values: Sequence[str], probed: Sequence[int], depth: int, where: str) -> str:
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
        value = _line([int(n.replace(",", "")) for n in found], probed, depth, where)
        out += [f"{value:,}" if "," in found[-1] else str(value), word]
    return "".join(out)


def _parameters(tables: list[list[dict]], probed: Sequence[int], depth: int) -> list[dict]:
    """The per-parameter table at ``depth``: the deepest probe's, its block rows repeated for every block,
    in the order a full-depth record has (most state first; ties in the model's parameter order)."""
    if all(t == tables[0] for t in tables):
        return tables[0]  # no per-block parameters (ALBERT shares one block's)
    prefix = _block_prefix([[row["name"] for row in t] for t in tables], probed)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    deepest = tables[-1]
    blocks: dict[int, list[dict]] = {}
    for row in deepest:
        match = pattern.match(row["name"])
        if match:
            blocks.setdefault(int(match[1]), []).append({**row, "name": match[2]})
    if any(rows != blocks[0] for rows in blocks.values()):
        raise NotAffine(f"the blocks under {prefix} hold different parameters or state")
    # State created in backward (IO-Adam's hooks) lists the blocks last to first: each row of a block in the
    # order its copies have in the deepest probe.
    order: dict[str, list[int]] = {}
    for match in filter(None, map(pattern.match, (r["name"] for r in deepest))):
        order.setdefault(match[2], []).append(int(match[1]))
    sign = {name: 1 if seen == sorted(seen) else -1 for name, seen in order.items()}
    keyed = []
    for index, row in enumerate(deepest):
        match = pattern.match(row["name"])
        if match is None:  # before the blocks in parameter order unless a block row of its size came first
            after = any(pattern.match(r["name"]) and r["state_bytes"] == row["state_bytes"] for r in deepest[:index])
            keyed.append(((-row["state_bytes"], 2 if after else 0, 0, index), row))
        elif match[1] == "0":
            keyed += [((-row["state_bytes"], 1, sign[match[2]] * b, index), {**row, "name": f"{prefix}.{b}.{match[2]}"})
                      for b in range(depth)]
    return [row for _, row in sorted(keyed, key=lambda item: item[0])]


def _block_prefix(names: list[list[str]], probed: Sequence[int]) -> str:
    """The module path under which each probe numbers its blocks 0 … blocks−1."""
    candidates = None
    for table, blocks in zip(names, probed):
        indices: dict[str, set[int]] = {}
        for name in table:
            for match in re.finditer(r"\.(\d+)\.", name):
                indices.setdefault(name[: match.start()], set()).add(int(match[1]))
        found = {prefix for prefix, seen in indices.items() if seen == set(range(blocks))}
        candidates = found if candidates is None else candidates & found
    if not candidates or len(candidates) > 1:
        raise NotAffine("no one module path numbers the blocks")
    return candidates.pop()


def _settle_peak(deepest: RunRecord, record: RunRecord) -> None:
    """The global peak at full depth: the highest extrapolated phase peak, which may lie in another phase
    than at the probes (a step transient that grows faster per block than the activations)."""
    from memprof.measure.attribution import move_global_peak

    if not deepest.phase_peaks or max(p.peak for p in deepest.phase_peaks) != deepest.peaks.allocated:
        return  # the probes' global peak came before the first phase (nothing to compare)
    top = max(record.phase_peaks, key=lambda p: p.peak)
    if top.peak > (record.peaks.allocated or 0):
        move_global_peak(record, top)
