"""A run's settings, declared once.

``Settings`` says what was measured and how, enough to measure it again. Each field carries its
help text, command-line flag, config-file key, CSV column and validation; everything else is
derived from this one declaration: the shared CLI options (``memprof.cli``), the config-file keys
(``memprof.config``), the CSV id columns (``memprof.runfile``), the reproduce command and the
re-measurement of a saved run (``memprof.api``). Adding a setting is a one-field change here.

Kept free of heavy imports (``memprof --help`` reads it).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from memprof import parallel
from memprof.allocator.config import problem as alloc_conf_problem
from memprof.errors import UsageError
from memprof.gpus import GPUS
from memprof.lora import problem as lora_problem
from memprof.units import parse_size

DTYPES = ("float32", "bfloat16", "float16")
AMP_MODES = ("bf16", "fp16")
FSDP_PARAM_DTYPES = ("bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINTING = ("none", "full", "selective", "every:N")
INT64_MAX = 2**63 - 1
PARALLEL = tuple(parallel.STRATEGIES)

CsvRole = Literal["id", "extra"]
"""``id``: a CSV id column (before the bytes); ``extra``: a setting column after them."""


@dataclass(frozen=True)
class Declared:
    """How one setting appears to the user. ``flag`` None: set through the Python API only."""

    help: str
    flag: str | None = None
    short: str | None = None
    config: str | None = None  # the key in a TOML run configuration
    csv: CsvRole | None = None
    group: str = "run"  # which commands offer the flag: "run" (every measuring command), "capture",
    # "estimate", "distributed"
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None
    metavar: str | None = None


def setting(default: Any, **declared: Any) -> Any:
    return field(default=default, metadata={"memprof": Declared(**declared)})


def _device(value: str) -> str | None:
    if value in DEVICES or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return f"unknown device {value!r}; choose auto, cpu or cuda"


def _gpu(value: str) -> str | None:
    return None if value in GPUS else f"unknown --gpu {value!r}; choose from {', '.join(GPUS)}"


def _checkpointing(value: str) -> str | None:
    every = value.removeprefix("every:")
    if value in CHECKPOINTING[:3] or (every != value and every.isdigit() and int(every) >= 1):
        return None
    return f"unknown --checkpointing {value!r}; choose {', '.join(CHECKPOINTING)} (N a positive integer)"


def checkpointing_every(value: str) -> int | None:
    """Every how many blocks ``--checkpointing value`` recomputes one (1: every block), None for ``none`` and
    ``selective`` (op-level, in every block)."""
    if value == "full":
        return 1
    return int(value.removeprefix("every:")) if value.startswith("every:") else None


def _size(value: str) -> str | None:
    try:
        return None if parse_size(value) > 0 else f"--memory {value!r} must be positive"
    except UsageError as exc:
        return str(exc)


@dataclass(frozen=True)
class Settings:
    """What was measured and how; enough to re-run it."""

    model: str = setting("gpt2", help="Model name (see `memprof models`), a local HF config.json, or file.py:function.",
                         flag="--model", short="-m", config="model", csv="id")
    optimizer: str = setting("", help="Registry name or dotted path of the optimizer (from the spec).", csv="id")
    spec: str = setting("smmf,adam", help="Comma-separated optimizer specs: NAME or NAME:key=value[:key=value…]; "
                        "NAME may be a dotted class path.", flag="--opt", config="opt", csv="id", metavar="SPECS")
    device: str = setting("auto", help="auto (CUDA when present), cuda or cpu.", flag="--device", config="device",
                          csv="id", check=_device)
    dtype: str = setting("float32", help="Weight dtype: float32, bfloat16 or float16.", flag="--dtype", config="dtype",
                         csv="id", choices=DTYPES)
    amp: str | None = setting(None, help="Mixed precision with fp32 weights: bf16 or fp16 autocast.", flag="--amp",
                              config="amp", csv="id", choices=AMP_MODES)
    lora: str | None = setting(None, help="Fine-tune LoRA adapters (PEFT) on a frozen base: r=8,alpha=16,dropout=0.05,"
                               "targets=all-linear or module names joined by '+' (default: PEFT's for the model), "
                               "quant=nf4|int8 for QLoRA (the frozen base quantized).", flag="--lora",
                               config="lora", csv="id", check=lora_problem, metavar="KEY=VALUE,…")
    batch_size: int = setting(2, help="Batch size.", flag="--batch-size", config="batch_size", csv="id", minimum=1)
    seq_len: int = setting(128, help="Sequence length (text models).", flag="--seq-len", config="seq_len", csv="id",
                           minimum=1)
    image_size: int = setting(224, help="Image side in pixels (vision models).", flag="--image-size",
                              config="image_size", csv="id", minimum=8)
    num_classes: int | None = setting(None, help="Number of classes (vision models; default: the model's).",
                                      flag="--num-classes", config="num_classes", csv="extra", minimum=1)
    steps: int = setting(3, help="Instrumented training steps; the first is warm-up for timings.", flag="--steps",
                         config="steps", csv="id", minimum=1)
    checkpointing: str = setting("none", help="Activation checkpointing: none; full (every block recomputed in "
                                 "backward); selective (matmul, attention and convolution outputs saved, the rest "
                                 "recomputed); every:N (blocks 0, N, 2N… recomputed). docs/recipes.md.",
                                 flag="--checkpointing", config="checkpointing", csv="extra", check=_checkpointing,
                                 metavar="|".join(CHECKPOINTING))
    grad_accum: int = setting(1, help="Gradient accumulation: micro-batches of --batch-size per optimizer step.",
                              flag="--grad-accum", config="grad_accum", csv="extra", minimum=1)
    seed: int = setting(0, help="Random seed for weights and batch.", flag="--seed", config="seed", csv="extra",
                        minimum=-2**63, maximum=2**64 - 1)  # torch.manual_seed's range
    timeline: bool = setting(True, help="Keep a downsampled per-category timeline in the record.")
    snapshot: str | None = setting(None, help="Write a torch memory snapshot (drag it onto pytorch.org/memory_viz): "
                                   "on CUDA the allocator's history (bounded, Python-only stacks); on CPU and in "
                                   "estimates every allocation, its category and phase as its frames.",
                                   flag="--snapshot", group="capture")
    estimate: bool = setting(False, help="Run on fake tensors (nothing allocated): figures for --target.",
                             csv="extra")
    target_gpu: str | None = setting(None, help="Estimate for this GPU: its capacity, library workspace and context "
                              "(see `memprof estimate --help`).", flag="--gpu", csv="extra", group="estimate",
                              check=_gpu)
    memory: str | None = setting(None, help="Memory budget to fit in (24GiB, 80GB); default: the --gpu's capacity.",
                                 flag="--memory", csv="extra", group="estimate", check=_size)
    alloc_conf: str | None = setting(None, help="The CUDA caching allocator's settings, as PYTORCH_CUDA_ALLOC_CONF takes "
                                     "them (max_split_size_mb:64,expandable_segments:True): set for a CUDA run, "
                                     "simulated by an estimate; default: the environment's PYTORCH_CUDA_ALLOC_CONF.",
                                     flag="--alloc-conf", config="alloc_conf", csv="extra", check=alloc_conf_problem,
                                     metavar="KEY:VALUE,…")
    nproc: int = setting(1, help="Ranks (the world size): launched on this machine with torch.distributed.run, "
                         "gloo on CPU, NCCL on CUDA (one GPU per rank); under your own torchrun, its WORLD_SIZE.",
                         flag="--nproc", config="nproc", csv="extra", group="distributed", minimum=1)
    parallel: str = setting("none", help=parallel.HELP,
                            flag="--parallel", config="parallel", csv="extra", group="distributed", choices=PARALLEL)
    fsdp_mixed_precision: str | None = setting(
        None, help="FSDP2 mixed precision (MixedPrecisionPolicy, as torchtitan trains): the fp32 shards stay the "
        "master copy, parameters are all-gathered and computed in bf16 or fp16, gradients reduced in fp32. "
        "Needs --parallel fsdp2 and --dtype float32. docs/recipes.md.", flag="--fsdp-mixed-precision",
        config="fsdp_mixed_precision", csv="extra", group="distributed", choices=FSDP_PARAM_DTYPES)
    full_depth: bool = setting(False, help="Estimate every block of the model op by op instead of extrapolating "
                               "from shallow probes of 1-3 blocks (slower; a check of the extrapolation). An "
                               "estimate for CUDA always is: its caching allocator is simulated on every "
                               "allocation.",
                               flag="--full-depth", csv="extra", group="estimate")
    rank: int = setting(0, help="The rank to simulate (memprof estimate with --parallel); in a real run, the rank "
                        "this record measured (0 in a single process).", flag="--rank", csv="extra", group="estimate",
                        minimum=0)
    all_ranks: bool = setting(False, help="Simulate every rank of --world-size, one record each, and show the "
                              "imbalance across them (the time grows with the world size).", flag="--all-ranks",
                              csv="extra", group="estimate")

    def __post_init__(self) -> None:
        for item in declared_fields():
            problem = _problem(item, getattr(self, item.name))
            if problem:
                raise UsageError(problem)
        ranks = "--world-size" if self.estimate else "--nproc"  # memprof estimate simulates the ranks
        if self.nproc > 1 and self.parallel == "none":
            raise UsageError(f"{ranks} {self.nproc} needs --parallel: choose {', '.join(PARALLEL[1:])}")
        if self.rank >= self.nproc:
            raise UsageError(f"rank {self.rank} is outside {ranks} {self.nproc}")
        if self.fsdp_mixed_precision:
            _check_fsdp_mixed_precision(self)
        if self.all_ranks:
            _check_all_ranks(self)
        if self.alloc_conf is not None and self.device == "cpu":
            raise UsageError("--alloc-conf sets the CUDA caching allocator: it cannot take effect on cpu "
                             "(use --device cuda, or drop it)")

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def recipes(self) -> str:
        """The training recipes in effect, for a title ("LoRA r=8 · checkpointing full · grad-accum 4"); empty when
        none (QLoRA where the base is quantized)."""
        parts = [f"{'QLoRA' if 'quant=' in self.lora else 'LoRA'} {self.lora}" if self.lora else "",
                 f"checkpointing {self.checkpointing}" if self.checkpointing != "none" else "",
                 f"grad-accum {self.grad_accum}" if self.grad_accum > 1 else "",
                 f"mixed precision {self.fsdp_mixed_precision} (fp32 reduce)" if self.fsdp_mixed_precision else ""]
        return " · ".join(p for p in parts if p)


def _check_fsdp_mixed_precision(settings: Settings) -> None:
    """``--fsdp-mixed-precision`` is FSDP2's policy over fp32 master shards: other strategies have no such
    policy, shards already in bf16 or fp16 would have no master copy, and autocast on top is what torchtitan
    turns off under the policy."""
    flag = f"--fsdp-mixed-precision {settings.fsdp_mixed_precision}"
    if settings.parallel != "fsdp2":
        raise UsageError(f"{flag} is FSDP2's MixedPrecisionPolicy: it needs --parallel fsdp2 (got "
                         f"{settings.parallel})")
    if settings.dtype != "float32":
        raise UsageError(f"{flag} keeps fp32 shards as the master copy: it needs --dtype float32 (got "
                         f"{settings.dtype}); for {settings.dtype} shards drop --fsdp-mixed-precision")
    if settings.amp:
        raise UsageError(f"{flag} already computes in {settings.fsdp_mixed_precision}: drop --amp {settings.amp}")


def _check_all_ranks(settings: Settings) -> None:
    """``--all-ranks`` simulates each rank of an estimate's world (a real distributed run measures every rank
    already), and a snapshot records one rank's allocations."""
    if not settings.estimate:
        raise UsageError("--all-ranks simulates the ranks of an estimate (memprof estimate); a run with --nproc "
                         "measures every rank already")
    if settings.nproc < 2 or settings.parallel == "none":
        raise UsageError("--all-ranks needs ranks to simulate: give --world-size N (2 or more) and --parallel "
                         f"({', '.join(PARALLEL[1:])})")
    if settings.snapshot is not None:
        raise UsageError("--snapshot records one rank's allocations: drop --all-ranks and pick the rank with --rank")


