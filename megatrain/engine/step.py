"""One optimizer step and one evaluation pass, for the plain and the pipeline engine alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from megatrain.model import moe
from megatrain.observe.meters import StepTimer

Batch = dict[str, torch.Tensor]


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _pipe_micro_batches(next_batch: Callable[[], Batch], n: int, device: torch.device) -> Iterator[tuple]:
    """What DeepSpeed's pipeline engine pulls: (inputs, labels); inputs carry doc_ids when masking."""
    for _ in range(n):
        b = _to(next_batch(), device)
        inputs = (b["input_ids"], b["doc_ids"]) if "doc_ids" in b else b["input_ids"]
        yield inputs, b["labels"]


def _dp_mean(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """On the device: an all-reduce is queued, nothing waits for it (NCCL) until the value is read."""
    value = value.detach().float().clone()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


def train_step(engine, next_batch: Callable[[], Batch], grad_accum: int, device: torch.device,
               dp_group: dist.ProcessGroup | None, timer: StepTimer | None = None) -> tuple[torch.Tensor, float]:
    """Forward/backward over `grad_accum` micro-batches and one optimizer step, with no host sync of ours.

    Returns (loss of the global batch averaged over micro-batches and DP ranks, as a 0-d tensor on the
    device, read at log steps; lr applied).
    """
    timer = timer or StepTimer(device)
    lr = engine.get_lr()[0]  # the scheduler advances inside the step
    if hasattr(engine, "train_batch"):  # pipeline: DeepSpeed runs the 1F1B schedule
        timer.start()
        loss = engine.train_batch(data_iter=_pipe_micro_batches(next_batch, grad_accum, device))
        timer.stop("pipeline_step_s")
        return loss.detach(), lr
    total = torch.zeros((), device=device)
    timer.start()
    for _ in range(grad_accum):
        batch = _to(next_batch(), device)
        timer.stop("data_s")
        loss = engine(**batch)
        engine.backward(loss)
        timer.stop("fwd_bwd_s")
        engine.step()  # DeepSpeed counts micro-batches: the optimizer steps at the boundary only
        timer.stop("optim_s")
        total += loss.detach()
    moe.after_step(engine.module)  # expert load of the global batch, selection-bias update (MoE only)
    return _dp_mean(total / grad_accum, dp_group), lr


@torch.no_grad()
def eval_loss(engine, next_batch: Callable[[], Batch], steps: int, device: torch.device,
              dp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Mean loss over `steps` micro-batches per DP rank, averaged over DP ranks."""
    engine.eval()
    if hasattr(engine, "eval_batch"):
        loss = engine.eval_batch(_pipe_micro_batches(next_batch, steps, device), num_micro_batches=steps)
    else:
        loss = sum(engine(**_to(next_batch(), device)) for _ in range(steps)) / steps
    engine.train()
    return _dp_mean(loss, dp_group)
