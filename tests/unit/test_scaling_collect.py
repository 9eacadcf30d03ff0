"""Points are read from run directories (summary.json, or config.yaml + metrics.jsonl), CSVs and W&B."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from megatrain.config import ModelConfig
from megatrain.scaling.collect import collect, read_csv, read_run_dir, read_wandb
from megatrain.scaling.flops import param_counts

MODEL = {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256}


def make_run(path: Path, loss: float = 3.0, summary: bool = True, steps_done: int = 10, budget=1e12,
             evals: bool = True) -> Path:
    path.mkdir(parents=True)
    cfg = {"model": MODEL, "train": {"steps": 10, "seq_len": 64}, "sweep": {"budget": budget}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": s, "loss": loss + 1 / s, "tokens": s * 256} for s in range(1, steps_done + 1)]
    if evals:
        rows[-1] |= {"eval_loss": loss, "eval_ppl": 20.0}
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        counts = param_counts(ModelConfig(**MODEL))
        (path / "summary.json").write_text(json.dumps({
            "params_total": counts.total, "params_non_embedding": counts.non_embedding, "tokens": 2560,
            "flops": 1.0, "final_loss": loss + 0.1, "final_eval_loss": loss if evals else float("nan")}))
    return path


def test_summary_json_gives_n_d_loss_and_the_planned_budget(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r", loss=2.5)
    p = read_run_dir(run)
    counts = param_counts(ModelConfig(**MODEL))
    assert (p.params, p.tokens, p.loss, p.budget) == (counts.non_embedding, 2560, 2.5, 1e12)
    assert read_run_dir(run, params="total").params == counts.total
    assert read_run_dir(run, loss="train").loss == pytest.approx(2.6)


def test_without_summary_the_config_and_metrics_are_used(tmp_path: Path) -> None:
    p = read_run_dir(make_run(tmp_path / "r", loss=2.5, summary=False))
    assert p.params == param_counts(ModelConfig(**MODEL)).non_embedding
    assert (p.tokens, p.loss) == (2560, 2.5)


def test_unfinished_runs_are_skipped(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="unfinished"):
        assert read_run_dir(make_run(tmp_path / "r", summary=False, steps_done=5)) is None


def test_missing_eval_loss_says_how_to_fit_train_loss(tmp_path: Path) -> None:
    for i, summary in enumerate((True, False)):
        with pytest.raises(ValueError, match="fit.loss=train"):
            read_run_dir(make_run(tmp_path / f"r{i}", summary=summary, evals=False))


def test_a_sweep_directory_is_searched_for_runs(tmp_path: Path) -> None:
    for i in range(3):
        make_run(tmp_path / "sweep" / "runs" / f"p{i}", loss=3.0 - i * 0.1)
    points = collect([str(tmp_path / "sweep")])
    assert sorted(p.loss for p in points) == pytest.approx([2.8, 2.9, 3.0])


def test_csv_with_n_d_loss(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("N,D,loss\n1e6,2e7,3.5\n2e6,1e7,3.4\n")
    points = read_csv(tmp_path / "a.csv")
    rows = [(p.params, p.tokens, p.loss, p.budget) for p in points]
    assert rows == [(1e6, 2e7, 3.5, None), (2e6, 1e7, 3.4, None)]


def test_csv_with_n_c_loss_derives_d_and_groups_by_c(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("n,c,Loss\n1e6,6e13,3.5\n")
    (p,) = read_csv(tmp_path / "a.csv")
    assert p.tokens == pytest.approx(1e7) and p.budget == 6e13


def test_csv_without_the_needed_columns_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("N,loss\n1e6,3.5\n")
    with pytest.raises(ValueError, match="needs columns N, D, loss"):
        read_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("N,D,loss\n1e6,oops,3.5\n")
    with pytest.raises(ValueError, match="line 2"):
        read_csv(tmp_path / "b.csv")


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such CSV file or directory"):
        collect([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run directories"):
        collect([str(tmp_path / "empty")])


def test_wandb_runs_are_read_from_their_summaries() -> None:
    def run(i: int, state: str = "finished", **summary) -> SimpleNamespace:
        base = {"params_non_embedding": 1e6 * (i + 1), "params_total": 2e6, "tokens": 1e8,
                "final_eval_loss": 3.0}
        return SimpleNamespace(id=f"r{i}", state=state, summary=base | summary,
                               config={"sweep": {"budget": 6e14}})

    api = SimpleNamespace(runs=lambda path: [run(0), run(1), run(2, state="running"), run(3, tokens=None)])
    with pytest.warns(UserWarning, match="lacks"):
        points = read_wandb("me/proj", api=api)
    assert [p.params for p in points] == [1e6, 2e6]
    assert points[0].budget == 6e14 and points[0].name == "wandb:me/proj/r0"
