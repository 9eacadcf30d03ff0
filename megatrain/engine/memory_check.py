"""Pre-flight memory check: the planner's peak per rank against the memory this rank can have.

Run before any process group or weight exists, so a model that cannot fit costs seconds, not a queue
wait and an out-of-memory crash minutes into the start. On CUDA a rank has its GPU's free memory; on
CPU the ranks of a node share the host's MemAvailable. The planner (megatrain/plan.py) is the one model
of memory; on CPU it is given the overhead a CPU rank measures instead of a GPU's CUDA context.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import replace

import torch

from megatrain.config import Config, ConfigError
from megatrain.plan import CPU_OVERHEAD_GB, GB, Plan, plan, search

log = logging.getLogger("megatrain")
SUGGESTIONS = 3  # layouts named when refusing


def ranks_on_this_node(environ: Mapping[str, str] | None = None) -> int:
    """Processes of this job on this host: torchrun's LOCAL_WORLD_SIZE, else SLURM's tasks per node."""
    env = os.environ if environ is None else environ
    if env.get("LOCAL_WORLD_SIZE"):
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_TASKS_PER_NODE"):
        # "4(x2),3": per node counts; the largest is the worst case for this node
        return max(int(n) for n in re.findall(r"(\d+)(?:\(x\d+\))?", env["SLURM_TASKS_PER_NODE"]))
    return 1


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """The kernel's estimate of memory available to new processes (MemAvailable), None where unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_per_rank(device: torch.device, environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """(bytes this rank can use, where the figure comes from), None where it cannot be known."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free memory of GPU {device.index} ({free / GB:.2f} of {total / GB:.2f} GB)"
    host = host_available_bytes()
    if host is None:
        return None
    ranks = ranks_on_this_node(environ)
    return host // ranks, f"MemAvailable {host / GB:.2f} GB / {ranks} rank(s) on this node"


def planned_peak(cfg: Config, world_size: int, device: torch.device) -> Plan:
    """The planner's plan for this run on this device (CPU: a CPU rank's overhead instead of a GPU's)."""
    return plan(_for_device(cfg, device), world_size)


def _for_device(cfg: Config, device: torch.device, memory_gb: float | None = None) -> Config:
    # Memory does not depend on the peak FLOP/s; a fixed one keeps an unknown plan.gpu from failing here.
    hw = replace(cfg.plan, peak_tflops=cfg.plan.peak_tflops or 1.0,
                 overhead_gb=CPU_OVERHEAD_GB if device.type == "cpu" else cfg.plan.overhead_gb,
                 gpu_memory_gb=memory_gb if memory_gb is not None else cfg.plan.gpu_memory_gb)
    return replace(cfg, plan=hw)


def _overrides(p: Plan) -> str:
    layout = p.layout
    keys = [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", f"parallel.zero_stage={layout.zero_stage}",
            f"train.activation_checkpointing={p.checkpointing}", f"train.micro_batch_size={layout.micro_batch_size}"]
    if layout.sequence_parallel:
        keys.append("parallel.sequence_parallel=true")
    return f"{' '.join(keys)} ({p.memory.total / GB:.2f} GB)"


def shortfall(cfg: Config, world_size: int, device: torch.device, available: int, source: str) -> str | None:
    """None if the plan's peak per rank fits in `available` bytes, else the message naming the shortfall."""
    need = planned_peak(cfg, world_size, device)
    if need.memory.total <= available:
        return None
    mem = need.memory
    fitting = search(_for_device(cfg, device, available / GB), world_size)
    layouts = ("; layouts of these ranks that fit per the planner: "
               + " | ".join(_overrides(p) for p in fitting[:SUGGESTIONS])) if fitting else (
        f"; no layout of {world_size} rank(s) fits per the planner: use more ranks")
    return (f"train.memory_check: the planner puts the peak per rank at {mem.total / GB:.2f} GB (weights "
            f"{mem.weights / GB:.2f}, gradients {mem.gradients / GB:.2f}, optimizer {mem.optimizer / GB:.2f}, "
            f"activations {mem.activations / GB:.2f}, buffers {mem.comm_buffers / GB:.2f}, overhead "
            f"{mem.overhead / GB:.2f}" + (f"; {mem.after_backward / GB:.2f} of the gradients and buffers only after "
                                         "backward, never beside the activations" if mem.after_backward else "")
            + f"); {available / GB:.2f} GB is available per rank ({source}): short by "
            f"{(mem.total - available) / GB:.2f} GB{layouts}; train.memory_check=warn starts anyway")


def check_memory(cfg: Config, world_size: int, device: torch.device,
                 environ: Mapping[str, str] | None = None) -> None:
    """train.memory_check: refuse (ConfigError) or warn when the plan's peak per rank exceeds what is free."""
    if cfg.train.memory_check == "off":
        return
    have = available_per_rank(device, environ)
    if have is None:
        log.info("train.memory_check: this host does not report available memory; not checked")
        return
    message = shortfall(cfg, world_size, device, *have)
    if message is None:
        return
    if cfg.train.memory_check == "refuse":
        raise ConfigError(message)
    log.warning("%s", message)
