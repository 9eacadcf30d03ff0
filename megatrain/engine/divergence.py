"""Divergence: detect it (non-finite loss, grad norm or weights; a loss spike) and never publish its weights.

Checks run only where the loop already reads the device (log and save steps): between them training
stays sync-free. A save first checks every rank's parameters (one flag all-reduced over ranks), so
no published checkpoint holds a NaN or inf. On divergence, `train.on_divergence` picks: `stop` (an
error naming the step and the last good checkpoint) or `rollback` (reload the last good checkpoint,
skip the batches of the diverged span, go on; at most `train.max_rollbacks` times).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("megatrain")

EXIT_DIVERGED = 65  # EX_DATAERR: not 75, a batch script must not requeue a diverged run as it is
# Test-only (like MEGATRAIN_TEST_SAVE_PAUSE): after the optimizer step of this step, once per process, one
# parameter tensor is set to NaN, a stand-in for a batch that breaks the model, to exercise rollback end to end.
TEST_POISON_STEP = "MEGATRAIN_TEST_POISON_STEP"


class Diverged(RuntimeError):
    """The run diverged at `step`; the message names the cause and the last good checkpoint."""

    def __init__(self, step: int, cause: str, last_good: Path | None, unchecked: Path | None = None):
        self.step, self.cause, self.last_good = step, cause, last_good
        where = (f"the last good checkpoint is {last_good}" if last_good is not None
                 else "no checkpoint before it is known good")
        if unchecked is not None:  # saved after the last loss checked: its update may be what broke the model
            where += f" ({unchecked} was saved after the last loss checked and may hold the diverged model)"
        super().__init__(f"training diverged at step {step}: {cause}; nothing was saved from it, {where} "
                         "(lower optim.lr, check the data, or set train.on_divergence=rollback)")


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of this rank's parameters holding a NaN or inf (one device read; ZeRO-3 checks its partition)."""
    named = [(n, getattr(p, "ds_tensor", p)) for n, p in module.named_parameters()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu().tolist()
    return [n for (n, _), ok in zip(named, finite) if not ok]


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective over every rank: True if any rank's flag is."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class Guard:
    """The last good checkpoint and the recent logged losses; raises Diverged where a check fails."""

    def __init__(self, train_cfg: Any, last_good: Path | None, device: torch.device):
        self.factor, self.device = train_cfg.spike_factor, device
        self.on_divergence, self.max_rollbacks = train_cfg.on_divergence, train_cfg.max_rollbacks
        self.recent: deque[float] = deque(maxlen=train_cfg.spike_window)
        self.last_good, self.unchecked, self.rollbacks = last_good, None, 0
        poison = os.environ.get(TEST_POISON_STEP)
        self.poison_step = int(poison) if poison else None

    def check_log(self, step: int, loss: float, grad_norm: float | None) -> None:
        """At a log step (the loss already read): a non-finite grad norm (None: DeepSpeed has none), or a
        loss over `spike_factor` times the mean of the last `spike_window` logged losses."""
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise self.diverged(step, f"the gradient norm is {grad_norm}")
        if self.factor > 0 and self.recent:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.factor * mean:
                raise self.diverged(step, f"loss {loss:.4g} is over train.spike_factor={self.factor:g} x the "
                                    f"mean {mean:.4g} of the last {len(self.recent)} logged losses")
        self.recent.append(loss)
        if self.unchecked is not None:  # a sane loss after it: its weights are good
            self.last_good, self.unchecked = self.unchecked, None

    def check_weights(self, module: torch.nn.Module, step: int) -> None:
        """Before a save (collective): refuse to publish if any rank holds a non-finite parameter."""
        bad = nonfinite_parameters(module)
        if any_rank(bool(bad), self.device):
            names: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(names, bad)
            everywhere = sorted({n for rank in names for n in rank})
            shown = ", ".join(everywhere[:5]) + (", ..." if len(everywhere) > 5 else "")
            total = len(list(module.parameters()))
            raise self.diverged(step, f"{len(everywhere)} parameter tensors (of {total} on a rank) hold NaN or "
                                f"inf ({shown})")

    def saved(self, path: Path) -> None:
        """A checkpoint published: good once a later logged loss passes (a finite but broken update shows
        only in the next loss), or at once when no step follows."""
        self.unchecked = path

    def diverged(self, step: int, cause: str) -> Diverged:
        return Diverged(step, cause, self.last_good, self.unchecked)

    def poison(self, module: torch.nn.Module, step: int) -> None:
        """The test-only hook (TEST_POISON_STEP): once, after that step's update, one tensor becomes NaN."""
        if step == self.poison_step:
            self.poison_step = None
            with torch.no_grad():
                p = next(module.parameters())
                getattr(p, "ds_tensor", p).fill_(float("nan"))

    def may_roll_back(self, err: Diverged) -> bool:
        """Whether to roll back from `err` (else it is raised): rollback asked, a checkpoint, rollbacks left."""
        if self.on_divergence != "rollback" or self.last_good is None:
            return False
        if not self.last_good.is_dir():
            log.error("cannot roll back: %s no longer exists (train.keep_last)", self.last_good)
            return False
        if self.rollbacks >= self.max_rollbacks:
            log.error("train.max_rollbacks=%d rollbacks spent: stopping", self.max_rollbacks)
            return False
        self.rollbacks += 1
        self.recent.clear()
        self.unchecked = None  # newer than the checkpoint rolled back to: it is overwritten as training redoes it
        return True


def roll_back(reload: Callable[[Path], dict[str, Any]], checkpointer: Any, loader: Any, guard: Guard, err: Diverged,
              grad_accum: int, note: Callable[[str], None]) -> tuple[int, int]:
    """Collective: `reload` the last good checkpoint, drop newer ones (they may hold the diverged model; the steps
    are redone), skip the batches of the steps after it up to the diverged one. Returns (step, tokens)."""
    good = guard.last_good
    state = reload(good)  # as a resume: the LR schedule follows this run's keys (optim.resume_schedule)
    skipped = max(err.step - state["step"], 1)
    for _ in range(skipped * grad_accum):
        loader.next_batch()
    newer = [p for p in checkpointer.complete() if good.parent == checkpointer.root and p.name > good.name]
    if checkpointer.rank == 0:
        for path in newer:
            shutil.rmtree(path)
    note(f"rollback {guard.rollbacks} of train.max_rollbacks={guard.max_rollbacks}: {err.cause} at step {err.step}; "
         f"reloaded {good} (step {state['step']}), skipped the batches of {skipped} steps"
         + (f", removed the newer {', '.join(p.name for p in newer)}" if newer else ""))
    return state["step"], state["tokens"]
