"""Where each peer's step goes, side by side: bench_peers' runs launched as it launches them, each profiled by the
trainer's `train.profile` schedule (steps 3-5), and the main thread's self time per step grouped by kind of op.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python bench/peers/compare_profiles.py [--only plain16,mt1,ds3,mt2z3,mt2z3ds] [--megatrain "overrides"]

"outside any op" is main-thread time in no profiled op: Python (the framework's hooks and bookkeeping, the loop)
and blocking that is not inside an op. Collectives' own work runs in gloo's threads; the main thread only waits
for it (in "communication" or outside any op). Rank 0's trace; the profiler's overhead is in every column.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_peers import AS_DS3, GLOBAL_BATCH, ROOT, SEQ, _env, megatrain_cmd  # noqa: E402

# First match wins; names are torch profiler op names (aten::..., c10d::..., autograd Function classes).
KINDS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("attention (SDPA)", ("scaled_dot_product",)),
    ("optimizer and clipping", ("adam", "aten::_foreach", "aten::addcmul_", "aten::linalg_vector_norm", "clip_grad")),
    ("communication", ("c10d::", "gloo:", "record_param_comms", "aten::wait")),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::stack",
                          "aten::contiguous", "aten::index", "aten::embedding")),
    ("softmax and loss", ("softmax", "nll_loss", "cross_entropy", "aten::max", "aten::exp", "aten::log")),
    ("other aten ops", ("aten::",)),
    ("autograd Functions and hooks", ("",)),
]


def kind(name: str) -> str:
    return next(k for k, keys in KINDS if any(key in name for key in keys))


def breakdown(trace: Path) -> dict[str, float]:
    """Seconds per profiled step: the step, each kind's main-thread self time, and time outside any op."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e["name"].startswith("ProfilerStep")]
    main, n = steps[0]["tid"], len(steps)
    start, end = min(s["ts"] for s in steps), max(s["ts"] + s["dur"] for s in steps)
    ops = sorted((e for e in events if e["tid"] == main and e.get("cat") == "cpu_op" and start <= e["ts"] < end),
                 key=lambda e: (e["ts"], -e["dur"]))
    self_us: Counter[str] = Counter()
    stack: list[tuple[str, float]] = []  # (name, end) of the enclosing ops
    in_ops = 0.0
    for e in ops:
        while stack and stack[-1][1] <= e["ts"]:
            stack.pop()
        if stack:
            self_us[stack[-1][0]] -= e["dur"]
        else:
            in_ops += e["dur"]
        self_us[e["name"]] += e["dur"]
        stack.append((e["name"], e["ts"] + e["dur"]))
    out = {"step": (end - start) / n, "outside any op": (end - start - in_ops) / n}
    for name, us in self_us.items():
        out[kind(name)] = out.get(kind(name), 0.0) + us / n
    return {k: v / 1e6 for k, v in out.items()}


def profile(name: str, out: Path, extra: list[str], steps: int = 6) -> Path:
    """Run one peer with its profiler on; return rank 0's trace."""
    me = [sys.executable, str(ROOT / "bench" / "bench_peers.py"), f"--steps={steps}", "--warmup=2"]
    two = ["torchrun", "--standalone", "--nproc_per_node=2", *me[1:]]
    cmd, threads = {
        "plain16": ([*me, "--worker=plain16"], 2),
        "plain": ([*me, "--worker=plain"], 2),
        "ds3": ([*two, "--worker=ds3"], 1),
        "mt1": (megatrain_cmd(1, steps, str(out / "run"), 1, ["train.profile=true", *extra]), 2),
        "mt2z3": (megatrain_cmd(2, steps, str(out / "run"), 3, ["train.profile=true", *extra]), 1),
        "mt2z3ds": (megatrain_cmd(2, steps, str(out / "run"), 3, ["train.profile=true", *AS_DS3, *extra]), 1),
    }[name]
    traces = out / "run" / "profile" if name.startswith("mt") else out
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(threads), "BENCH_PROFILE": str(out)}, capture_output=True,
                          text=True)
    found = sorted(traces.glob("rank0.*.pt.trace.json"))
    if proc.returncode or not found:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return found[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="plain16,mt1,ds3,mt2z3")
    ap.add_argument("--megatrain", default="", help="megatrain overrides, e.g. parallel.reduce_bucket_size=5e8")
    ap.add_argument("--keep", help="a new folder to keep the traces in (Perfetto opens them); default: deleted")
    a = ap.parse_args()
    names, rows = a.only.split(","), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(a.keep or tmp) / name
            if out.exists():
                raise SystemExit(f"--keep {a.keep}: {out} exists; name a new folder")
            rows[name] = breakdown(profile(name, out, a.megatrain.split()))
            print(f"{name}: {rows[name]['step']:.3f} s a step", file=sys.stderr, flush=True)
    print(f"Seconds per step ({GLOBAL_BATCH} x {SEQ} tokens), main thread of rank 0, under the profiler:\n")
    print("| kind | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for k in ["step", "outside any op", *(k for k, _ in KINDS)]:
        print(f"| {k} | " + " | ".join(f"{rows[n].get(k, 0.0):.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
