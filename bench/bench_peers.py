"""Training throughput vs peers on one workload: megatrain, plain PyTorch loops, plain DeepSpeed ZeRO-3 and
HF Trainer + DeepSpeed ZeRO-3.

    python bench/bench_peers.py [--repeats 3] [--steps 25] [--warmup 5] \\
        [--only plain,plain16,mt1,ds3,hf,mt2,mt2z3,mt2z3ds]

Workload: LLaMA-style 8 layers x 512 hidden (8 heads, SwiGLU 1408), vocab 8192, seq 512, bf16,
AdamW, global batch 8 sequences. Runs alternate (plain, hf, mt1, mt2, plain, ...); each reports
tokens/s over the steps after warm-up, the time from launch to the end of the first step, and
the peak RSS per rank. MFU is against the bf16 matmul peak measured at the start of the same run (4096^3,
2 threads, best of 5). Prints a markdown table (medians) for docs/benchmarks.md.
megatrain reads data/bench8k (`python -m launcher.prepare ... prepare.output=data/bench8k`); the
peers train on random token ids of the same shape (throughput does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, ffn_hidden=1408, max_seq_len=512)
SEQ, GLOBAL_BATCH = 512, 8
# mt2z3ds: megatrain's ZeRO-3 as ds3 runs it at this size under DeepSpeed's defaults: the whole model gathered
# once per step (5e7 prefetch, 1e9 live and reuse), 5e8 reduce buckets, gradients reduced in bf16
AS_DS3 = ["parallel.zero3_gather=model", "parallel.reduce_bucket_size=500000000", "train.grad_reduce_dtype=bf16"]
ROOT = Path(__file__).resolve().parent.parent


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"], num_hidden_layers=SHAPE["n_layers"],
        num_attention_heads=SHAPE["n_heads"], intermediate_size=SHAPE["ffn_hidden"],
        max_position_embeddings=SEQ, tie_word_embeddings=False, attn_implementation="sdpa"))


def _report(times: list[float], first_s: float, tokens_per_step: int, warmup: int) -> None:
    timed = times[warmup:]
    print("BENCH " + json.dumps({"tokens_per_s": tokens_per_step * len(timed) / sum(timed),
                                 "first_step_s": first_s,
                                 "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
          flush=True)


def _profiler():
    """BENCH_PROFILE=dir: the trainer's profile of steps 3-5 of this worker (for peers/compare_profiles.py)."""
    if not os.environ.get("BENCH_PROFILE"):
        return None
    from megatrain.engine.trainer import start_profiler

    return start_profiler(Path(os.environ["BENCH_PROFILE"]), int(os.environ.get("RANK", "0")))


def plain_worker(steps: int, warmup: int, pure_bf16: bool) -> None:
    """One process, fused AdamW: bf16 autocast over fp32 weights, or (pure_bf16) bf16 weights and optimizer
    states with no autocast, the fastest plain loop here. The floor any framework should match."""
    import torch

    model = _llama().to(torch.bfloat16) if pure_bf16 else _llama()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, SHAPE["vocab_size"], (GLOBAL_BATCH, SEQ))
    times, first, profiler = [], 0.0, _profiler()
    for step in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not pure_bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if step == 0:
            first = time.time() - float(os.environ["BENCH_T0"])
        if profiler:
            profiler.step()
    if profiler:
        profiler.stop()
    _report(times, first, GLOBAL_BATCH * SEQ, warmup)


