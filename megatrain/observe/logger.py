"""Where a run's numbers go: metrics.jsonl (the source of truth), W&B, and the console.

Only rank 0 writes; other ranks get a logger that does nothing, so their output stays quiet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("megatrain")


def setup_console_logging(rank: int) -> None:
    """INFO on rank 0, errors only elsewhere (every rank would repeat rank 0's warnings); DeepSpeed's chatter
    down to warnings."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="[%(asctime)s megatrain] %(message)s", datefmt="%H:%M:%S", force=True)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 wandb_mode: str, wandb_project: str, wandb_entity: str | None, run_name: str | None,
                 config: dict[str, Any], progress: bool):
        self.enabled = enabled
        self.wandb = None
        self.progress = None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_mode != "disabled":
            self.wandb = _init_wandb(run_dir, wandb_mode, wandb_project, wandb_entity, run_name, config)
        if progress and sys.stdout.isatty():
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                     console=Console(), transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        status = _status(row)
        if self.progress is None:
            log.info("step %d | %s", row["step"], status)
            return
        self.progress.update(self.task, completed=row["step"], status=status)
        if "eval_loss" in row:  # the bar shows the latest row only: keep evals on screen above it
            self.progress.console.print(f"step {row['step']} | {status}")

    def note(self, message: str) -> None:
        """A line for the user (a save, a resume): above the progress bar, or in the log."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            log.info("%s", message)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _status(row: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval {:.4f}"), ("eval_ppl", "ppl {:.2f}"),
                     ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("mfu", "MFU {:.1%}")):
        value = row.get(key)
        if isinstance(value, float) and math.isfinite(value):
            parts.append(fmt.format(value))
    return " | ".join(parts)


def _init_wandb(run_dir: Path, mode: str, project: str, entity: str | None, name: str | None,
                config: dict[str, Any]):
    import wandb

    # One W&B run per run directory: a resumed job continues the same W&B run.
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=project, entity=entity, name=name or run_dir.name, id=run_id, resume="allow",
                      mode=mode, dir=str(run_dir), config=config)
