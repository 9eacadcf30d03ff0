"""Throughput, MFU and memory: numbers measured, not guessed.

MFU = achieved model FLOP/s per device / peak FLOP/s of that device. The peak is the vendor's
dense bf16 figure for known GPUs, and is measured at start-up on a CPU (a short matmul).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from megatrain import hardware


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, size: int = 1024, seconds: float = 0.3) -> float:
    """Sustained FLOP/s of a square matmul on this device: the CPU's 'peak' for MFU."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm up kernels and caches
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * n / (time.perf_counter() - start)


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure comes from)."""
    if device.type == "cuda":
        accelerator = hardware.by_device_name(torch.cuda.get_device_name(device))
        peak = hardware.peak_flops(accelerator, precision) if accelerator else None
        if peak is not None:
            return peak, f"{accelerator.name} datasheet"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_flops(dtype, device), f"measured {precision} matmul on {device.type}"


def memory_stats(device: torch.device) -> dict[str, float]:
    """GiB: allocated and peak on a GPU; peak resident set size of this process on a CPU."""
    if device.type == "cuda":
        return {"mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
                "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem_peak_rss_gb": rss_kb / (2**30 if sys.platform == "darwin" else 2**20)}


class StepTimer:
    """Accumulates wall time per phase (data, forward_backward, optimizer) between log steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._start
        self._start = now

    def pop(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals
