"""IsoFLOP sweep generation: the shape rule, token counts per budget, and the Hydra multirun it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from launcher.common import CONF_DIR
from megatrain.config import Config, ModelConfig, SweepConfig, register_configs, to_config
from megatrain.scaling.flops import param_counts
from megatrain.scaling.sweep import CALLBACK, model_shapes, plan, shaped_model, write_sweep


def sweep_config(tmp_path: Path, **sweep) -> Config:
    cfg = Config(model=ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2))
    cfg.train.seq_len, cfg.train.micro_batch_size = 128, 8
    cfg.sweep = SweepConfig(**({"budgets": [3e11, 1e12, 3e12], "min_params": 2e4, "max_params": 4e5, "sizes": 3,
                                "head_dim": 16, "aspect": 32.0, "dir": str(tmp_path / "sweep")} | sweep))
    return cfg


def test_shape_rule_keeps_head_width_aspect_and_gqa_group() -> None:
    base = ModelConfig(n_heads=8, n_kv_heads=2, ffn_hidden=1000)
    m = shaped_model(base, n_layers=6, head_dim=32, aspect=48.0)
    assert (m.d_model, m.n_heads, m.n_kv_heads, m.n_layers) == (288, 9, None, 6)  # 9 heads: group 4 -> MHA
    m = shaped_model(base, n_layers=8, head_dim=32, aspect=48.0)
    assert (m.d_model, m.n_heads, m.n_kv_heads, m.ffn_hidden) == (384, 12, 3, None)


def test_shapes_grow_and_span_the_requested_range(tmp_path: Path) -> None:
    cfg = sweep_config(tmp_path, min_params=1e5, max_params=1e7, sizes=5)
    sizes = [param_counts(m).non_embedding for m in model_shapes(cfg)]
    assert sizes == sorted(sizes) and len(sizes) == 5
    assert 0.5 < sizes[0] / 1e5 < 2 and 0.5 < sizes[-1] / 1e7 < 2


def test_each_point_spends_its_budget_to_within_a_step(tmp_path: Path) -> None:
    cfg = sweep_config(tmp_path)
    tokens_per_step = 8 * 128
    for p in plan(cfg):
        assert p.tokens == p.steps * tokens_per_step
        assert abs(6 * p.params * p.tokens - p.budget) <= 6 * p.params * tokens_per_step / 2
        assert 1 <= p.tokens_per_param <= 1000


def test_points_outside_the_tokens_per_param_range_are_dropped(tmp_path: Path) -> None:
    narrow = plan(sweep_config(tmp_path, min_tokens_per_param=5, max_tokens_per_param=100))
    assert narrow and all(5 <= p.tokens_per_param <= 100 for p in narrow)
    with pytest.raises(ValueError, match="no sweep point"):
        plan(sweep_config(tmp_path, min_tokens_per_param=1e5, max_tokens_per_param=1e6))
    with pytest.raises(ValueError, match="sweep.budgets is empty"):
        plan(sweep_config(tmp_path, budgets=[]))


def test_written_points_compose_into_valid_training_configs(tmp_path: Path) -> None:
    cfg = sweep_config(tmp_path)
    points = plan(cfg)
    [argv] = write_sweep(cfg, points, ["model=tiny", "train.seq_len=128", "model.d_model=999", "run.dir=x",
                                     "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                     "hydra.run.dir=y"])
    assert f"+hydra.callbacks.scaling_refit._target_={CALLBACK}" in argv
    assert "+scaling_point=" + ",".join(p.name for p in points) in argv
    assert {"model=tiny", "train.seq_len=128", "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=gpu"} <= set(argv)
    assert not {"model.d_model=999", "run.dir=x", "hydra.run.dir=y"} & set(argv)
    register_configs()
    p = points[-1]
    with initialize_config_dir(CONF_DIR, version_base=None):
        composed = to_config(compose("config", overrides=[argv[4], "model=tiny", "model.vocab_size=512",
                                                                f"+scaling_point={p.name}"]))
    assert (composed.model.d_model, composed.model.n_layers, composed.train.steps) == (
        p.model.d_model, p.model.n_layers, p.steps)
    assert composed.sweep.budget == p.budget
    assert Path(composed.run.dir) == tmp_path / "sweep" / "runs" / p.name
    assert param_counts(composed.model).non_embedding == p.params


def test_sweep_cli_writes_points_and_command(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "launcher.sweep", "sweep.budgets=[1e12,3e12]",
                          "sweep.min_params=2e4", "sweep.max_params=4e5", "sweep.sizes=3", "sweep.head_dim=16",
                          "sweep.aspect=32", f"sweep.dir={tmp_path}", "model=tiny", "model.vocab_size=512",
                          "train.seq_len=128"],
                         capture_output=True, text=True, check=True)
    assert "runs; multirun command" in out.stdout
    lines = (tmp_path / "points.csv").read_text().splitlines()
    assert len(lines) - 1 == len(list((tmp_path / "conf" / "scaling_point").glob("*.yaml")))
    assert "launcher.train --multirun" in (tmp_path / "command.sh").read_text()
    assert {float(line.split(",")[1]) for line in lines[1:]} == {1e12, 3e12}


def test_sweep_warns_when_it_cannot_mean_what_was_asked(tmp_path: Path) -> None:
    from megatrain.scaling.sweep import sweep_warnings
    from tests.unit.data_calls import run_prepare

    data = Config()
    (tmp_path / "a.txt").write_text("one two three four five six seven eight nine ten " * 100)
    data.prepare.input, data.prepare.output = str(tmp_path / "a.txt"), str(tmp_path / "data")
    data.tokenizer.vocab_size, data.logging.progress = 280, False
    run_prepare(data)
    cfg = sweep_config(tmp_path, min_params=2e4, max_params=2.4e4, sizes=4, max_tokens_per_param=300)
    cfg.data.path = str(tmp_path / "data")
    points = plan(cfg)
    warnings = "\n".join(sweep_warnings(cfg, points))
    assert "sweep.sizes=4 asked for 4 model sizes in [20000, 24000], the shape rule" in warnings
    assert "points fall outside [sweep.min_tokens_per_param, sweep.max_tokens_per_param] = [1, 300]" in warnings
    assert "epochs of the" in warnings and "runs repeat their data" in warnings
    cfg.data.path = str(tmp_path / "none")
    assert "is not a prepared dataset yet" in "\n".join(sweep_warnings(cfg, points))


def test_a_wsd_sweep_trains_one_stable_run_per_shape_and_branches_the_rest(tmp_path: Path) -> None:
    import yaml

    from megatrain.config import ConfigError, validate
    from megatrain.scaling import wsd

    cfg = sweep_config(tmp_path, wsd=True)
    cfg.optim.schedule, cfg.train.global_batch_size = "wsd", 8
    points = plan(cfg)
    extra = wsd.point_configs(cfg, points, tmp_path / "sweep")
    stable, branches = wsd.split(cfg, points)
    assert len(stable) + len(branches) == len(points) and branches
    for name, root in branches.items():
        p = next(q for q in points if q.name == name)
        assert p.tokens in extra[root.name]["train"]["cooldowns"] and p.steps < root.steps
        fork = Path(extra[name]["train"]["fork_from"])
        assert fork == tmp_path / "sweep" / "runs" / root.name / "cooldowns" / "checkpoints" / (
            f"step_{cfg.optim.stable_steps(p.steps):08d}")
    argvs = write_sweep(cfg, points, ["optim.schedule=wsd"], extra)
    assert len(argvs) == 2 and argvs[0][-1] == "+scaling_point=" + ",".join(p.name for p in stable)
    assert len((tmp_path / "sweep" / "command.sh").read_text().splitlines()) == 4  # sh, set -e, two multiruns
    for p in points:  # every point, stable or branch, is a valid run
        body = yaml.safe_load((tmp_path / "sweep" / "conf" / "scaling_point" / f"{p.name}.yaml").read_text())
        run = sweep_config(tmp_path)
        run.optim.schedule, run.train.global_batch_size = "wsd", 8
        run.train.steps = body["train"]["steps"]
        run.train.cooldowns = body["train"].get("cooldowns", [])
        run.train.fork_from = body["train"].get("fork_from")
        run.optim.resume_schedule = body.get("optim", {}).get("resume_schedule", "keep")
        validate(run, 1)
    spent, independent = wsd.cost(cfg, points)
    assert spent < independent and spent == pytest.approx(sum(p.flops for p in stable) + sum(
        p.flops * (p.steps - cfg.optim.stable_steps(p.steps)) / p.steps for p in points if p.name in branches))
    cfg.optim.schedule = "cosine"
    with pytest.raises(ConfigError, match="sweep.wsd=true needs optim.schedule=wsd"):
        wsd.split(cfg, points)
