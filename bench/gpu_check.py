"""One-GPU check of megatrain (run through bench/gpu_check.sh, which installs what is missing).

(a) loss parity, CPU against GPU, tiny model, 20 steps: fp32 within 1e-4 relative, bf16 within 2e-2;
(b) a ~1B LLaMA-style model (model=llama-1b) in bf16 at seq 2048 for a few dozen steps: tokens/s, MFU
    against the datasheet table, peak memory against `launcher.plan`'s prediction, the SDPA kernel, the
    start-up check that SDPA is not the math kernel, and FlexAttention's document mask against the dense one;
(c) save, resume, and the next losses identical to the run that did not stop.

`--dry-run`: the same three phases at toy size on the CPU (CI runs it, so the script cannot rot): the
"GPU" side is the CPU too, bf16 parity and the SDPA probe are skipped, the bench model is `tiny`.
Every run is `python -m launcher.train` as a user types it; results go to --out/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ("model=tiny", "train.seq_len=64", "train.micro_batch_size=4", "train.eval_interval=0",
        "train.log_interval=1", "optim.warmup_steps=2", "logging.progress=false", "logging.wandb_mode=disabled")
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}  # max relative loss difference over the steps, CPU vs GPU
MFU_TARGET = 0.45  # issue 14's target for (b) on one H200
STEPS, DRY_STEPS = 20, 4  # parity and resume run lengths


def sh(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def train(run_dir: Path, *overrides: str) -> list[dict]:
    sh("-m", "launcher.train", f"run.dir={run_dir}", *overrides)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def make_data(out: Path) -> Path:
    """A synthetic corpus (seeded random words in random-length documents), prepared by launcher.prepare."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(800)]
    text = out / "corpus.txt"
    out.mkdir(parents=True, exist_ok=True)
    text.write_text("\n\n".join(" ".join(rng.choices(words, k=rng.randint(50, 400))) for _ in range(600)))
    data = out / "data"
    sh("-m", "launcher.prepare", f"prepare.input=[{text}]", "prepare.text_unit=paragraph", f"prepare.output={data}",
       "tokenizer.vocab_size=512", "logging.progress=false")
    return data


def parity(out: Path, data: Path, device: str, precisions: list[str], steps: int) -> dict:
    """(a), and the reference for (c): each run saves half way."""
    result = {}
    for precision in precisions:
        common = (*TINY, f"data.path={data}", f"train.steps={steps}", f"train.save_interval={steps // 2}",
                  f"train.precision={precision}")
        cpu = losses(train(out / f"parity-{precision}-cpu", *common, "train.device=cpu"))
        dev = losses(train(out / f"parity-{precision}-{device}", *common, f"train.device={device}"))
        diff = max_rel_diff(dev, cpu)
        result[precision] = {"max_rel_diff": diff, "tolerance": TOLERANCE[precision],
                             "ok": diff <= TOLERANCE[precision]}
    return result


