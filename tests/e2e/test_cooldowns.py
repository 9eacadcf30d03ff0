"""WSD cooldown branches: a branch forked from the stable run equals an independent run of its length."""

from __future__ import annotations

import json

from megatrain.scaling.flops import param_counts
from tests.e2e.conftest import TRAIN, cli, losses
from tests.unit.test_config_lists import composed

WSD = ("optim.schedule=wsd", "optim.decay_fraction=0.2", "optim.lr=3e-3", "optim.min_lr=3e-4",
       "optim.warmup_steps=2", "train.precision=fp32", "train.global_batch_size=2", "train.eval_interval=0")


def test_a_cooldown_branch_is_the_independent_run_decayed_to_its_tokens(tiny_data, tmp_path):
    args = (*TRAIN, f"data.path={tiny_data}", *WSD)
    stable, branch, alone = tmp_path / "stable", tmp_path / "branch", tmp_path / "alone"
    # 10 steps x 128 tokens: the branch decays over steps 9-10 (the last 20%), forking after step 8.
    # and the rule's one branch, 1x a tokens-per-parameter ratio = 640 tokens = 5 steps, forks after step 4
    ratio = 640 / param_counts(composed("model=tiny", "model.vocab_size=512").model).total
    result = cli("launcher.train", *args, f"run.dir={stable}", "train.steps=20", "train.cooldowns=1280",
                 f"train.cooldown_rule.tokens_per_param={ratio!r}", "train.cooldown_rule.multiples=[1]")
    assert result.returncode == 0, result.stderr
    fork = stable / "cooldowns" / "checkpoints" / "step_00000008"
    assert fork.is_dir() and (stable / "checkpoints" / "step_00000020").is_dir()
    assert (stable / "cooldowns" / "checkpoints" / "step_00000004").is_dir()
    result = cli("launcher.train", *args, f"run.dir={branch}", "train.steps=10", f"train.fork_from={fork}",
                 "optim.resume_schedule=stretch")
    assert result.returncode == 0, result.stderr
    assert cli("launcher.train", *args, f"run.dir={alone}", "train.steps=10").returncode == 0
    forked, independent = losses(branch), losses(alone)
    assert sorted(forked) == list(range(9, 11))  # the branch trained only its decay
    for step in (9, 10):
        assert forked[step] == independent[step]
    assert losses(stable)[8] == independent[8]  # and the stable run matched it up to the fork
    summary = json.loads((branch / "summary.json").read_text())
    assert summary["tokens"] == 1280 == json.loads((alone / "summary.json").read_text())["tokens"]


def test_cooldowns_are_refused_without_wsd_or_longer_than_the_run(tiny_data, tmp_path):
    args = (*TRAIN, f"data.path={tiny_data}", "train.global_batch_size=2", f"run.dir={tmp_path / 'r'}")
    result = cli("launcher.train", *args, "train.steps=20", "train.cooldowns=[1280]")
    assert result.returncode == 2 and "need optim.schedule=wsd" in result.stderr
    result = cli("launcher.train", *args, *WSD, "train.steps=20", "train.cooldowns=[12800]")
    assert result.returncode == 2 and "train.cooldowns entry 12800 tokens = 100 steps" in result.stderr
    result = cli("launcher.train", *args, *WSD, "train.steps=20", "train.cooldown_rule.tokens_per_param=20")
    assert result.returncode == 2 and "train.cooldown_rule 0.5x 20 tokens per parameter x" in result.stderr
