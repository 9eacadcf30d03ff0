"""Run a function on N real processes joined by a gloo process group (no mocks)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from one server that has imported torch, dynamo and DeepSpeed (rank_imports.py), not spawn afresh.
mp.set_forkserver_preload(["tests.distributed.rank_imports"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    torch.save({"result": result}, os.path.join(out_dir, f"{rank}.pt"))
    if dist.is_initialized():  # with every rank done, so that no peer has left while a collective is open
        dist.barrier()
        dist.destroy_process_group()
    # A finished rank can still abort in the interpreter's teardown ("terminate called without an active
    # exception", SIGABRT), as launcher.common.exit_without_teardown explains: a spawned rank skips it (forked
    # ones already do).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(world: int, fn: Callable, *args: Any, start_method: str = "forkserver") -> list[Any]:
    """fn(rank, *args) on `world` processes forked from the preloaded server; returns every rank's result, rank order.
    start_method="spawn": a fresh interpreter per rank, as torchrun starts them (what memory measurements need)."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world, _free_port(), fn, args, out_dir), nprocs=world,
                               start_method=start_method, join=True)
        except mp.ProcessRaisedException:
            pass  # the rank's own traceback is reported below
        results = []
        for rank in range(world):
            path = os.path.join(out_dir, f"{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} died without a result")
            saved = torch.load(path, weights_only=False)
            if "error" in saved:
                raise RuntimeError(f"rank {rank} failed:\n{saved['error']}")
            results.append(saved["result"])
        return results
