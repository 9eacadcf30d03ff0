"""Collect (N, D, loss) points from run directories, a CSV, or online W&B runs.

Run directories are the source of truth (W&B offline runs cannot be read back). A run directory
is read from its `summary.json` (written when training ends); without one, from `config.yaml`
plus `metrics.jsonl`, and only if its last logged step reached `train.steps` (unfinished runs
are skipped, so a live refit during a sweep never fits a half-trained model).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from megatrain.config import ModelConfig, check_choice
from megatrain.scaling.fit import Point
from megatrain.scaling.flops import param_counts, training_flops_per_token

WANDB_PREFIX = "wandb:"
# fit.params -> summary.json key; active_*: what a token uses (MoE: top_k of the routed experts; dense: the same)
PARAM_KEYS = {"non_embedding": "params_non_embedding", "total": "params_total",
              "active_non_embedding": "params_active_non_embedding", "active_total": "params_active"}
LOSS_KEYS = {"eval": ("final_eval_loss", "eval_loss"), "train": ("final_loss", "loss")}


def _check_choice(params: str, loss: str) -> None:
    check_choice("fit.params", params, tuple(PARAM_KEYS))
    check_choice("fit.loss", loss, tuple(LOSS_KEYS))


def is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file()


def find_run_dirs(root: Path) -> list[Path]:
    """`root` itself if it is a run directory, else every run directory below it (a sweep)."""
    if is_run_dir(root):
        return [root]
    found = {p.parent for name in ("summary.json", "metrics.jsonl") for p in root.rglob(name)}
    return sorted(found)


def _sweep_budget(run: Path) -> float | None:
    if not (run / "config.yaml").is_file():
        return None
    budget = OmegaConf.select(OmegaConf.load(run / "config.yaml"), "sweep.budget", default=None)
    return float(budget) if budget is not None else None


def _from_metrics(run: Path, params: str, loss: str) -> Point | None:
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run}: metrics.jsonl without summary.json or config.yaml; cannot count parameters")
    cfg = OmegaConf.load(run / "config.yaml")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = OmegaConf.select(cfg, "train.steps", default=None)
    if not rows or (steps is not None and rows[-1].get("step", 0) < steps):
        warnings.warn(f"{run}: unfinished (no summary.json, last step < train.steps), skipped", stacklevel=2)
        return None
    key = LOSS_KEYS[loss][1]
    losses = [r[key] for r in rows if r.get(key) is not None]
    if not losses:
        raise ValueError(f"{run}: no {key!r} in metrics.jsonl; set fit.loss=train or run with eval")
    model = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    n = getattr(param_counts(model), params)
    tokens = max(r.get("tokens", 0) for r in rows)
    seq_len = OmegaConf.select(cfg, "train.seq_len", default=None)
    flops = tokens * training_flops_per_token(model, seq_len) if seq_len else None
    return Point(float(n), float(tokens), float(losses[-1]), _sweep_budget(run), str(run), flops)


def read_run_dir(run: Path, params: str = "non_embedding", loss: str = "eval") -> Point | None:
    """The point of one finished run directory; None for a run that has not finished."""
    _check_choice(params, loss)
    if not (run / "summary.json").is_file():
        return _from_metrics(run, params, loss)
    summary = json.loads((run / "summary.json").read_text())
    loss_key = LOSS_KEYS[loss][0]
    # The trainer writes NaN for an eval loss it never computed (train.eval_interval=0).
    missing = [k for k in (PARAM_KEYS[params], "tokens", loss_key)
               if summary.get(k) is None or summary[k] != summary[k]]
    if missing:
        hint = "; set fit.loss=train or run with eval" if loss_key in missing else ""
        raise ValueError(f"{run}/summary.json lacks {', '.join(missing)}{hint}")
    flops, unique = summary.get("flops"), summary.get("unique_tokens")
    return Point(float(summary[PARAM_KEYS[params]]), float(summary["tokens"]), float(summary[loss_key]),
                 _sweep_budget(run), str(run), float(flops) if flops else None, float(unique) if unique else None)


def _column(header: list[str], *names: str) -> str | None:
    lower = {h.strip().lower(): h for h in header}
    return next((lower[n.lower()] for n in names if n.lower() in lower), None)


def read_csv(path: Path) -> list[Point]:
    """Rows of N, D, loss (or N, C, loss with D = C / 6N); an optional `budget` column groups IsoFLOPs.

    Beside D, a `flops` column is the run's measured training FLOPs (fit.compute=measured) and
    `unique_tokens` (or `U`) the distinct tokens it saw (fit.approach=data).
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        n_col, d_col = _column(header, "N", "params"), _column(header, "D", "tokens")
        c_col, l_col = _column(header, "C", "compute", "flops"), _column(header, "loss")
        b_col, name_col = _column(header, "budget"), _column(header, "name", "run")
        f_col = _column(header, "flops") if d_col else None
        u_col = _column(header, "unique_tokens", "U")
        if n_col is None or l_col is None or (d_col is None and c_col is None):
            raise ValueError(f"{path}: needs columns N, D, loss (or N, C, loss); found {', '.join(header)}")
        points = []
        for i, row in enumerate(reader, start=2):
            try:
                n, loss = float(row[n_col]), float(row[l_col])
                d = float(row[d_col]) if d_col else float(row[c_col]) / (6 * n)
                budget = row.get(b_col) if b_col else None
                budget = float(budget) if budget else (float(row[c_col]) if c_col and not d_col else None)
                flops = float(row[f_col]) if f_col and row[f_col] else None
                unique = float(row[u_col]) if u_col and row[u_col] else None
            except (TypeError, ValueError, ZeroDivisionError) as e:
                raise ValueError(f"{path} line {i}: {e}") from e
            points.append(Point(n, d, loss, budget, row.get(name_col) if name_col else f"{path}:{i}", flops, unique))
    return points


