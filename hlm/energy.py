"""Hardware energy counters. A meter reads a cumulative counter in joules; the decoder takes differences
around each compute window. Where no counter exists the decoder models energy as power x measured time,
and every figure says which (`TokenEvent.energy_method`, the summary's `energy_methods`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

RAPL_DIR = Path("/sys/class/powercap/intel-rapl:0")


class EnergyMeter(Protocol):
    method: str

    def read_j(self) -> float: ...


class NvmlMeter:
    """NVML's total-energy counter (millijoules since driver load, whole board; Volta and newer)."""

    def __init__(self, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # raises where unsupported
        self.method = f"measured: NVML total-energy counter, GPU {index} ({pynvml.nvmlDeviceGetName(self._handle)})"

    def read_j(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0


class RaplMeter:
    """Intel/AMD RAPL package counter via powercap (whole CPU package, microjoules, wraps around)."""

    def __init__(self, root: Path = RAPL_DIR) -> None:
        self._file = root / "energy_uj"
        self._range = int((root / "max_energy_range_uj").read_text())
        self._last = int(self._file.read_text())
        self._total = 0
        self.method = "measured: RAPL package energy counter (whole CPU package)"

    def read_j(self) -> float:
        now = int(self._file.read_text())
        self._total += (now - self._last) % self._range
        self._last = now
        return self._total / 1e6


def open_meter(device: torch.device) -> EnergyMeter | None:
    """The best counter for where the model runs, or None (then energy is modelled)."""
    try:
        if device.type == "cuda":
            return NvmlMeter(device.index or 0)
        if device.type == "cpu" and RAPL_DIR.exists():
            return RaplMeter()
    except Exception:  # no driver, no permission, unsupported GPU: fall back to the model, labelled so
        return None
    return None


@dataclass
class Window:
    seconds: float = 0.0
    joules: float | None = None


@contextmanager
def measure(device: torch.device, meter: EnergyMeter | None) -> Iterator[Window]:
    """Time (and, with a meter, energy) of one compute window; synchronises CUDA so time is real."""
    window = Window()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    e0 = meter.read_j() if meter else None
    t0 = time.perf_counter()
    yield window
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    window.seconds = time.perf_counter() - t0
    if meter is not None and e0 is not None:
        window.joules = meter.read_j() - e0
