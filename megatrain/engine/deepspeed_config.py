"""Our config -> the DeepSpeed config dict (one place that knows DeepSpeed's key names)."""

from __future__ import annotations

from typing import Any

from megatrain.config import Config, Layout, grad_reduce_dtype


def deepspeed_config(cfg: Config, layout: Layout) -> dict[str, Any]:
    stage = cfg.parallel.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if cfg.parallel.reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = cfg.parallel.reduce_bucket_size
    if stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=True, reduce_scatter=True)
    if stage == 3:
        # Small tensors (norms, biases) stay whole on every rank: gathering them costs more than it saves.
        zero.update(stage3_param_persistence_threshold=10 * cfg.model.d_model,
                    stage3_gather_16bit_weights_on_model_save=False)
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
