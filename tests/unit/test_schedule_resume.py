"""Changing train.steps on resume keeps the saved LR schedule (or re-stretches it, by key) and says so."""

from __future__ import annotations

import pytest
import torch

from megatrain.config import OptimConfig
from megatrain.engine.schedule import Schedule, lr_at, on_resume

OPTIM = OptimConfig(lr=6e-4, min_lr=3e-5, warmup_steps=2, schedule="cosine")


def _resumed(saved_steps: int, new_steps: int, done: int, optim: OptimConfig):
    """A scheduler that ran `done` steps of a `saved_steps` run, reloaded into a `new_steps` run."""
    first = Schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr), optim, saved_steps)
    for _ in range(done):
        first.optimizer.step()
        first.step()
    state = first.state_dict()
    scheduler = Schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr), optim, new_steps)
    scheduler.load_state_dict(state)
    scheduler.optimizer.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]  # as the optimizer state does
    return scheduler


def test_keep_continues_the_saved_schedule_and_holds_its_final_lr():
    scheduler = _resumed(100, 200, 50, OPTIM)
    message = on_resume(scheduler, OPTIM, 200)
    assert "changed from 100 to 200" in message and "optim.resume_schedule=stretch" in message
    assert scheduler.total_steps == 100
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(50, OPTIM, 100))
    for _ in range(80):  # past the saved end: the final lr, no jump back up
        scheduler.optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(OPTIM.min_lr)


def test_stretch_re_stretches_and_names_the_jump():
    optim = OptimConfig(lr=6e-4, min_lr=3e-5, warmup_steps=2, schedule="cosine", resume_schedule="stretch")
    scheduler = _resumed(100, 200, 90, optim)
    message = on_resume(scheduler, optim, 200)
    assert f"{lr_at(90, optim, 200):.3g} instead of {lr_at(90, optim, 100):.3g}" in message
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(90, optim, 200))
    scheduler.optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(lr_at(91, optim, 200))


def test_same_length_or_a_constant_schedule_changes_nothing():
    assert on_resume(_resumed(100, 100, 50, OPTIM), OPTIM, 100) is None
    constant = OptimConfig(lr=1e-3, warmup_steps=2, schedule="constant")
    assert on_resume(_resumed(100, 300, 50, constant), constant, 300) is None


def test_wsd_is_the_same_schedule_for_every_length_until_its_decay():
    optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    short, long = [lr_at(s, optim, 100) for s in range(100)], [lr_at(s, optim, 400) for s in range(400)]
    assert optim.stable_steps(100) == 80 and short[:80] == long[:80]
    assert short[4] == long[79] == 1e-2 and short[80] < 1e-2
    assert short[-1] == pytest.approx(1e-3) and all(a > b for a, b in zip(short[80:], short[81:]))
