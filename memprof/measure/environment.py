"""Environment metadata for the run record, and NVML's view of this process."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from memprof._version import __version__


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def collect(device: torch.device) -> dict[str, Any]:
    """What a reader needs to reproduce a number: software, hardware, allocator settings."""
    env: dict[str, Any] = {
        "memprof": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torchvision": _version("torchvision"),
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory=props.total_memory,
            cudnn=torch.backends.cudnn.version(),
            allocator_backend=torch.cuda.get_allocator_backend(),
            allocator_config=os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or "",
            driver=_nvml_driver(),
        )
    return env


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library: NVML rows become n/a
        return None


def _nvml_driver() -> str | None:
    nvml = _nvml()
    if nvml is None:
        return None
    driver = nvml.nvmlSystemGetDriverVersion()
    return driver.decode() if isinstance(driver, bytes) else driver


def nvml_device_used() -> dict[str, int]:
    """Used bytes per GPU UUID, as NVML sees the whole device (taken before CUDA starts)."""
    nvml = _nvml()
    if nvml is None:
        return {}
    out = {}
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        out[uuid.decode() if isinstance(uuid, bytes) else uuid] = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
    return out


def nvml_process_bytes(device: torch.device, before: dict[str, int]) -> tuple[int | None, str]:
    """Device memory NVML charges to this process, and how it was read.

    NVML's per-process figure when the process is visible to it; inside a container whose PID
    namespace hides it, the growth of the device's used memory since ``before`` (memprof runs
    one measurement at a time, so that growth is this process's).
    """
    nvml = _nvml()
    if nvml is None:
        return None, "n/a"
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory), "nvml process"
        if uuid in before:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).used) - before[uuid], "nvml device delta"
    except Exception:
        return None, "n/a"
    return None, "n/a"
