"""Throughput, MFU, memory and step timing: numbers measured or from a cited spec, never guessed.

MFU = achieved model FLOP/s per device / peak FLOP/s of that device. The peak is the datasheet's dense
figure (megatrain/hardware.py) for a known GPU, or `observe.peak_tflops`; otherwise MFU is omitted.

Nothing here waits for the GPU between log steps: the loss and the phase timings stay on the device
(the loss as a tensor, timings as CUDA events) and `to_host` reads them, once per log row.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from megatrain import hardware


def to_host(**values: torch.Tensor) -> dict[str, float]:
    """The loop's one device-to-host read: every value in a single copy (it waits for the GPU)."""
    names = list(values)
    host = torch.stack([values[n].detach().float().reshape(()) for n in names]).tolist()
    return dict(zip(names, host))


def peak_flops(device_type: str, device_name: str, precision: str,
               user_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s per device or None, where the figure comes from): the user's key, else the datasheet
    table for a known CUDA device; a CPU or an unknown GPU has no peak, and MFU is then omitted."""
    if user_tflops is not None:
        return user_tflops * 1e12, "observe.peak_tflops"
    if device_type == "cuda":
        accelerator = hardware.by_device_name(device_name)
        peak = hardware.peak_flops(accelerator, precision) if accelerator else None
        if peak is not None:
            return peak, f"{accelerator.name} {precision} datasheet"
        return None, f"no {precision} datasheet peak for {device_name!r}: set observe.peak_tflops for MFU"
    return None, f"no peak for a {device_type}: set observe.peak_tflops for MFU"


def memory_stats(device: torch.device) -> dict[str, float]:
    """GiB: allocated and peak on a GPU; peak resident set size of this process on a CPU."""
    if device.type == "cuda":
        return {"mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
                "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    peak = process_memory().get("peak_rss")  # VmHWM: ru_maxrss keeps the RSS a parent had when it forked us
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"mem_peak_rss_gb": peak / 2**30}


def process_memory() -> dict[str, int]:
    """Bytes: this process's resident set now ("rss") and its high-water mark ("peak_rss", VmHWM); {} off Linux."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak_rss": int(fields["VmHWM"].split()[0]) * 1024}


def wait_for_device(device: torch.device) -> None:
    """Before timing something that is not training (eval, a save): let queued training work finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LossWatch:
    """The training loss kept on the device: the latest value, and the first step it was not finite.

    Updating costs two small kernels and no sync; `read` (at log and save steps) is the sync.
    """

    def __init__(self, device: torch.device):
        self.last = torch.full((), float("nan"), device=device)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss so far finite

    def update(self, loss: torch.Tensor, step: int) -> None:
        self.last = loss.detach().float()
        bad = ~torch.isfinite(self.last) & (self.first_bad == 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def read(self) -> tuple[float, int]:
        """(latest loss, first step with a non-finite loss or 0): one device-to-host read."""
        host = to_host(loss=self.last, first_bad=self.first_bad)
        return host["loss"], int(host["first_bad"])


class Throughput:
    """Training steps and seconds since the window began; eval and save time excluded from the seconds.

    Seconds are host wall time between two log rows, each of which waits for the device (`to_host`),
    so on a GPU they cover the queued work too.
    """

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.steps, self._start, self._excluded = 0, time.perf_counter(), 0.0

    def step(self) -> None:
        self.steps += 1

    @contextmanager
    def excluded(self, device: torch.device) -> Iterator[None]:
        wait_for_device(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - start

    def seconds(self) -> float:
        return time.perf_counter() - self._start - self._excluded


class StepTimer:
    """Time per phase (data, forward_backward, optimizer) between log steps, without waiting for the GPU.

    On CUDA each mark is an event recorded on the current stream, and phases are GPU-stream time read
    at `pop` (the log step); on a CPU they are wall time.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: list[tuple[str, Any, Any]] = []  # (phase, begin, end): CUDA events or perf_counter
        self._last: Any = None

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._last = self._mark()

    def stop(self, phase: str) -> None:
        now = self._mark()
        self._spans.append((phase, self._last, now))
        self._last = now

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last pop (on CUDA, waits for the last event)."""
        spans, self._spans = self._spans, []
        if self.cuda and spans:
            spans[-1][2].synchronize()
        totals: dict[str, float] = {}
        for phase, begin, end in spans:
            seconds = begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
            totals[phase] = totals.get(phase, 0.0) + seconds
        return totals
