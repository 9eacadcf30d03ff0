"""Checkpoints that survive preemption and crashes.

A save goes to `checkpoints/.partial-<tag>/`; when every rank has written, the ranks hash the files
(each its share), rank 0 records each file's size and xxh3-128 digest in `meta.json`, renames the
directory to `<tag>` and rewrites the `latest` pointer atomically. A process killed mid-save leaves
only a `.partial-*` directory behind, never a broken `latest`. Each rank also saves its own trainer
state (step, tokens, every RNG) as JSON, and rank 0 the data loader position once
(`trainer/data.json`): the position is global (counted in samples over all DP ranks) and a
pipeline's middle stages never read data, so their loaders' own positions are stale. Every rank
restores the one saved position, on any layout; a resumed run continues bit for bit. Nothing loaded
runs code: the trainer state is JSON, the portable copy safetensors + JSON, and DeepSpeed's own
files are read with torch.load(weights_only=True) and an allow-list of DeepSpeed's types
(parallel/deepspeed_internals.py).

Every checkpoint also holds a portable copy (`portable/`, see export/portable_format.py): a run whose layout
(TP, PP, DP, ZeRO stage or precision) differs from the checkpoint's resumes from it instead of
DeepSpeed's files, and export reads it. The test-only variable MEGATRAIN_TEST_SAVE_PAUSE (seconds)
holds a save open before it is published, so tests can kill or signal a process mid-save.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from megatrain.config import Config, ConfigError, ModelConfig, grad_reduce_dtype
from megatrain.engine import portable
from megatrain.export.portable_format import DIR as PORTABLE_DIR
from megatrain.model.init import canonical_parameters, shard
from megatrain.parallel import deepspeed_internals
from megatrain.parallel.mesh import Mesh

if TYPE_CHECKING:
    from megatrain.export.hf import HFWeights

log = logging.getLogger("megatrain")

META = "meta.json"
DIGEST = "xxh3_128"  # content digest of every file, recorded in meta.json at save, checked before a load
DATA_STATE = "trainer/data.json"  # the global data position, written once


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as plain JSON data (trainer state is never pickled: loading a pickle can run code)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": _bytes_of(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _bytes_of(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor_of(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor_of(state["cuda"]))


def _bytes_of(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _tensor_of(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage", "cp", "ep")  # with the precision: what DeepSpeed's files depend on


@dataclass
class RunContext:
    """The run a checkpoint is saved from or loaded into: what the portable copy and a layout change need."""

    cfg: Config
    mesh: Mesh
    tokenizer_path: str | None = None
    eod_id: int | None = None

    def layout_key(self) -> dict[str, Any]:
        layout = self.mesh.layout
        return {**{k: getattr(layout, k) for k in LAYOUT_KEYS}, "precision": self.cfg.train.precision,
                "grad_reduce_dtype": grad_reduce_dtype(self.cfg)}


def _saved_layout(meta: dict[str, Any]) -> dict[str, Any]:
    """The layout key of a checkpoint's meta.json (older ones record zero_stage beside the layout)."""
    layout = meta.get("layout", {})
    saved = {k: layout.get(k) for k in LAYOUT_KEYS}
    if saved["zero_stage"] is None:
        saved["zero_stage"] = meta.get("zero_stage")
    # Before train.grad_reduce_dtype, DeepSpeed reduced in the training precision.
    precision = meta.get("precision")
    return {**saved, "precision": precision, "grad_reduce_dtype": meta.get("grad_reduce_dtype", precision)}


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, rank: int, context: RunContext | None = None,
                 digests: bool = True):
        """`digests=False` (before the process group, where every rank would read every file): sizes only."""
        self.root = run_dir / "checkpoints"
        self.keep_last, self.rank, self.context, self.digests = keep_last, rank, context, digests
        self._verified: set[Path] = set()  # checked by find_latest: load does not read them again

    def _verify(self, path: Path) -> str | None:
        """verify(path) with the files shared out over the ranks when a process group is up (each file is
        read by one rank, once); every rank gets the same verdict: the first problem in file order."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1:
            problem = verify(path, digests=self.digests)
        else:
            verdicts: list[Any] = [None] * world
            dist.all_gather_object(verdicts, verify(path, self.rank, world, self.digests))
            problem = next((v for v in verdicts if v is not None), None)
        if problem is None and self.digests:
            self._verified.add(path)
        return problem

    def save(self, engine: Any, step: int, trainer_state: dict[str, Any], with_portable: bool = True) -> Path:
        """Collective: every rank calls it. Returns the published checkpoint directory.

        `with_portable`: also write the layout-independent copy (what a layout change and export read).
        """
        tag = tag_for(step)
        partial, final = self.root / f".partial-{tag}", self.root / tag
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=partial.name, save_latest=False)
        meta: dict[str, Any] = {}
        if self.context is not None:
            run = self.context
            if with_portable:
                portable.save(engine, run.mesh, partial / PORTABLE_DIR, step=step, model=run.cfg.model,
                              tokenizer_path=run.tokenizer_path, eod_id=run.eod_id)
            meta = {"layout": run.mesh.layout.record(), "precision": run.cfg.train.precision,
                    "grad_reduce_dtype": grad_reduce_dtype(run.cfg)}
        (partial / "trainer").mkdir(parents=True, exist_ok=True)
        per_rank = {k: v for k, v in trainer_state.items() if k != "data"}
        _write_atomic(partial / "trainer" / f"rank_{self.rank:05d}.json", json.dumps({**per_rank, "rng": rng_state()}))
        if self.rank == 0:  # rank 0 is the first pipeline stage: its loader is the one that reads
            _write_atomic(partial / DATA_STATE, json.dumps(trainer_state["data"], indent=1))
        time.sleep(float(os.environ.get("MEGATRAIN_TEST_SAVE_PAUSE", "0")))
        dist.barrier()
        # rank 0 lists the files (one listing, not one per rank), each rank hashes its share of them
        listing = [sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
                   if self.rank == 0 else None]
        dist.broadcast_object_list(listing, src=0)
        names = listing[0]
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, {n: file_record(partial / n) for n in names[self.rank::len(shares)]})
        if self.rank == 0:
            files = {n: share[n] for share in shares for n in share}
            _write_atomic(partial / META, json.dumps({**meta, "step": step, "digest": DIGEST, "files": dict(
                sorted(files.items()))}, indent=1))
            if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_atomic(self.root / "latest", tag)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for stale in self.root.glob(".partial-*"):  # left by saves that were killed
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep_last <= 0:
            return
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Published checkpoints, oldest first."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir())

    def find_latest(self, with_portable: bool = False) -> Path | None:
        """The newest checkpoint that is whole (and, `with_portable`, holds a portable copy); damaged ones are
        skipped with a warning naming them."""
        for stale in sorted(self.root.glob(".partial-*")) if self.root.exists() else []:
            log.warning("ignoring %s: a save that never finished (the process was killed while writing it)", stale)
        for path in reversed(self.complete()):
            problem = self._verify(path)
            if problem is None and with_portable and not (path / PORTABLE_DIR).is_dir():
                problem = "no portable copy (saved with train.portable_every > 1)"
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    def load(self, engine: Any, path: Path) -> dict[str, Any]:
        """Collective: restore the engine and return this rank's trainer state (RNGs restored).

        The same layout loads DeepSpeed's files (bit for bit); another layout loads the portable copy.
        """
        problem = None if path in self._verified else self._verify(path)
        if problem is not None:
            raise ConfigError(f"checkpoint {path} cannot be loaded: {problem}")
        meta = json.loads((path / META).read_text())
        saved = _saved_layout(meta)
        now = self.context.layout_key() if self.context is not None else {}
        # keys a checkpoint lacks (written before they were recorded) count as unchanged
        if all(saved[k] is None or saved[k] == now[k] for k in now):
            deepspeed_internals.load_checkpoints_weights_only(engine)
            try:
                load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
            except deepspeed_internals.UnsafeCheckpointFile as err:
                raise ConfigError(f"checkpoint {path}: {err}") from err
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
            restore_local_experts(engine)
        else:
            if not (path / PORTABLE_DIR).is_dir():
                older = [p for p in self.complete() if (p / PORTABLE_DIR).is_dir()]
                hint = f", or resume from {older[-1]} (the newest with one: train.resume=<path>)" if older else ""
                raise ConfigError(f"checkpoint {path} was written with {_fmt(saved)} and has no portable copy "
                                  f"(train.portable_every > 1): resume it with that layout{hint}")
            log.warning("checkpoint %s was written with %s; this run is %s: loading its portable copy",
                        path, _fmt(saved), _fmt(now))
            portable.load(engine, self.context.mesh, path / PORTABLE_DIR)
        state = _trainer_state(path, self.rank)
        if "rng" in state:  # this rank's own state (a run with more ranks than the checkpoint starts them fresh)
            set_rng_state(state.pop("rng"))
        state["data"] = json.loads((path / DATA_STATE).read_text())
        if self.context is not None:
            layout = self.context.mesh.layout
            before = meta.get("layout", {}).get("global_batch_size", layout.global_batch_size)
            if before != layout.global_batch_size:
                log.warning("train.global_batch_size was %d, now %d: each step now reads %d samples; the LR "
                            "schedule continues by step", before, layout.global_batch_size, layout.global_batch_size)
            state["data"] = adapt_loader_state(state["data"], layout.micro_batch_size, layout.dp)
        return state

    def init_from(self, engine: Any, weights: HFWeights) -> None:
        """Collective: set the model's weights from a Hugging Face directory (`train.init_from`).

        Each rank reads only its pipeline stage's tensors and their TP slices, not the whole model."""
        run, source = self.context, weights.directory
        portable.check_shapes(engine.module, run.mesh, weights.shapes(), source)
        for name, p in canonical_parameters(engine.module):
            master = None if deepspeed_internals.has_fp32_master(p) else deepspeed_internals.unlinked_master(engine, p)
            portable.set_parameter(p, weights.local(name, *shard(p, run.mesh)), master)
        log.info("initialised the model from %s: this rank read %.1f MB of the %.1f MB there (its stage and TP slices)",
                 source, weights.bytes_read / 1e6, weights.file_bytes() / 1e6)