def ds3_worker(steps: int, warmup: int) -> None:
    """A plain `deepspeed.initialize` ZeRO-3 loop (bf16, torch AdamW), one rank per process under torchrun."""
    import deepspeed
    import torch

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a 40 s compile training never uses
    deepspeed.init_distributed(dist_backend="gloo")
    world = int(os.environ["WORLD_SIZE"])
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "torch_adam": True, "fused": True}}}
    model = _llama()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids = torch.randint(0, SHAPE["vocab_size"], (GLOBAL_BATCH // world, SEQ))
    times, first, profiler = [], 0.0, _profiler()
    for step in range(steps):
        start = time.perf_counter()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        times.append(time.perf_counter() - start)
        if step == 0:
            first = time.time() - float(os.environ["BENCH_T0"])
        if profiler:
            profiler.step()
    if profiler:
        profiler.stop()
    if int(os.environ["RANK"]) == 0:
        _report(times, first, GLOBAL_BATCH * SEQ, warmup)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def bf16_matmul_peak() -> float:
    """FLOP/s of a 4096^3 bf16 matmul on 2 threads, best of 5: this machine's peak, measured in this run."""
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(4096, 4096, dtype=torch.bfloat16), torch.randn(4096, 4096, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 4096**3 / best


def hf_worker(steps: int, warmup: int) -> None:
    """HF Trainer + DeepSpeed ZeRO-3 (bf16, torch AdamW), one rank per process under torchrun."""
    import deepspeed.ops
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a 40 s compile training never uses
    world = int(os.environ["WORLD_SIZE"])

    class Ids(torch.utils.data.Dataset):
        def __len__(self):
            return steps * GLOBAL_BATCH

        def __getitem__(self, i):
            ids = torch.randint(0, SHAPE["vocab_size"], (SEQ,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.first, self.last = [], 0.0, None

        def on_step_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.last)
            if len(self.times) == 1:
                self.first = time.time() - float(os.environ["BENCH_T0"])

    ds = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "torch_adam": True, "fused": True}},
          "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=GLOBAL_BATCH // world,
                             max_steps=steps, learning_rate=3e-4, bf16=True, deepspeed=ds, report_to=[],
                             save_strategy="no", logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                             use_cpu=True)
    clock = Clock()
    Trainer(model=_llama(), args=args, train_dataset=Ids(), callbacks=[clock]).train()
    if int(os.environ["RANK"]) == 0:
        _report(clock.times, clock.first, GLOBAL_BATCH * SEQ, warmup)
    torch.distributed.barrier()  # as ds3_worker
    torch.distributed.destroy_process_group()


def _env(threads: int) -> dict[str, str]:
    return dict(os.environ, BENCH_T0=str(time.time()), OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu",
                PYTHONWARNINGS="ignore::FutureWarning", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")


def _worker_run(cmd: list[str], threads: int) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def megatrain_cmd(world: int, steps: int, run_dir: str, zero: int, extra: list[str]) -> list[str]:
    launch = ([sys.executable, "-m", "launcher.train"] if world == 1 else
              ["torchrun", "--standalone", f"--nproc_per_node={world}", "-m", "launcher.train"])
    model = [f"model.{k}={v}" for k, v in SHAPE.items()]
    return [*launch, "model=small", "model.name=bench", "model.n_kv_heads=8", *model, "data.path=data/bench8k",
            f"train.seq_len={SEQ}", f"train.micro_batch_size={GLOBAL_BATCH // world}",
            f"train.global_batch_size={GLOBAL_BATCH}", f"train.steps={steps}", "train.precision=bf16",
            "train.eval_interval=0", "train.save_interval=0", "train.resume=none", f"parallel.zero_stage={zero}",
            "logging.wandb_mode=disabled", "logging.progress=false", f"run.dir={run_dir}", *extra]


def megatrain_run(world: int, steps: int, warmup: int, extra: list[str], zero: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.time()
        proc = subprocess.Popen(megatrain_cmd(world, steps, run_dir, zero, extra), cwd=ROOT, env=_env(2 // world),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        metrics, first = Path(run_dir) / "metrics.jsonl", None
        while proc.poll() is None:
            if first is None and metrics.exists() and metrics.stat().st_size:
                first = time.time() - t0
            time.sleep(0.05)
        log = proc.stdout.read()
        if proc.returncode:
            raise RuntimeError(f"megatrain failed:\n{log[-3000:]}")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()][warmup:]
        return {"tokens_per_s": GLOBAL_BATCH * SEQ * len(rows) / sum(r["step_time_s"] for r in rows),
                "first_step_s": first, "peak_rss_gb": max(r.get("mem_peak_rss_gb", 0.0) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", default="plain,plain16,mt1,ds3,hf,mt2,mt2z3,mt2z3ds")
    ap.add_argument("--megatrain", default="", help="extra overrides for megatrain, e.g. train.compile=true")
    ap.add_argument("--worker", choices=["plain", "plain16", "ds3", "hf"])
    a = ap.parse_args()
    if a.worker in ("plain", "plain16"):
        return plain_worker(a.steps, a.warmup, pure_bf16=a.worker == "plain16")
    if a.worker == "ds3":
        return ds3_worker(a.steps, a.warmup)
    if a.worker == "hf":
        return hf_worker(a.steps, a.warmup)
    me = [sys.executable, __file__, f"--steps={a.steps}", f"--warmup={a.warmup}"]
    ranks2 = ["torchrun", "--standalone", "--nproc_per_node=2", __file__, f"--steps={a.steps}", f"--warmup={a.warmup}"]
    runs = {
        "plain": lambda: _worker_run([*me, "--worker=plain"], 2),
        "plain16": lambda: _worker_run([*me, "--worker=plain16"], 2),
        "ds3": lambda: _worker_run([*ranks2, "--worker=ds3"], 1),
        "hf": lambda: _worker_run([*ranks2, "--worker=hf"], 1),
        "mt1": lambda: megatrain_run(1, a.steps, a.warmup, a.megatrain.split()),
        "mt2": lambda: megatrain_run(2, a.steps, a.warmup, a.megatrain.split()),
        "mt2z3": lambda: megatrain_run(2, a.steps, a.warmup, a.megatrain.split(), zero=3),
        "mt2z3ds": lambda: megatrain_run(2, a.steps, a.warmup, [*AS_DS3, *a.megatrain.split()], zero=3),
    }
    peak = bf16_matmul_peak()
    print(f"bf16 matmul peak, 2 threads: {peak / 1e12:.2f} TFLOP/s", file=sys.stderr, flush=True)
    names = a.only.split(",")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.repeats):
        for name in names:
            load = os.getloadavg()[0]  # other work on the machine: these 2 cores may be shared
            results[name].append({**runs[name](), "load": load})
            print(f"run {r} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    from megatrain.config import ModelConfig
    from megatrain.scaling.flops import training_flops_per_token

    flops = training_flops_per_token(ModelConfig(**SHAPE, n_kv_heads=8), SEQ)
    med = {n: {k: statistics.median(x[k] for x in results[n]) for k in results[n][0]} for n in names}
    print(f"bf16 matmul peak measured in this run: {peak / 1e12:.2f} TFLOP/s (4096^3, 2 threads)\n")
    print(f"| run | tokens/s (median) | runs | MFU vs {peak / 1e12:.2f} TFLOP/s | first step (s) | peak RSS/rank (GB) "
          "| load |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        m = med[n]
        runs_s = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in results[n])
        print(f"| {n} | {m['tokens_per_s']:,.0f} | {runs_s} | {m['tokens_per_s'] * flops / peak:.1%} | "
              f"{m['first_step_s']:.1f} | {m['peak_rss_gb']:.2f} | {m['load']:.1f} |")
    pairs = (("mt1", "plain"), ("mt1", "plain16"), ("mt2z3", "ds3"), ("mt2z3", "hf"), ("mt2z3ds", "ds3"),
             ("mt2z3ds", "hf"), ("mt2", "hf"))
    for a_, b_ in pairs:
        if a_ in med and b_ in med:
            print(f"\n{a_} / {b_}: {med[a_]['tokens_per_s'] / med[b_]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    from launcher.common import exit_without_teardown

    exit_without_teardown(main)  # a finished gloo rank can abort in the interpreter's teardown (its docstring)
