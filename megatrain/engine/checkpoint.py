"""Checkpoints that survive preemption and crashes.

A save goes to `checkpoints/.partial-<tag>/`; when every rank has written, rank 0 records each
file's size in `meta.json`, renames the directory to `<tag>` and rewrites the `latest` pointer
atomically. A process killed mid-save leaves only a `.partial-*` directory behind, never a
broken `latest`. Each rank also saves its own trainer state (step, tokens, data loader
position, every RNG), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("megatrain")

META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, rank: int):
        self.root = run_dir / "checkpoints"
        self.keep_last, self.rank = keep_last, rank

    def save(self, engine: Any, step: int, trainer_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the published checkpoint directory."""
        tag = tag_for(step)
        partial, final = self.root / f".partial-{tag}", self.root / tag
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=partial.name, save_latest=False)
        (partial / "trainer").mkdir(parents=True, exist_ok=True)
        torch.save({**trainer_state, "rng": rng_state()}, partial / "trainer" / f"rank_{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
            _write_atomic(partial / META, json.dumps({**meta, "step": step, "files": files}, indent=1))
            if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_atomic(self.root / "latest", tag)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Published checkpoints, oldest first."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir())

    def find_latest(self) -> Path | None:
        """The newest checkpoint that is whole; damaged ones are skipped with a warning naming them."""
        for path in reversed(self.complete()):
            problem = verify(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    def load(self, engine: Any, path: Path) -> dict[str, Any]:
        """Collective: restore the engine and return this rank's trainer state (RNGs restored)."""
        problem = verify(path)
        if problem is not None:
            raise RuntimeError(f"checkpoint {path} cannot be loaded: {problem}")
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        own = path / "trainer" / f"rank_{self.rank:05d}.pt"
        state = torch.load(own if own.exists() else path / "trainer" / "rank_00000.pt", weights_only=False)
        if own.exists():
            set_rng_state(state["rng"])
        return state


def verify(path: Path) -> str | None:
    """None if the checkpoint's files are all present with the sizes recorded at save time."""
    meta_file = path / META
    if not meta_file.exists():
        return f"no {META} (an interrupted save)"
    try:
        files = json.loads(meta_file.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        return f"{META} is unreadable ({err})"
    for name, size in files.items():
        f = path / name
        if not f.exists():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None