def hf_weights(source: str, m: ModelConfig) -> HFWeights:
    """The Hugging Face directory `train.init_from` names, checked against the run's model from its config
    and file headers alone: a wrong model or pickled weights are refused before any process group."""
    from megatrain.export.hf import HFWeights

    try:
        return HFWeights(Path(source), m)
    except (OSError, ValueError) as err:
        raise ConfigError(f"train.init_from={source}: {err}") from err


def restore_local_experts(engine: Any) -> None:
    """Collective. DeepSpeed writes the module weights of DP rank 0 only, so after engine.load_checkpoint
    every EP rank holds EP rank 0's routed experts; ZeRO restored each rank's own fp32 partitions of its
    experts: set the weights from those (gathered over each expert-DP group). Nothing without EP."""
    from deepspeed.utils import safe_get_full_fp32_param

    for _, p in canonical_parameters(engine.module):
        if deepspeed_internals.is_expert_parallel(p):
            with torch.no_grad():
                p.copy_(safe_get_full_fp32_param(p).reshape(p.shape))


def _trainer_state(path: Path, rank: int) -> dict[str, Any]:
    """This rank's trainer state (rank 0's, without its RNGs, for a rank the checkpoint did not have)."""
    trainer = path / "trainer"
    if not (trainer / "rank_00000.json").exists() and (trainer / "rank_00000.pt").exists():
        raise ConfigError(f"checkpoint {path} holds its trainer state as a pickle ({trainer / 'rank_00000.pt'}, "
                          "written before megatrain saved it as JSON), which megatrain does not load because "
                          "unpickling can run code; resume it with the megatrain that wrote it, or start anew "
                          "from its weights (train.init_from=<an export of it>)")
    own = trainer / f"rank_{rank:05d}.json"
    state = json.loads((own if own.exists() else trainer / "rank_00000.json").read_text())
    if not own.exists():
        state.pop("rng")
    return state