def declared_fields(group: str | None = None) -> list[dataclasses.Field]:
    """The settings' fields (only those whose flag belongs to ``group`` when given), in order."""
    return [f for f in dataclasses.fields(Settings) if group is None or (_meta(f).flag and _meta(f).group == group)]


def declaration(name: str) -> Declared:
    return _meta(next(f for f in dataclasses.fields(Settings) if f.name == name))


def _meta(item: dataclasses.Field) -> Declared:
    return item.metadata["memprof"]


def _problem(item: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for this setting, in one line naming the valid choices."""
    meta = _meta(item)
    name = meta.flag or item.name
    if value is None:
        return None if "None" in str(item.type) else f"{name} needs a value"
    kind = _base_type(item)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name} must be an integer, got {_shown(value)}"
    if kind is str and not isinstance(value, str):
        return f"{name} must be text, got {_shown(value)}"
    if kind is bool and not isinstance(value, bool):
        return f"{name} must be true or false, got {_shown(value)}"
    if meta.minimum is not None and meta.maximum is not None and not meta.minimum <= value <= meta.maximum:
        return f"{name} must be between {meta.minimum} and {meta.maximum}, got {_shown(value)}"
    if meta.minimum is not None and value < meta.minimum:
        return f"{name} must be at least {meta.minimum}, got {_shown(value)}"
    if kind is int and value > INT64_MAX and meta.maximum is None:
        return f"{name} must be at most {INT64_MAX} (torch sizes are 64-bit), got {_shown(value)}"
    if meta.choices is not None and value not in meta.choices:
        return f"unknown {item.name} {value!r}; choose {', '.join(meta.choices)}"
    return meta.check(value) if meta.check else None


def _shown(value: Any) -> str:
    """``value`` as an error message quotes it: an integer too long to print (Python refuses past 4,300 digits)
    by its length, long text cut."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _base_type(item: dataclasses.Field) -> type:
    text = str(item.type).replace(" | None", "")
    return {"int": int, "str": str, "bool": bool}[text]


# -- derived views of the declaration ---------------------------------------------------------------
def config_keys() -> dict[str, str]:
    """Config-file key → field name."""
    return {_meta(f).config: f.name for f in declared_fields() if _meta(f).config}


def csv_columns(role: CsvRole) -> tuple[str, ...]:
    return tuple(f.name for f in declared_fields() if _meta(f).csv == role)


def from_text(cells: Mapping[str, str]) -> dict[str, Any]:
    """Field values from text cells (a CSV row); empty or missing cells are left out."""
    from memprof.limits import shorten

    values: dict[str, Any] = {}
    for item in declared_fields():
        text = cells.get(item.name)
        if text is None or text == "":
            continue
        kind = _base_type(item)
        if kind is int:
            values[item.name] = _integer(item.name, text)
        elif kind is bool:
            if text.lower() not in ("true", "false"):
                raise UsageError(f"{item.name} {shorten(text)} is not true or false")
            values[item.name] = text.lower() == "true"
        else:
            values[item.name] = text
    return values


def _integer(name: str, text: str) -> int:
    """An integer cell: ``12``, or ``12.0`` as a spreadsheet may write it."""
    from memprof.limits import MAX_INTEGER_CHARS, shorten

    if len(text) > MAX_INTEGER_CHARS:
        raise UsageError(f"{name} {shorten(text)} is not a valid int; an integer has at most {MAX_INTEGER_CHARS} "
                         "characters")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise UsageError(f"{name} {text!r} is not a valid int")
    return int(number)


def request_fields(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``memprof.api.measure`` that would measure ``settings`` again
    (the per-optimizer fields, ``optimizer`` and ``spec``, are the call's second argument)."""
    return {f.name: getattr(settings, f.name) for f in declared_fields()
            if f.name not in ("model", "optimizer", "spec") and _meta(f).group != "capture"
            # a real run measures every rank at once; a simulation the rank it was asked for, or all of them
            and (f.name != "rank" or (settings.estimate and not settings.all_ranks))}


def reproduce_command(settings: Settings, specs: Sequence[str]) -> str:
    """The ``memprof compare`` (or ``estimate``) line that measures ``specs`` with ``settings`` again."""
    parts = ["memprof estimate" if settings.estimate else "memprof compare"]
    optional = [*(declared_fields("estimate") if settings.estimate else []),
                *(declared_fields("distributed") if settings.parallel != "none" else [])]
    for item in [*declared_fields("run"), *optional]:
        meta = _meta(item)
        value = ",".join(specs) if item.name == "spec" else getattr(settings, item.name)
        if value is None or value is False or (item.name == "rank" and settings.all_ranks):
            continue
        parts.append(meta.flag if value is True else f"{meta.flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def group_by_request(settings: Iterable[Settings]) -> list[tuple[Settings, list[str]]]:
    """Settings that differ only in the optimizer (or the rank), grouped: (the first's settings, the specs)."""
    groups: dict[tuple, tuple[Settings, list[str]]] = {}
    for s in settings:
        key = (s.model, *request_fields(s).items())
        specs = groups.setdefault(key, (s, []))[1]
        if s.spec not in specs:
            specs.append(s.spec)
    return list(groups.values())
