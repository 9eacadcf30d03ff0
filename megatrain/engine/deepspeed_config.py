"""Our config -> the DeepSpeed config dict (one place that knows DeepSpeed's key names)."""

from __future__ import annotations

from typing import Any

from megatrain.config import Config, Layout, grad_reduce_dtype, reduce_bucket_elements
from megatrain.scaling.flops import param_counts


def deepspeed_config(cfg: Config, layout: Layout) -> dict[str, Any]:
    stage = cfg.parallel.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # Gradients are reduced bucket by bucket from backward hooks, on a side stream, while backward goes on
        # (overlap_comm; DeepSpeed turns it on for ZeRO-3 only). Buckets of d^2 elements (reduce_bucket_elements)
        # leave one small bucket exposed at the end of backward; the parameter all-gather after the ZeRO-1/2
        # step uses buckets of the same size and is not overlapped (plan.py's step time counts it).
        bucket = reduce_bucket_elements(cfg)
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=bucket)
        if stage < 3:
            zero.update(allgather_bucket_size=bucket, reduce_scatter=True)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    # Small tensors (norms, biases) stay whole on every rank: gathering them costs more than it saves.
                    stage3_param_persistence_threshold=10 * cfg.model.d_model, **_zero3_gathers(cfg))
    grad_dtype = grad_reduce_dtype(cfg)
    config: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        # No per-gradient overflow scan (~10% of a CPU step): bf16 has fp32's range, and the
        # trainer stops on a non-finite loss.
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": False},
        "zero_optimization": zero,
        # Gradients summed over micro-batches and averaged over DP in this dtype. DeepSpeed's default under
        # bf16 is bf16 for both; with ZeRO-1 fp32 accumulation selects its BF16_Optimizer (fp32 gradients).
        "data_types": {"grad_accum_dtype": grad_dtype},
        "communication_data_type": grad_dtype,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.pp > 1:
        # DeepSpeed sends 1/tp of each activation between stages and all-gathers it, assuming TP ranks
        # hold identical activations; with sequence parallelism each holds its own shard.
        replicated = not cfg.parallel.sequence_parallel
        config["pipeline"] = {"pipe_partitioned": replicated, "grad_partitioned": replicated}
    return config


def _zero3_gathers(cfg: Config) -> dict[str, int]:
    """How far ahead ZeRO-3 gathers parameters and how many it holds (what plan.zero3_gathered_bytes counts)."""
    if cfg.parallel.zero3_gather == "model":
        # One prefetch bucket holds the whole model, so a micro-batch's forward starts with one all-gather; nothing
        # is released while it is used again within two models' worth of parameters (DeepSpeed measures the reuse
        # distance in parameters fetched in between), so the forward's gathers serve the backward too. What
        # DeepSpeed's own defaults (5e7, 1e9, 1e9) do for models under 5e7 parameters.
        whole = param_counts(cfg.model).total
        return dict(stage3_prefetch_bucket_size=whole, stage3_max_live_parameters=whole,
                    stage3_max_reuse_distance=2 * whole)
    block = param_counts(cfg.model).non_embedding // (cfg.model.n_layers * cfg.parallel.tp)  # per TP rank
    # The next parameters are gathered while the current block computes, up to 0.9 d^2 elements ahead (the HF
    # "auto" rule); at most two blocks' parameters are gathered at once, the one computing and the one
    # prefetched.
    return dict(stage3_prefetch_bucket_size=int(0.9 * cfg.model.d_model ** 2),
                stage3_max_live_parameters=2 * block, stage3_max_reuse_distance=2 * block)