def _fmt(layout: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items())


def adapt_loader_state(state: dict[str, Any], micro_batch_size: int, dp_size: int) -> dict[str, Any]:
    """The data loader state for another micro-batch x DP shape, saying what is not exact.

    The stream is counted in global samples, which every layout reads in the same order, so the
    position carries over. An epoch, though, holds a multiple of micro_batch x DP windows: past the
    first epoch the position inside the epoch can shift, i.e. some windows are read again or skipped.
    """
    old_mbs, old_dp = state["micro_batch_size"], state["dp_size"]
    if (old_mbs, old_dp) == (micro_batch_size, dp_size):
        return state
    old_call, new_call = old_mbs * old_dp, micro_batch_size * dp_size
    log.warning("data loader: micro_batch x DP was %d x %d, now %d x %d; the stream continues at global sample %d",
                old_mbs, old_dp, micro_batch_size, dp_size, state["samples"])
    d = 0
    while f"consumed_{d}" in state:
        count, windows = state[f"consumed_{d}"], state[f"windows_{d}"]
        old_epoch, new_epoch = windows - windows % old_call, windows - windows % new_call
        before, after = divmod(count, old_epoch), divmod(count, new_epoch)
        if before != after:
            log.warning("data loader, dataset %d: epochs now hold %d windows instead of %d, so the next sample is "
                        "window %d of epoch %d instead of window %d of epoch %d: %d windows of the epoch in "
                        "progress are read twice or skipped", d, new_epoch, old_epoch, after[1], after[0],
                        before[1], before[0], abs(after[1] - before[1]))
        d += 1
    return {**state, "micro_batch_size": micro_batch_size, "dp_size": dp_size}


def file_record(path: Path) -> dict[str, Any]:
    """What meta.json records of a checkpoint file: its size and content digest."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "digest": h.hexdigest()}


def verify(path: Path, rank: int = 0, world: int = 1, digests: bool = True) -> str | None:
    """None if the checkpoint's files (those of `rank`'s share of `world`: every `world`-th in name order) are
    present with the sizes (and, `digests`, the digests) recorded at save time; else the first problem, naming
    the file."""
    meta_file = path / META
    if not meta_file.exists():
        return f"no {META} (an interrupted save)"
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"{META} is unreadable ({err})"
    if not isinstance(files, dict):
        return f"{META} is not a checkpoint record (an object with 'files')"
    if digests and not meta.get("digest"):
        log.warning("checkpoint %s records no content digests (saved by an older megatrain): sizes checked only", path)
    for name in sorted(files)[rank::world]:
        record = files[name] if isinstance(files[name], dict) else {"bytes": files[name]}
        f = path / name
        if not f.exists():
            return f"missing file {f}"
        size = f.stat().st_size
        if size != record["bytes"]:
            return f"{f} has {size} bytes, {record['bytes']} were written"
        if digests and "digest" in record:
            digest = file_record(f)["digest"]
            if digest != record["digest"]:
                return (f"{f} is damaged: its {meta['digest']} digest is {digest[:16]}, {record['digest'][:16]} "
                        "was written")
    return None
