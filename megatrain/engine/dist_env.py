"""Where this process sits in the job: rank, world size and rendezvous address.

Three launchers are supported, in this order of precedence:

* torchrun (or any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT);
* one process per `srun` task, read from SLURM's variables (SLURM_PROCID, SLURM_NTASKS,
  SLURM_LOCALID; the master is the first host of the step's or job's node list and the port
  is derived from the job id, so every task computes the same address without talking);
* a single process (rank 0 of 1 on 127.0.0.1 with a free port).

`export_dist_env` writes the result back as the torch-style variables, which torch.distributed's
`env://` and DeepSpeed read (without them DeepSpeed goes looking for MPI).
Pure Python: this runs before torch is imported.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"
    restart_count: int = 0  # SLURM_RESTART_COUNT: how many times SLURM requeued this job


def _int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None:
        raise ValueError(f"environment variable {name} is not set")
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


def _port(environ: Mapping[str, str], name: str) -> int:
    port = _int(environ, name, minimum=1)
    if port > 65535:
        raise ValueError(f"environment variable {name}={port} is not a TCP port (1-65535)")
    return port


def _check_rank(rank: int, world_size: int, rank_var: str, world_var: str) -> None:
    if rank >= world_size:
        raise ValueError(f"{rank_var}={rank} is not below {world_var}={world_size}")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"], keeping zero padding as SLURM does."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in node list {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list {nodelist!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list ("n[1-3,5]", "a1,b[02-04]", "r[1-2]-n[1-2]")."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        if not part:
            raise ValueError(f"empty host name in node list {nodelist!r}")
        names = [""]
        for literal, spec in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            suffixes = _expand_range(spec, nodelist) if spec else [""]
            names = [n + literal + s for n in names for s in suffixes]
        hosts.extend(names)
    return hosts


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restart_count(environ: Mapping[str, str]) -> int:
    return _int(environ, "SLURM_RESTART_COUNT") if "SLURM_RESTART_COUNT" in environ else 0


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port every node of a job derives from its id (the sbatch templates agree)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def resolve_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    restarts = _restart_count(env)

    if any(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        missing = [name for name in TORCHRUN_VARS if name not in env]
        if missing:
            raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK are set but {', '.join(missing)} is not; "
                             "set all of " + ", ".join(TORCHRUN_VARS) + " or launch with torchrun")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", minimum=1)
        _check_rank(rank, world, "RANK", "WORLD_SIZE")
        return DistEnv(rank=rank, world_size=world, local_rank=_int(env, "LOCAL_RANK"),
                       master_addr=env["MASTER_ADDR"], master_port=_port(env, "MASTER_PORT"),
                       launcher="torchrun", restart_count=restarts)

    # SLURM_STEP_ID tells an `srun` task from the batch shell, which also has SLURM_PROCID=0
    # and the job's SLURM_NTASKS but is one process: treating it as rank 0 of N would hang.
    in_srun = "SLURM_STEP_ID" in env and all(
        name in env for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    if in_srun:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", minimum=1)
        _check_rank(rank, world, "SLURM_PROCID", "SLURM_NTASKS")
        # The step's node list when srun ran on a subset of the allocation; rank 0 is on its first host.
        list_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if env.get(v)), None)
        if "MASTER_ADDR" in env:
            master = env["MASTER_ADDR"]
        elif list_var is None:
            raise ValueError("SLURM_JOB_NODELIST is not set; cannot find the master host")
        else:
            master = expand_nodelist(env[list_var])[0]
        port = (_port(env, "MASTER_PORT") if "MASTER_PORT" in env
                else slurm_master_port(_int(env, "SLURM_JOB_ID")))
        return DistEnv(rank=rank, world_size=world, local_rank=_int(env, "SLURM_LOCALID"),
                       master_addr=master, master_port=port, launcher="slurm", restart_count=restarts)

    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                   master_port=_free_port(), launcher="single", restart_count=restarts)


def cuda_device_index(local_rank: int, device_count: int, environ: Mapping[str, str] | None = None) -> int:
    """The CUDA device this process drives: LOCAL_RANK modulo the devices it can see.

    torch counts only the devices CUDA_VISIBLE_DEVICES lets through, and numbers them from 0. Under
    torchrun every process sees the node's GPUs (local rank i -> cuda:i); with `srun --gpus-per-task=1`
    each task sees only its own GPU, as cuda:0, while its local rank runs to 7.
    """
    if device_count < 1:
        env = os.environ if environ is None else environ
        visible = env.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError("train.device=cuda but no CUDA device is visible"
                           + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))
    return local_rank % device_count


def export_dist_env(env: DistEnv) -> None:
    os.environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })
