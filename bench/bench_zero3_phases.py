"""Where ZeRO-3's memory per rank grows from step 2: RSS and its high-water mark (MiB) after each phase.

    python bench/bench_zero3_phases.py

A 34M-parameter LLaMA-style model (130 MiB in fp32), fp32, ZeRO-3, 2 gloo ranks, micro batch 2, seq 128, 3 steps;
run with DeepSpeed's defaults and with stage3_prefetch_bucket_size, stage3_max_reuse_distance and
stage3_max_live_parameters at 0 (nothing kept gathered between a parameter's forward and backward use).
"""

from __future__ import annotations

import torch

from megatrain.scaling.flops import param_counts
from tests.distributed.harness import run_ranks
from tests.distributed.workloads import make_config, synthetic_batches

MODEL = dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, max_seq_len=128)
VARIANTS = {"defaults": {},
            "nothing kept live": dict(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0,
                                      stage3_max_live_parameters=0)}


def _rss_mib() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return kb["VmRSS"] // 1024, kb["VmHWM"] // 1024


def phases(rank: int, cfg, steps: int, zero_overrides: dict) -> list[tuple[str, int, int]]:
    import megatrain.engine.build as build
    from megatrain.config import validate
    from megatrain.parallel.mesh import Mesh

    ds_config = build.deepspeed_config

    def with_overrides(*args):
        config = ds_config(*args)
        config["zero_optimization"].update(zero_overrides)
        return config

    build.deepspeed_config = with_overrides
    layout = validate(cfg, 2)
    build.init_distributed(torch.device("cpu"))
    mesh = Mesh.build(layout)
    data = synthetic_batches(steps, layout.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size)
    log = [("start", *_rss_mib())]
    engine = build.build_engine(cfg, mesh, torch.device("cpu"))
    log.append(("built", *_rss_mib()))
    per = layout.micro_batch_size
    for step in range(1, steps + 1):
        batch = data[step - 1, mesh.dp_rank * per:(mesh.dp_rank + 1) * per]
        loss = engine(batch[:, :-1], batch[:, 1:])
        log.append((f"fwd{step}", *_rss_mib()))
        engine.backward(loss)
        log.append((f"bwd{step}", *_rss_mib()))
        engine.step()
        log.append((f"step{step}", *_rss_mib()))
    return log


def main() -> None:
    cfg = make_config(MODEL, parallel=dict(zero_stage=3),
                      train=dict(precision="fp32", micro_batch_size=2, global_batch_size=4, seq_len=128))
    total = param_counts(cfg.model).total
    print(f"{total:,} parameters, {total * 4 / 2**20:.0f} MiB in fp32; per phase: RSS / high-water mark, MiB")
    for name, overrides in VARIANTS.items():
        for rank, log in enumerate(run_ranks(2, phases, cfg, 3, overrides)):
            print(f"{name:18} rank {rank}: " + "  ".join(f"{phase} {rss}/{hwm}" for phase, rss, hwm in log))


if __name__ == "__main__":
    main()
