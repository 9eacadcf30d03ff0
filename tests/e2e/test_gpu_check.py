"""bench/gpu_check.sh --dry-run: the GPU check's three phases at toy size on the CPU, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess

from tests.e2e.conftest import QUIET, ROOT


def test_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=QUIET)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu_check: passed" in result.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["parity"]["fp32"]["ok"] and report["resume"]["identical"]
    assert report["bench"]["mfu"] is None  # no peak on a CPU: omitted, not guessed
    assert report["bench"]["document_kernel"] == "segments" and report["bench"]["document_ok"]
    again = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env=QUIET)
    assert again.returncode == 2 and "is not empty" in again.stderr  # never overwrites an earlier check