def read_wandb(path: str, params: str = "non_embedding", loss: str = "eval", api: Any = None) -> list[Point]:
    """Finished runs of an online W&B project `entity/project` (or one run `entity/project/id`).

    Reads the keys of summary.json from each run's W&B summary and `sweep.budget` from its config.
    """
    _check_choice(params, loss)
    if api is None:
        import wandb

        api = wandb.Api()
    runs = [api.run(path)] if path.count("/") == 2 else api.runs(path)
    points = []
    for run in runs:
        if getattr(run, "state", "finished") != "finished":
            continue
        s = run.summary
        keys = (PARAM_KEYS[params], "tokens", LOSS_KEYS[loss][0])
        if any(s.get(k) is None for k in keys):
            warnings.warn(f"W&B run {run.id} lacks {', '.join(keys)} in its summary, skipped", stacklevel=2)
            continue
        budget = (run.config.get("sweep") or {}).get("budget")
        points.append(Point(float(s[keys[0]]), float(s[keys[1]]), float(s[keys[2]]),
                            float(budget) if budget else None, f"wandb:{path}/{run.id}",
                            float(s["flops"]) if s.get("flops") else None))
    return points


def collect(inputs: Iterable[str], params: str = "non_embedding", loss: str = "eval",
            compute: str = "6nd") -> list[Point]:
    """Points from every input: `wandb:entity/project[/run]`, a CSV, a run or sweep directory, or globs.

    compute="6nd" drops the measured FLOPs (C = 6ND); "measured" needs them for every run.
    """
    _check_choice(params, loss)
    check_choice("fit.compute", compute, ("6nd", "measured"))
    points = _collect(inputs, params, loss)
    if compute == "6nd":
        return [dataclasses.replace(p, flops=None) for p in points]
    missing = [p.name for p in points if p.flops is None]
    if missing:
        raise ValueError(f"fit.compute=measured: {len(missing)} run(s) record no training FLOPs, e.g. {missing[0]} "
                         "(summary.json 'flops', a CSV 'flops' column beside D); use fit.compute=6nd")
    return points


def _collect(inputs: Iterable[str], params: str, loss: str) -> list[Point]:
    points: list[Point] = []
    for item in inputs:
        if item.startswith(WANDB_PREFIX):
            points += read_wandb(item[len(WANDB_PREFIX):], params, loss)
            continue
        paths = [Path(p) for p in sorted(glob.glob(item))] or [Path(item)]
        for path in paths:
            if path.suffix == ".csv" and path.is_file():
                points += read_csv(path)
            elif path.is_dir():
                runs = find_run_dirs(path)
                if not runs:
                    raise ValueError(f"{path}: no run directories (summary.json or metrics.jsonl) found")
                points += [p for p in (read_run_dir(r, params, loss) for r in runs) if p is not None]
            else:
                raise ValueError(f"fit.input {str(path)!r}: no such CSV file or directory "
                                 "(inputs are run/sweep directories, CSV files or wandb:<entity/project>)")
    return points
