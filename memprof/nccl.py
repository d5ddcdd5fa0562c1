"""NCCL's device memory per rank: the buffers of a distributed run's communicators, from NCCL's defaults.

Assumed, never measured: the figures follow NCCL's source for the version torch bundles (torch 2.14 + cu130
ships nvidia-nccl-cu13 2.30.7; read at NVIDIA/nccl v2.30.7) and the topology each GPU kind usually has (an
8-GPU node), not the machine. Per communicator and rank NCCL holds, in device memory:

* ring buffers: per channel one receive connection (the LL, LL128 and Simple protocols' buffers, with the
  connection's head/tail) and one send connection (head/tail only) (src/transport/p2p.cc: p2pRecvSetup adds
  ``buffSizes[p]`` for each protocol; P2P read moves Simple to the sender, the sum stays). With cuMem
  (NCCL_CUMEM_ENABLE, on by default) each is rounded up to the 2 MiB allocation granularity: 10,485,760 B and
  2,097,152 B, the two sizes NCCL logs per peer and channel on 8 × H100 (NVIDIA/nccl#1685).
* tree buffers across nodes only (more than ``GPUS_PER_NODE`` ranks): the chain's connections up and down,
  twice the ring's. Within one node NCCL 2.22+ connects an algorithm when an operation first picks it
  (NCCL_RUNTIME_CONNECT=1), and picks Ring or NVLS there.
* NVLS (NVLink SHARP) buffers on Hopper NVSwitch nodes: nvlsChannels × 2 × (NCCL_NVLS_CHUNKSIZE × NCCL_STEPS) ×
  nHeads (src/transport/nvls.cc: ncclNvlsBufferSetup), nHeads = the node's GPUs: 16 × 2 × 1 MiB × 8 = 256 MiB
  on 8 × H100. NCCL 2.18–2.20 sized them from NCCL_BUFFSIZE (4 MiB) plus 2 MiB of credits per buffer:
  16 × 2 × 6 MiB × 8 = 1.5 GiB, which with the ring's 384 MiB is the ~1.6–1.9 GB per communicator users
  reported on H100 nodes in 2023 (NVIDIA/nccl#864; NeMo and JAX-Toolbox set NCCL_NVLS_ENABLE=0 for it).

Not counted: host memory (proxy buffers, SHM transport, NET's LL/LL128 buffers), NCCL's small per-channel
device structures, the point-to-point connections ``send``/``recv`` or all-to-all open (up to 32 channels per
peer, NVIDIA/nccl#1685: none of memprof's strategies use them), and CollNet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from memprof.errors import UsageError

MiB = 1 << 20
NCCL_VERSION = "2.30.7"
STEPS = 8
"""NCCL_STEPS (src/include/device.h): slots per connection buffer."""
LL_BUFFSIZE = 8 * 512 * STEPS * 16
"""DEFAULT_LL_BUFFSIZE (src/init.cc): NCCL_LL_LINES_PER_THREAD × NCCL_LL_MAX_NTHREADS × NCCL_STEPS ×
sizeof(ncclLLFifoLine) = 524,288 B; NCCL_LL_BUFFSIZE overrides it."""
LL128_BUFFSIZE = 120 * 640 * STEPS * 8
"""DEFAULT_LL128_BUFFSIZE: NCCL_LL128_ELEMS_PER_THREAD × NCCL_LL128_MAX_NTHREADS × NCCL_STEPS × 8 = 4,915,200 B;
NCCL_LL128_BUFFSIZE overrides it."""
SIMPLE_BUFFSIZE = 1 << 22
"""DEFAULT_BUFFSIZE, 4 MiB: the Simple protocol's buffer; NCCL_BUFFSIZE overrides it."""
CONNECTION_HEADER = 4096
"""ncclSendMem/ncclRecvMem (head, tail, offsets): under a page; only matters without cuMem's rounding."""
CUMEM_GRANULARITY = 2 * MiB
"""cuMemGetAllocationGranularity(MINIMUM) of device memory on these GPUs: each buffer is rounded up to it."""
NVLS_CHUNKSIZE = 128 * 1024
"""NCCL_NVLS_CHUNKSIZE's default (src/transport/nvls.cc)."""
NVLS_CHANNELS_SM90 = 16
"""NVLS_NCHANNELS_SM90: NVLS channels on Hopper (NCCL_NVLS_NCHANNELS overrides it)."""
MAX_CHANNELS = 64
"""MAXCHANNELS (src/include/device.h)."""
GPUS_PER_NODE = 8
"""Ranks per node assumed for an estimate's --world-size (an HGX/DGX node); a real run's --nproc is one node."""


@dataclass(frozen=True)
class Topology:
    """What NCCL's defaults depend on for one GPU kind (assumed: the kind's usual 8-GPU node)."""

    channels: int
    """Ring channels NCCL runs: twice the channels its topology search finds."""
    nvls: bool
    """NVLink SHARP available (third-generation NVSwitch, Hopper): NCCL_NVLS_ENABLE's default 2 enables it."""
    device_buffers: bool
    """The transport keeps its buffers in device memory (P2P over NVLink/PCIe); False: SHM, in host memory."""
    why: str