def resume(out: Path, data: Path, device: str, steps: int) -> dict:
    """(c): the second half of the fp32 parity run, resumed from its half-way checkpoint, against its own."""
    straight, resumed, half = out / f"parity-fp32-{device}", out / "resumed", f"step_{steps // 2:08d}"
    shutil.copytree(straight / "checkpoints" / half, resumed / "checkpoints" / half)
    after = losses(train(resumed, *TINY, f"data.path={data}", f"train.steps={steps}", "train.precision=fp32",
                         f"train.device={device}", "train.resume=auto"))
    before = {s: v for s, v in losses([json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
                                      ).items() if s > steps // 2}
    return {"steps": sorted(after), "identical": after == before,
            "max_abs_diff": max(abs(after[s] - before[s]) for s in before) if after.keys() == before.keys() else None}


def sdpa_kernel(overrides: list[str], device: str) -> str:
    """Which SDPA kernel the model's attention call runs at the bench shapes (from the profiler's kernel names)."""
    if device != "cuda":
        return "n/a (CPU)"
    import torch
    import torch.nn.functional as F

    from megatrain.config import to_config

    cfg = to_config(_compose(overrides))
    m, b, s = cfg.model, cfg.train.micro_batch_size, cfg.train.seq_len
    q = torch.randn(b, m.n_heads, s, m.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = [torch.randn(b, m.kv_heads, s, m.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
          for _ in range(2)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=m.kv_heads != m.n_heads).sum().backward()
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    for kernel, marks in (("cudnn", ("cudnn",)), ("flash", ("flash",)), ("efficient", ("fmha", "efficient"))):
        if any(mark in names for mark in marks):
            return kernel
    return "math"


def attention_checks(overrides: list[str], device: str) -> dict:
    """megatrain's start-up SDPA check at the bench config (flash/cuDNN must take bf16 on a GPU), and the
    document-mask kernel of this device (FlexAttention on CUDA) against the dense mask, fp32, forward and
    gradients: the CPU suite can only run Flex's forward. The dry run checks its CPU kernel instead."""
    import torch

    from megatrain.config import ConfigError, to_config
    from megatrain.model.attention import DocumentMask, attend, check_attention, document_kernel

    cfg = to_config(_compose(overrides))
    try:  # a no-op on the CPU: nothing there picks a math kernel behind the user's back
        check_attention(cfg.model, torch.bfloat16, torch.device(device), document_mask=False)
        verdict = "ok" if device == "cuda" else "n/a (CPU)"
    except ConfigError as error:
        verdict = f"FAILED: {error}"
    gen = torch.Generator(device=device).manual_seed(0)
    doc_ids = torch.cumsum((torch.rand(2, 1000, device=device, generator=gen) < 0.01).int(), dim=1).int()
    q = torch.randn(2, 8, 1000, 64, device=device, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 1000, 64, device=device, generator=gen, requires_grad=True) for _ in range(2))
    out = {b: attend(q, k, v, DocumentMask.build(doc_ids, b)) for b in ("auto", "math")}
    grads = {b: torch.autograd.grad(o.square().sum(), (q, k, v)) for b, o in out.items()}
    pairs = [(out["auto"], out["math"]), *zip(grads["auto"], grads["math"])]
    diff = max(((a - m).abs().max() / m.abs().max()).item() for a, m in pairs)  # relative to each tensor's scale
    return {"sdpa_check": verdict, "document_kernel": document_kernel("auto", device), "document_max_rel_diff": diff,
            "document_ok": diff < 1e-4}


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from megatrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def bench(out: Path, data: Path, device: str, dry_run: bool) -> dict:
    """(b): throughput and memory of the big model; the last log window (after warm-up) is reported.
    The dry run reads the fp32 parity run instead of training a model of its own (one launch less)."""
    start = time.perf_counter()
    if dry_run:
        overrides = [*TINY, f"data.path={data}", f"train.steps={DRY_STEPS}", f"train.save_interval={DRY_STEPS // 2}",
                     "train.precision=fp32", "train.device=cpu"]
        metrics = (out / "parity-fp32-cpu" / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in metrics]
    else:
        overrides = ["model=llama-1b", "train.seq_len=2048", "train.micro_batch_size=8", "train.steps=30",
                     "train.log_interval=10", "train.eval_interval=0", "train.precision=bf16", "optim.warmup_steps=5",
                     "logging.progress=false", "logging.wandb_mode=disabled", f"data.path={data}",
                     f"train.device={device}"]
        rows = train(out / "bench", *overrides)
    wall = time.perf_counter() - start
    last = rows[-1]
    from megatrain.plan import plan

    planned = plan(_compose([o for o in overrides if not o.startswith("train.device")]), world_size=1)
    measured_gb = last.get("mem_peak_gb", last.get("mem_peak_rss_gb", 0.0)) * 2**30 / 1e9
    return {"overrides": overrides, "wall_s": wall, "tokens_per_s": last["tokens_per_s"], "mfu": last.get("mfu"),
            "mfu_target": MFU_TARGET, "tflops_per_device": last["tflops_per_device"],
            "peak_memory_gb": measured_gb, "memory_measure": "torch max_memory_allocated" if device == "cuda"
            else "peak RSS", "planned_gb_without_overhead": (planned.memory.total - planned.memory.overhead) / 1e9,
            "sdpa_kernel": sdpa_kernel(overrides, device), **attention_checks(overrides, device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (what CI runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device visible; use --dry-run on a CPU", file=sys.stderr)
            return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: --out {args.out} is not empty; give a new directory", file=sys.stderr)
        return 2
    data = make_data(args.out)
    steps = DRY_STEPS if args.dry_run else STEPS
    report = {"device": device, "parity": parity(args.out, data, device, ["fp32"] if args.dry_run else ["fp32", "bf16"],
                                                 steps)}
    report["resume"] = resume(args.out, data, device, steps)
    report["bench"] = bench(args.out, data, device, args.dry_run)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    for precision, p in report["parity"].items():
        print(f"(a) parity {precision}: max relative loss difference {p['max_rel_diff']:.2e} "
              f"(tolerance {p['tolerance']:g}): {'ok' if p['ok'] else 'FAILED'}")
    r = report["resume"]
    verdict = 'identical' if r['identical'] else 'DIFFER'
    print(f"(c) resume at step {steps // 2}: steps {steps // 2 + 1}-{steps} {verdict} "
          f"(max abs diff {r['max_abs_diff']})")
    b = report["bench"]
    mfu = f"MFU {b['mfu']:.1%} (target >= {MFU_TARGET:.0%})" if b["mfu"] is not None else "MFU omitted (no peak)"
    print(f"(b) {b['tokens_per_s']:,.0f} tokens/s, {b['tflops_per_device']:.1f} TFLOP/s, {mfu}; peak memory "
          f"{b['peak_memory_gb']:.2f} GB ({b['memory_measure']}) vs planned {b['planned_gb_without_overhead']:.2f} GB "
          f"(without plan.overhead_gb); SDPA kernel: {b['sdpa_kernel']}; {b['wall_s']:.0f} s")
    print(f"(b) attention: start-up SDPA check {b['sdpa_check']}; document mask through {b['document_kernel']} vs "
          f"the dense mask, fp32 forward + gradients: max diff {b['document_max_rel_diff']:.1e} of the largest value")
    ok = all(p["ok"] for p in report["parity"].values()) and r["identical"] and b["document_ok"] \
        and not b["sdpa_check"].startswith("FAILED")
    print(f"gpu_check: {'passed' if ok else 'FAILED'}; details in {args.out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
