"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr, constant, or wsd
(warmup-stable-decay: constant lr, then linear decay to min_lr over the last optim.decay_fraction)."""

from __future__ import annotations

import math

import torch

from megatrain.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "wsd":
        stable = optim.stable_steps(total_steps)
        if step < stable:
            return optim.lr
        progress = min(1.0, (step - stable + 1) / max(1, total_steps - stable))
        return optim.lr + (optim.min_lr - optim.lr) * progress
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
    return optim.min_lr + (optim.lr - optim.min_lr) * shape


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """lr_at as a torch scheduler. Its length is an attribute, so it is saved in the state_dict
    (DeepSpeed's checkpoint, the portable copy) and a resumed run knows the original one."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
        self.total_steps = total_steps
        super().__init__(optimizer, lambda step: lr_at(step, optim, self.total_steps) / optim.lr)


def on_resume(scheduler: Schedule, optim: OptimConfig, train_steps: int) -> str | None:
    """After loading a checkpoint: keep the saved schedule length or re-stretch it to `train_steps`
    (optim.resume_schedule); returns what changed for the log, or None when nothing did."""
    saved = scheduler.total_steps
    step = scheduler.last_epoch  # optimizer steps taken: the next step's lr is lr_at(step)
    if saved == train_steps:
        return None
    kept, stretched = lr_at(step, optim, saved), lr_at(step, optim, train_steps)
    if optim.resume_schedule == "stretch":
        scheduler.total_steps = train_steps
        for group in scheduler.optimizer.param_groups:
            group["lr"] = stretched  # the scheduler sets rates only when it steps; the next step needs this one
        return (f"train.steps changed from {saved} to {train_steps}: the LR schedule is re-stretched over "
                f"{train_steps} steps (optim.resume_schedule=stretch): the next lr is {stretched:.3g} "
                f"instead of {kept:.3g}")
    if kept == stretched:
        return None
    return (f"train.steps changed from {saved} to {train_steps}: the LR schedule keeps its {saved}-step shape "
            f"(optim.resume_schedule=keep) and holds its final lr {lr_at(saved, optim, saved):.3g} after step "
            f"{saved}; optim.resume_schedule=stretch would re-stretch it, moving the next lr from {kept:.3g} to "
            f"{stretched:.3g}")
