"""MFU's peak, the throughput window, the on-device loss watch and the step timer (CPU)."""

from __future__ import annotations

import pytest
import torch

from megatrain.observe import meters
from megatrain.observe.meters import LossWatch, StepTimer, Throughput, peak_flops

CPU = torch.device("cpu")


@pytest.mark.parametrize(("device_type", "name", "precision", "user", "peak"), [
    ("cuda", "NVIDIA H200", "bf16", None, 989e12),
    ("cuda", "NVIDIA H100 PCIe", "bf16", None, 756.5e12),
    ("cuda", "NVIDIA H100 80GB HBM3", "fp32", None, 67e12),
    ("cuda", "NVIDIA A100-SXM4-80GB", "bf16", None, 312e12),
    ("cuda", "NVIDIA B200", "fp32", None, None),  # no fp32 figure in the table: no MFU
    ("cuda", "Some Future GPU", "bf16", None, None),
    ("cpu", "", "fp32", None, None),  # never a quick measurement at start-up
    ("cpu", "", "fp32", 1.5, 1.5e12),
    ("cuda", "NVIDIA H200", "bf16", 900.0, 900e12),  # the user's key wins
])
def test_the_peak_comes_from_the_datasheet_or_the_user_never_a_measurement(device_type, name, precision, user, peak):
    got, source = peak_flops(device_type, name, precision, user)
    assert got == peak
    assert ("observe.peak_tflops" in source) == (peak is None or user is not None)


def test_no_matmul_is_timed_to_guess_a_peak():
    assert not hasattr(meters, "measure_matmul_flops")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_throughput_window_excludes_eval_and_save_and_restarts_steps_with_its_clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(meters.time, "perf_counter", clock)
    window = Throughput()
    for _ in range(3):
        clock.now += 2.0
        window.step()
    with window.excluded(CPU):  # eval or save: 50 s that are not training
        clock.now += 50.0
    clock.now += 2.0
    window.step()
    assert (window.steps, window.seconds()) == (4, 8.0)
    window.restart()
    clock.now += 1.0
    window.step()
    assert (window.steps, window.seconds()) == (1, 1.0)


def test_the_loss_watch_remembers_the_first_non_finite_step_until_read():
    watch = LossWatch(CPU)
    for step, loss in enumerate((2.0, float("nan"), 1.5, float("inf")), start=1):
        watch.update(torch.tensor(loss), step)
    assert watch.read() == (float("inf"), 2)
    clean = LossWatch(CPU)
    clean.update(torch.tensor(3.0), 1)
    assert clean.read() == (3.0, 0)


def test_the_step_timer_sums_phases_between_pops(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(meters.time, "perf_counter", clock)
    timer = StepTimer(CPU)
    for _ in range(2):
        timer.start()
        clock.now += 1.0
        timer.stop("data_s")
        clock.now += 3.0
        timer.stop("fwd_bwd_s")
    assert timer.pop() == {"data_s": 2.0, "fwd_bwd_s": 6.0}
    assert timer.pop() == {}
