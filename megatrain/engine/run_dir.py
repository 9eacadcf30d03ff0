"""The run directory before training starts: one owner (a lock), the same model, the resume point, a clean log.

Everything here runs before any process group, so a refused run costs seconds and writes nothing: config.yaml
is written (atomically, by rank 0) only once every check has passed. Only rank 0 takes the lock and reads or
writes config.yaml and metrics.jsonl; every rank resolves the same resume point from the same files.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from megatrain.config import Config, ConfigError, ModelConfig
from megatrain.data.manifest import write_text_atomic
from megatrain.engine.checkpoint import META, Checkpointer, verify

log = logging.getLogger("megatrain")

LOCK = "run.lock"


def run_dir_of(cfg: Config) -> Path:
    if not str(cfg.run.dir).strip():
        raise ConfigError("run.dir is empty: give the directory this run writes to, e.g. run.dir=runs/my-run")
    return Path(cfg.run.dir)


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def lock_run_dir(run_dir: Path) -> int:
    """Take the exclusive lock on run_dir (rank 0); returns the open descriptor, held until release_run_dir or exit.
    The lock file names its holder: host, pid, SLURM job id (a requeued job keeps its id), since when.

    flock is released by the kernel when its holder dies (kill -9, a requeued SLURM job), so a lock that can
    be taken is stale by construction; the file only names the holder for the messages.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        before = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        before = {}
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"run.dir={run_dir} is in use by another run ({_describe(before)}; {path}): wait for it "
                          "to finish, stop it, or use another run.dir") from None
    if before.get("pid"):
        log.warning("run.dir=%s: taking over the lock left by %s: that process has ended", run_dir,
                    _describe(before))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    _HELD.add(fd)
    return fd


_HELD: set[int] = set()


@atexit.register
def _release_all() -> None:  # a run that raised still exits cleanly (sys.exit(2), a traceback)
    for fd in list(_HELD):
        release_run_dir(fd)


def release_run_dir(fd: int | None) -> None:
    """Give the lock back (a Hydra multirun trains several runs in one process). A clean exit leaves a lock that
    names nobody; a killed holder leaves its name for the next run's message."""
    if fd in _HELD:
        _HELD.discard(fd)
        os.ftruncate(fd, 0)
        os.close(fd)


KERNEL_KEYS = ("attention_backend",)  # how the model computes, not what: a resume may switch them


def model_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`model.<key>: old -> new` for every key that differs; keys an older config.yaml lacks are defaults."""
    before = {**asdict(ModelConfig()), **saved}
    return [f"model.{k}: {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k) and k not in KERNEL_KEYS]


def check_same_model(run_dir: Path, raw: dict[str, Any]) -> None:
    """Rank 0, when resuming: refuse a run.dir whose config.yaml was written for another model."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    model = OmegaConf.to_container(OmegaConf.load(saved)).get("model") or {}
    changes = model_changes(model, raw["model"])
    if changes:
        raise ConfigError(f"{saved} was written for another model ({'; '.join(changes)}): use the same model.* "
                          "keys to resume it, or a new run.dir")


def write_config(run_dir: Path, raw: dict[str, Any]) -> None:
    """Rank 0, after every check: the resolved config, atomically (a killed run leaves the old one)."""
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(raw)))


@dataclass(frozen=True)
class ResumePoint:
    path: Path | None  # None: start from step 0
    step: int = 0


def resume_point(cfg: Config, run_dir: Path, rank: int, digests: bool = False) -> ResumePoint:
    """Where this run starts, from the files alone (every rank finds the same one). Sizes only: the
    digests are read once the process group is up, each file by one rank (Checkpointer.find_latest/load)."""
    checkpointer = Checkpointer(run_dir, cfg.train.keep_last, rank, digests=digests)
    if cfg.train.resume == "none":
        if checkpointer.complete():
            raise ConfigError(f"run.dir={run_dir} already holds checkpoints and train.resume=none; "
                              "use train.resume=auto to continue it, or a new run.dir")
        return ResumePoint(None)
    if cfg.train.resume == "auto":  # a cooldown branch forks until it has a checkpoint of its own
        path = checkpointer.find_latest() or (Path(cfg.train.fork_from) if cfg.train.fork_from else None)
    else:
        path = Path(cfg.train.resume)
        problem = verify(path, digests=False) if path.is_dir() else "no such directory"
        if problem is not None:
            raise ConfigError(f"train.resume={cfg.train.resume} is not a checkpoint ({problem}); give a "
                              f"checkpoints/step_NNNNNNNN directory, train.resume=auto or train.resume=none")
    if path is None:
        return ResumePoint(None)
    step = json.loads((path / META).read_text()).get("step")
    if not isinstance(step, int):
        raise ConfigError(f"{path / META} records no step (an integer 'step'); resume from another checkpoint "
                          "with train.resume=<path>")
    if step >= cfg.train.steps and cfg.train.resume == "auto" and verify(path) is not None:
        # "finished" is said only of a checkpoint whose digests hold (a rare case: every rank reads it)
        return resume_point(cfg, run_dir, rank, digests=True)
    return ResumePoint(path, step)


def reset_metrics(run_dir: Path, step: int) -> None:
    """Rank 0: metrics.jsonl holds rows up to `step` only (rows after it belong to steps that are redone; a run
    from step 0 starts a clean file). A torn last line (a full disk, a kill mid-write) is dropped with a warning."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    if step == 0:
        path.write_text("")
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ConfigError(f"{path} line {number} is not JSON ({err}): repair or remove that line") from None
            log.warning("%s: dropping its torn last line (%d bytes; a write cut short): %r", path, len(line),
                        line[:80])
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))


class DiskFull(OSError):
    """A save ran out of space; the message names the filesystem and the checkpoint that is kept."""


DISK_FULL_BYTES = 64 << 20  # less free than this after a failed write: the disk is full (torch names no errno)


def check_save_failure(err: BaseException, root: Path, step: int, rank: int) -> DiskFull | None:
    """A DiskFull to raise instead of `err` when the failed save ran out of space (rank 0 removes its part)."""
    chain, errnos = err, set()
    while chain is not None:
        errnos.add(getattr(chain, "errno", None))
        chain = chain.__cause__ or chain.__context__
    usage = shutil.disk_usage(root if root.exists() else root.parent)
    if not errnos & {errno.ENOSPC, errno.EDQUOT} and usage.free >= DISK_FULL_BYTES:
        return None
    kept = Checkpointer(root.parent, 0, rank).complete()
    if rank == 0:
        for partial in root.glob(".partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
    previous = f"the previous checkpoint {kept[-1]} is kept" if kept else "no earlier checkpoint exists"
    return DiskFull(f"no space left on {root} while saving step {step} ({usage.free >> 20} MiB free of "
                    f"{usage.total >> 20} MiB; {type(err).__name__}: {str(err).splitlines()[0][:120]}); {previous}: "
                    "free space, then rerun the same command to resume")