TOPOLOGIES: dict[str, Topology] = {
    "h100": Topology(32, True, True, "HGX H100: 18 NVLinks per GPU to NVSwitch, 16 search channels run as 32; "
                                     "32 channels per peer in NCCL's logs on 8 × H100 (NVIDIA/nccl#1685)"),
    "h200": Topology(32, True, True, "HGX H200: the H100's NVLink/NVSwitch fabric"),
    "a100-80gb": Topology(24, False, True, "HGX A100: 12 NVLinks per GPU to NVSwitch (no SHARP), 12 search channels "
                                           "run as 24"),
    "a100-40gb": Topology(24, False, True, "HGX A100: as the 80 GB"),
    "l40s": Topology(2, False, True, "PCIe only: one ring found, run as 2 channels, P2P over PCIe"),
    "rtx4090": Topology(2, False, False, "PCIe, and the driver refuses peer-to-peer on GeForce cards: NCCL's SHM "
                                         "transport, whose buffers are host memory"),
}


@dataclass(frozen=True)
class NcclEnv:
    """NCCL's environment variables that size its buffers (unset: NCCL's defaults)."""

    simple: int = SIMPLE_BUFFSIZE
    ll: int = LL_BUFFSIZE
    ll128: int = LL128_BUFFSIZE
    min_channels: int | None = None
    max_channels: int | None = None
    nvls_enable: int = 2
    nvls_channels: int = NVLS_CHANNELS_SM90
    nvls_chunk: int = NVLS_CHUNKSIZE
    cumem: bool = True
    set_by_user: tuple[str, ...] = ()


_VARIABLES = {  # NCCL's name: (field, smallest value NCCL accepts)
    "NCCL_BUFFSIZE": ("simple", 1), "NCCL_LL_BUFFSIZE": ("ll", 1), "NCCL_LL128_BUFFSIZE": ("ll128", 1),
    "NCCL_MIN_NCHANNELS": ("min_channels", 1), "NCCL_MAX_NCHANNELS": ("max_channels", 1),
    "NCCL_MIN_CTAS": ("min_channels", 1), "NCCL_MAX_CTAS": ("max_channels", 1),
    "NCCL_NVLS_ENABLE": ("nvls_enable", 0), "NCCL_NVLS_NCHANNELS": ("nvls_channels", 1),
    "NCCL_NVLS_CHUNKSIZE": ("nvls_chunk", 1), "NCCL_CUMEM_ENABLE": ("cumem", 0),
}


def nccl_env(environ: Mapping[str, str]) -> NcclEnv:
    """The buffer settings ``environ`` gives NCCL; a value that is not a whole number is a UsageError."""
    values: dict[str, object] = {}
    for name, (field, least) in _VARIABLES.items():
        text = environ.get(name)
        if text is None or text == "":
            continue
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{name}={text!r} is not a whole number (NCCL reads it as an integer); unset it or "
                             "give one") from None
        if value < least:
            raise UsageError(f"{name}={value} is below {least}, the least NCCL accepts")
        values[field] = bool(value) if field == "cumem" else value
    users = tuple(name for name in _VARIABLES if environ.get(name))
    return NcclEnv(**values, set_by_user=users)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Communicator:
    """One communicator's device memory on one rank, and how it was reckoned."""

    ring: int
    """Ring (and, across nodes, tree) connection buffers."""
    nvls: int
    """NVLink SHARP buffers (0 where NVLS is off or absent)."""
    channels: int
    nvls_channels: int
    nodes: int
    how: str


def _rounded(size: int, env: NcclEnv) -> int:
    return -(-size // CUMEM_GRANULARITY) * CUMEM_GRANULARITY if env.cumem else size


def communicator(gpu: str, world_size: int, env: NcclEnv) -> Communicator:
    """The device bytes one NCCL communicator over ``world_size`` ranks holds on each rank of ``gpu`` GPUs."""
    topology = TOPOLOGIES.get(gpu, TOPOLOGIES["h100"])
    local = min(world_size, GPUS_PER_NODE)
    nodes = math.ceil(world_size / GPUS_PER_NODE)
    channels = topology.channels
    if env.max_channels is not None:
        channels = min(channels, env.max_channels)
    if env.min_channels is not None:
        channels = max(channels, env.min_channels)
    channels = min(channels, MAX_CHANNELS)
    receive = _rounded(env.ll + env.ll128 + env.simple + CONNECTION_HEADER, env)
    send = _rounded(CONNECTION_HEADER, env)
    connections = 1 + (2 if nodes > 1 else 0)  # the ring's; across nodes the tree's chain up and down too
    ring = channels * connections * (receive + send) if topology.device_buffers and world_size > 1 else 0
    nvls_on = topology.nvls and env.nvls_enable != 0 and local >= 2
    nvls_channels = env.nvls_channels if nvls_on else 0
    nvls = _rounded(nvls_channels * 2 * env.nvls_chunk * STEPS * local, env) if nvls_on else 0
    how = (f"NCCL {NCCL_VERSION}'s defaults on {gpu if gpu in TOPOLOGIES else 'an unknown GPU (the H100s)'}: "
           f"{channels} channels × {connections} connection(s) × {(receive + send) / MiB:g} MiB"
           + (f" + NVLS {nvls_channels} channels × 2 × {env.nvls_chunk * STEPS / MiB:g} MiB × {local} heads"
              if nvls_on else "")
           + f", {nodes} node(s) of ≤ {GPUS_PER_NODE}; {topology.why}"
           + (f"; set by the environment: {', '.join(env.set_by_user)}" if env.set_by_user else ""))
    return Communicator(ring, nvls, channels, nvls_channels, nodes, how)
