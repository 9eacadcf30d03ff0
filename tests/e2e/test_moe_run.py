"""An expert-parallel MoE run through the CLI: load telemetry, resume on the same and on another EP layout,
Qwen2-MoE export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatrain.export.portable_format import PortableCheckpoint
from megatrain.model.transformer import Transformer
from tests.e2e.conftest import TRAIN, cli, losses, metrics, torchrun

ARGS = (*TRAIN, "model=tiny-moe", "train.precision=fp32", "train.eval_interval=0", "train.global_batch_size=4",
        "train.steps=3", "train.save_interval=1", "optim.warmup_steps=1", "optim.lr=3e-3")


def test_ep2_run_logs_expert_load_resumes_on_ep1_and_exports_to_qwen2_moe(tiny_data, tmp_path):
    straight = tmp_path / "ep2"
    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={straight}", "parallel.ep=2",
                 launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [row for row in metrics(straight) if "loss" in row]
    assert len(rows) == 3 and all(row["moe_dropped_tokens"] == 0 for row in rows)
    # block 0 is dense (first_dense_layers=1); block 1 routes 4 x 64 tokens x top-2 over 8 experts
    assert all(row["moe_load_max_block1"] >= 4 * 64 * 2 / 8 >= row["moe_load_min_block1"] for row in rows)
    assert "moe_load_cv_block0" not in rows[0]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["params_active"] < summary["params_total"] and summary["layout"]["ep"] == 2

    reference = losses(straight)
    # The same layout resumes from DeepSpeed's files (each EP rank's own experts) exactly; EP1 through the
    # portable copy, which holds the experts gathered over EP into the full [E, ...] tensors
    for name, layout, rel in (("ep2", ("parallel.ep=2",), 0), ("ep1", (), 1e-5)):
        resumed = tmp_path / f"resumed-{name}"
        shutil.copytree(straight / "checkpoints" / "step_00000001", resumed / "checkpoints" / "step_00000001")
        result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={resumed}", *layout,
                     launcher=torchrun(2))
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("loading its portable copy" in result.stderr) == (name == "ep1")
        again = losses(resumed)
        assert list(again) == [2, 3]
        for step, loss in again.items():
            assert loss == pytest.approx(reference[step], rel=rel, abs=0), (name, step)

    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    result = cli("launcher.export", f"run.dir={straight}", f"export.output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    source = PortableCheckpoint(straight / "checkpoints" / "step_00000003" / "portable")
    ours = Transformer(source.model)
    # The portable copy holds parameters; the selection bias (a buffer, off here) starts at zero
    missing = ours.load_state_dict(source.weights(), strict=False).missing_keys
    assert missing == ["blocks.1.mlp.expert_bias"]
    ids = torch.randint(0, source.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours.eval()(ids)).abs().max() <= 1e-4
