"""Where a bench ran: device, CPU, threads and library versions, and the device's peak FLOP/s
per precision (the denominators of MFU and of the bf16 vs fp32 ceiling)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import torch

from edmcli.bench.flops import peak_flops
from edmcli.data.store_format import code_version

__all__ = ["device_peaks", "environment"]


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device, memory, threads and versions of this run."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "monai": _version("monai"),
        "echo_synth": code_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "device_name": torch.cuda.get_device_name(device),
            "device_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    else:
        info["device_name"] = info["cpu"]
    return info


def device_peaks(device: torch.device) -> dict[str, float | None]:
    """Peak FLOP/s for bf16 and for fp32 work (TF32 tensor cores where cuDNN may use them, as
    PyTorch lets its fp32 convolutions do by default); None on a CPU or an unknown card."""
    if device.type != "cuda":
        return {"bf16": None, "fp32": None}
    name = torch.cuda.get_device_name(device)
    fp32 = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return {"bf16": peak_flops(name, "bf16"), "fp32": peak_flops(name, fp32)}
