"""From a validated config to a running DeepSpeed engine: process groups, model, optimizer."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from megatrain.config import Config, Layout
from megatrain.engine.deepspeed_config import deepspeed_config
from megatrain.engine.dist_env import DistEnv
from megatrain.engine.schedule import build_scheduler
from megatrain.model.init import canonical_parameters, init_parameter
from megatrain.model.transformer import Block, Transformer
from megatrain.parallel.mesh import Mesh

log = logging.getLogger("megatrain")


def pick_device(cfg: Config, env: DistEnv) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> None:
    """Start torch.distributed through DeepSpeed, without its CPU ops that training never uses."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)  # one per ZeRO collective otherwise
    import deepspeed
    import deepspeed.ops

    # Compiling the shared-memory op costs ~40 s at start and gloo training never uses it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)


def build_model(cfg: Config, mesh: Mesh, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The model (this rank's pipeline stage under PP), partitioned over DP from birth under ZeRO-3."""
    import deepspeed

    if cfg.parallel.pp > 1:
        from megatrain.parallel.pipeline import TransformerPipe

        model = TransformerPipe(cfg, mesh)
        for name, p in canonical_parameters(model):
            init_parameter(p, name, cfg.train.seed, mesh)
        return model
    zero3 = cfg.parallel.zero_stage == 3
    # zero.Init ignores `mpu` and would partition over the whole world, mixing TP shards:
    # the DP group must be named explicitly.
    with deepspeed.zero.Init(data_parallel_group=mesh.dp_group, mpu=mesh, config_dict_or_path=ds_config,
                             enabled=zero3):
        model = Transformer(cfg.model, mesh, cfg.parallel.sequence_parallel, cfg.train.activation_checkpointing)
    for name, p in canonical_parameters(model):
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
            init_parameter(p, name, cfg.train.seed, mesh)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linears, embeddings); not norms or biases."""
    decay, keep = [], []
    for p in model.parameters():
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_engine(cfg: Config, layout: Layout, mesh: Mesh, device: torch.device):
    """The DeepSpeed engine around this rank's model (or pipeline stage) and optimizer."""
    import deepspeed

    ds_config = deepspeed_config(cfg, layout)
    model = build_model(cfg, mesh, ds_config)
    if cfg.train.compile:
        # Blocks only: the embedding / head / loss hold the TP collectives that graphs break on.
        for block in (m for m in model.modules() if isinstance(m, Block)):
            block.compile()
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=True)
    scheduler = build_scheduler(optimizer, o, cfg.train.steps)
    # A pipeline module brings its own process grid; otherwise DeepSpeed learns DP and TP from the mesh.
    mpu = None if cfg.parallel.pp > 1 else mesh
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu, dist_init_required=False)
    _keep_fp32_grad_norm(engine)
    return engine


def _keep_fp32_grad_norm(engine) -> None:
    """Without ZeRO and bf16, DeepSpeed computes the norm to clip by, then drops it: keep it for the metrics."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                                   mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record
