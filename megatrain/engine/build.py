"""From a validated config to a running DeepSpeed engine: process groups, model, optimizer."""

from __future__ import annotations

import ctypes
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatrain import hardware
from megatrain.config import Config
from megatrain.data.manifest import write_json_atomic
from megatrain.engine.deepspeed_config import deepspeed_config
from megatrain.engine.dist_env import DistEnv, cuda_device_index
from megatrain.engine.schedule import Schedule
from megatrain.model.init import canonical_parameters, init_parameter
from megatrain.model.transformer import MLP, Attention, Block, Transformer
from megatrain.parallel import deepspeed_internals as ds
from megatrain.parallel.mesh import Mesh

log = logging.getLogger("megatrain")
# torch 2.13 deprecates the collectives DeepSpeed's ZeRO calls, and warns on every call.
ZERO_COLLECTIVE_WARNING = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor"
                           r"|_all_gather_base|_reduce_scatter_base)`")


def pick_device(cfg: Config, env: DistEnv) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        index = cuda_device_index(env.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_precision(device: torch.device) -> str:
    """train.precision=auto: bf16 where the hardware runs it natively (CUDA, CPUs with AVX512-BF16 or AMX)."""
    return "bf16" if device.type == "cuda" or hardware.cpu_has_native_bf16() else "fp32"


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, held there


def return_freed_memory_on_cpu() -> bool:
    """glibc: serve allocations of 128 KiB or more with mmap, so a freed tensor goes back to the OS at once.

    glibc raises its mmap threshold (from 128 KiB up to 32 MiB) whenever such a block is freed, so tensors
    freed at every step (ZeRO-3's gathered parameters, activations) then stay in the heap, and the RSS grows
    with the holes between them instead of the bytes the run holds (tiny fp32 ZeRO-3 model, 2 ranks: 306 /
    340 MiB after 2 / 4 steps by default, 260 / 264 MiB held at 1 MiB). Held at 1 MiB, the 128 KiB-1 MiB
    activations of small models still fragmented: peak RSS 15-30 MiB above the tensors alive at the peak
    (tests/distributed/test_plan_matches_run.py), within 1-4 MiB at 128 KiB. The price is speed: every step
    faults its tensors in again (docs/benchmarks.md, "The host allocator"). A preloaded caching allocator
    (tcmalloc) does not see the setting. Returns whether it applied (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def init_distributed(device: torch.device) -> None:
    """Start torch.distributed through DeepSpeed, without its CPU ops that training never uses."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return_freed_memory_on_cpu()
    warnings.filterwarnings("ignore", message=ZERO_COLLECTIVE_WARNING, category=FutureWarning)
    import deepspeed

    ds.skip_shm_comm_op()
    ds.import_muon_uncompiled()
    ds.quiet_bf16_optimizer()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)


def build_model(cfg: Config, mesh: Mesh, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The model (this rank's pipeline stage under PP), partitioned over DP from birth under ZeRO-3."""
    import deepspeed

    checkpointing = cfg.train.activation_checkpointing
    if mesh.pp > 1:
        from megatrain.model.pipeline import TransformerPipe  # imports DeepSpeed: after its set-up

        model = TransformerPipe(cfg.model, mesh, checkpointing=checkpointing, seq_len=cfg.train.seq_len,
                                pp_split=cfg.parallel.pp_split)
        for name, p in canonical_parameters(model):
            init_parameter(p, name, cfg.train.seed, mesh)
        return model
    zero3 = mesh.layout.zero_stage == 3
    # zero.Init ignores `mpu` and would partition over the whole world, mixing TP shards: the group
    # must be named explicitly, DP x CP (dense weights are replicated across CP, as across DP).
    with deepspeed.zero.Init(data_parallel_group=mesh.dp_cp_group, mpu=mesh, config_dict_or_path=ds_config,
                             enabled=zero3):
        model = Transformer(cfg.model, mesh, mesh.layout.sequence_parallel, checkpointing)
    for name, p in canonical_parameters(model):
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
            init_parameter(p, name, cfg.train.seed, mesh)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float, ep: int = 1) -> list[dict[str, Any]]:
    """Decay matrices (linears, embeddings); not norms or biases. Routed experts (decayed) form a third group
    in every layout (so the LR schedule's state fits any EP); under expert parallelism it is DeepSpeed's MoE
    group, partitioned over the expert-DP group."""
    decay, keep, experts = [], [], []
    for p in model.parameters():
        if getattr(p, "ep_dim", None) is not None:
            experts.append(p)
        else:
            (decay if len(ds.unpartitioned_shape(p)) >= 2 else keep).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    if experts:
        groups.append({"params": experts, "weight_decay": weight_decay,
                       **({"moe": True, "name": ds.expert_group_name(ep)} if ep > 1 else {})})
    return groups


def build_engine(cfg: Config, mesh: Mesh, device: torch.device, config_out: Path | None = None):
    """The DeepSpeed engine around this rank's model (or pipeline stage) and optimizer.

    `config_out`: where to write the exact DeepSpeed config (rank 0 passes run.dir/deepspeed.json).
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, mesh.layout)
    if config_out is not None:  # before initialize, which may add keys of its own to the dict
        write_json_atomic(config_out, ds_config)
    model = build_model(cfg, mesh, ds_config)
    if cfg.train.compile:
        if mesh.layout.zero_stage == 3:
            # Attention and MLP read their linears' weights for one fused GEMM without calling those linears:
            # eager ZeRO-3 gathers such a parameter when it is read, which a compiled graph never sees (it
            # traces the empty partition). As leaf modules, all their parameters are gathered at their forward.
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [Attention, MLP])
        # Blocks hold nearly all the FLOPs; the embedding and the head with its vocab-parallel loss stay eager.
        for block in (module for module in model.modules() if isinstance(module, Block)):
            block.compile()
    optim = cfg.optim
    groups = param_groups(model, optim.weight_decay, mesh.ep)
    expert_parallel = groups[-1].get("moe", False)
    ds.register_expert_groups(mesh)
    if expert_parallel:
        ds.mark_expert_parameters(groups[-1]["params"], mesh.ep)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr,
                                  betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)
    scheduler = Schedule(optimizer, optim, cfg.train.steps)
    # A pipeline module brings its own process grid; otherwise DeepSpeed learns DP and TP from the mesh.
    mpu = None if mesh.pp > 1 else mesh
    with ds.expert_parallel_engine(expert_parallel):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, mpu=mpu, dist_init_required=False)
    ds.record_unsharded_grad_norm(engine)
    return engine
