"""Where one training step's time goes: megatrain's engine vs the plain loop, same workload, one process.

    python bench/peers/profile_step.py [--steps 3] [--rows 15] [--variant no-overflow-check,fused-rmsnorm,compile]

Times forward / backward / optimizer with wall clocks, then prints torch.profiler's top operators
by self CPU time for each. The workload is bench/bench_peers.py's (SHAPE, SEQ, GLOBAL_BATCH).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_peers import GLOBAL_BATCH, SEQ, SHAPE, _llama  # noqa: E402


def _apply(variants: set[str]) -> None:
    """Try a proposed change without editing the library: each variant patches one function."""
    import torch.nn.functional as F

    import megatrain.engine.build as build
    from megatrain.model.norms import Norm

    if "no-overflow-check" in variants:  # bf16 needs no loss scaling: skip DeepSpeed's per-tensor amax/amin scan
        make = build.deepspeed_config
        build.deepspeed_config = lambda cfg, layout: {**make(cfg, layout), "bf16": {
            "enabled": cfg.train.precision == "bf16", "check_grad_overflow": False}}
    if "fused-rmsnorm" in variants:  # one fp32 op instead of four, saving input and rstd only
        def forward(self, x):
            if self.kind != "rmsnorm":
                raise NotImplementedError
            return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)
        Norm.forward = forward
    if "compile" in variants:  # torch.compile every block (what train.compile=true would do)
        make_model = build.build_model

        def compiled(cfg, mesh, ds_config):
            model = make_model(cfg, mesh, ds_config)
            for block in model.blocks:
                block.compile()
            return model
        build.build_model = compiled


def megatrain_step(variants: set[str] = frozenset()):
    from megatrain.config import Config, ModelConfig, validate
    from megatrain.engine.build import build_engine, init_distributed
    from megatrain.parallel.mesh import Mesh

    _apply(set(variants))

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29613")
    cfg = Config(model=ModelConfig(**SHAPE, n_kv_heads=8))
    cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.precision = SEQ, GLOBAL_BATCH, "bf16"
    layout = validate(cfg, 1)
    init_distributed(torch.device("cpu"))
    engine = build_engine(cfg, Mesh.build(layout), torch.device("cpu"))
    ids = torch.randint(0, SHAPE["vocab_size"], (GLOBAL_BATCH, SEQ + 1))
    return (lambda: engine(ids[:, :-1], ids[:, 1:])), engine.backward, engine.step


def plain_step():
    model = _llama()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, SHAPE["vocab_size"], (GLOBAL_BATCH, SEQ))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return forward, lambda loss: loss.backward(), step


def run(name: str, parts, steps: int, rows: int) -> None:
    """rows=0: wall clocks only, no profiler (its overhead distorts small ops)."""
    forward, backward, step = parts
    for _ in range(2):  # warm-up
        backward(forward())
        step()
    clocks = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    with profile(activities=[ProfilerActivity.CPU]) if rows else contextlib.nullcontext() as prof:
        for _ in range(steps):
            t = time.perf_counter()
            loss = forward()
            clocks["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            backward(loss)
            clocks["backward"] += time.perf_counter() - t
            t = time.perf_counter()
            step()
            clocks["optimizer"] += time.perf_counter() - t
    total = sum(clocks.values())
    print(f"\n## {name}: {steps * GLOBAL_BATCH * SEQ / total:,.0f} tokens/s under the profiler; "
          + ", ".join(f"{k} {v / steps:.2f} s ({v / total:.0%})" for k, v in clocks.items()))
    if rows:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=15, help="profiler rows; 0: no profiler")
    ap.add_argument("--variant", default="", help="megatrain only, comma list: no-overflow-check,fused-rmsnorm,compile")
    ap.add_argument("--skip-plain", action="store_true")
    a = ap.parse_args()
    if not a.skip_plain:
        run("plain loop (autocast bf16)", plain_step(), a.steps, a.rows)
    variants = {v for v in a.variant.split(",") if v}
    run(f"megatrain engine (DeepSpeed bf16, ZeRO-1, dp=1) {sorted(variants)}", megatrain_step(variants), a.steps,
        a.rows)
