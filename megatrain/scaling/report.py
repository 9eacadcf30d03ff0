"""Fit, write (JSON, CSV, PNG) and log to W&B: the body of `launcher.fit_scaling` and of live refits.

Outputs in the output directory:
    fit.json          every approach: law, 95% bootstrap intervals, compute-optimal N and D for the budget
    approach<k>.json  one approach; approach3.json has the keys E, A, B, alpha, beta at the top
    points.csv        the (N, D, C, loss) points fitted; optimal.csv the allocation per approach;
    minima.csv        the per-budget optima of approaches 1 and 2
    isoflop.png, frontier.png, allocation.png, surface.png
W&B: one run per output directory (id derived from its path, resumed on every refit) gets the
tables, the images and the fitted values in its summary.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from megatrain.config import Config, FitConfig, LoggingConfig
from megatrain.data.manifest import with_umask_mode
from megatrain.scaling import data_constrained, hparams
from megatrain.scaling import fit as fitting
from megatrain.scaling.collect import collect
from megatrain.scaling.data_constrained import RepeatedPoint
from megatrain.scaling.fit import ParametricFit, Point

CI_KEYS = {1: ("a", "b"), 2: ("a", "b"), 3: ("E", "A", "B", "alpha", "beta", "a", "b")}


COMPUTE = {"6nd": "C = 6 N D", "measured": "C = measured training FLOPs (6 N_matmul + 12 L T d_attn per token)"}
PARAMS = {"non_embedding": "non-embedding parameters", "total": "total parameters"}


def approaches(choice: str) -> list[int]:
    return [1, 2, 3] if str(choice) == "all" else [int(choice)]  # checked by FitConfig


def _optimal(f: fitting.Fit, budget: float) -> dict:
    n, d = f.optimal(budget)
    out = {"C": budget, "N": n, "D": d, "tokens_per_param": d / n}
    if isinstance(f, ParametricFit):
        out["loss"] = float(f.loss(n, d))
    return out


def fit_one(approach: int, points: Sequence[Point], budget: float, n_boot: int, seed: int) -> tuple:
    """(fit, result dict) of one approach, with bootstrap intervals of its parameters and allocation."""
    f = fitting.fit(approach, points)
    result = {"approach": approach, **f.summary(), "optimal": _optimal(f, budget)}
    if isinstance(f, fitting.AllocationFit):
        result["optima"] = f.optima
        result["skipped"] = f.skipped
    if n_boot > 0:
        boots, failed = fitting.bootstrap(approach, points, n_boot, seed)
        ci = {k: fitting.interval([b.summary()[k] for b in boots]) for k in CI_KEYS[approach]}
        allocations = []
        for b in boots:
            try:
                allocations.append(b.optimal(budget))
            except ValueError:  # a resample whose law has no optimum (alpha or beta <= 0)
                failed += 1
        ci["N_opt"] = fitting.interval([a[0] for a in allocations])
        ci["D_opt"] = fitting.interval([a[1] for a in allocations])
        result["ci"] = ci
        result["bootstrap"] = {"resamples": n_boot, "failed": failed}
    return f, result


def fit_all(points: Sequence[Point], fit_cfg: FitConfig) -> tuple[dict, dict, dict]:
    """Fits, results and errors for the approaches of fit_cfg; with `all`, one that cannot fit is reported."""
    fitting.check_points(points)
    chosen = approaches(fit_cfg.approach)
    budget = fit_cfg.budget or max(p.compute for p in points)
    fits, results, errors = {}, {}, {}
    for k in chosen:
        try:
            fits[k], results[k] = fit_one(k, points, budget, fit_cfg.bootstrap, fit_cfg.seed)
        except ValueError as e:
            if len(chosen) == 1:
                raise
            errors[k] = str(e)
    if not fits:
        reasons = "; ".join(_reason(k, e) for k, e in errors.items())
        raise ValueError(f"no approach could be fitted: {reasons}")
    return fits, results, errors


def _write_json(path: Path, obj: dict) -> None:
    # Atomic: refits of concurrent sweep jobs may write the same file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    with_umask_mode(tmp)
    os.replace(tmp, path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    with_umask_mode(tmp)
    os.replace(tmp, path)


def write_outputs(points: Sequence[Point], fits: dict, results: dict, errors: dict, fit_cfg: FitConfig,
                  output: Path) -> list[Path]:
    """JSON, CSV and PNG files of a fit under `output`; returns the images written."""
    from megatrain.scaling import plots

    output.mkdir(parents=True, exist_ok=True)
    budget = next(iter(results.values()))["optimal"]["C"]
    meta = {"params": fit_cfg.params, "loss": fit_cfg.loss, "budget": budget, "runs": len(points),
            "compute": fit_cfg.compute, "compute_rule": COMPUTE[fit_cfg.compute]}
    _write_json(output / "fit.json", {**meta, "approaches": {str(k): r for k, r in results.items()},
                                      "errors": {str(k): e for k, e in errors.items()}})
    for k, r in results.items():
        _write_json(output / f"approach{k}.json", {**meta, **r})
    _write_csv(output / "points.csv", ["name", "N", "D", "C", "loss", "budget"],
               [[p.name, p.params, p.tokens, p.compute, p.loss, p.budget or ""] for p in points])
    rows = []
    for k, r in results.items():
        o, ci = r["optimal"], r.get("ci", {})
        rows.append([k, o["C"], o["N"], *ci.get("N_opt", ["", ""]), o["D"], *ci.get("D_opt", ["", ""]),
                     o["tokens_per_param"], r["a"], r["b"]])
    _write_csv(output / "optimal.csv", ["approach", "C", "N_opt", "N_low", "N_high", "D_opt", "D_low",
                                        "D_high", "tokens_per_param", "a", "b"], rows)
    minima = [[k, o["C"], o["N"], o["D"], o["loss"]] for k, r in results.items() for o in r.get("optima", [])]
    _write_csv(output / "minima.csv", ["approach", "C", "N", "D", "loss"], minima)
    images = [plots.isoflop_curves(list(points), fits, output / "isoflop.png"),
              plots.frontier(list(points), fits, output / "frontier.png"),
              plots.allocation(list(points), fits, budget, output / "allocation.png")]
    if isinstance(fits.get(3), ParametricFit):
        images.append(plots.surface(list(points), fits[3], output / "surface.png"))
    return images


def _flat_summary(results: dict) -> dict:
    out = {}
    for k, r in results.items():
        for key, value in r.items():
            if isinstance(value, (int, float)):
                out[f"approach{k}/{key}"] = value
        for key, value in r["optimal"].items():
            out[f"approach{k}/optimal_{key}"] = value
        for key, (lo, hi) in r.get("ci", {}).items():
            out[f"approach{k}/{key}_ci_low"], out[f"approach{k}/{key}_ci_high"] = lo, hi
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def log_to_wandb(points: Sequence[Point], results: dict, images: list[Path], fit_cfg: FitConfig,
                 logging_cfg: LoggingConfig, output: Path) -> str | None:
    """Tables, images and summary to the W&B run of this output directory; returns its id."""
    if logging_cfg.wandb_mode == "disabled":
        return None
    import wandb

    run_id = "scaling-" + hashlib.sha1(str(output.resolve()).encode()).hexdigest()[:10]
    run = wandb.init(project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity,
                     mode=logging_cfg.wandb_mode, id=run_id, resume="allow", job_type="scaling-fit",
                     name=f"scaling-fit:{output.name}", dir=str(output), config={"fit": vars(fit_cfg)})
    points_table = wandb.Table(columns=["name", "N", "D", "C", "loss", "budget"],
                               data=[[p.name, p.params, p.tokens, p.compute, p.loss, p.budget]
                                     for p in points])
    optimal_table = wandb.Table(columns=["approach", "C", "N_opt", "D_opt", "tokens_per_param", "a", "b"],
                                data=[[k, r["optimal"]["C"], r["optimal"]["N"], r["optimal"]["D"],
                                       r["optimal"]["tokens_per_param"], r["a"], r["b"]]
                                      for k, r in results.items()])
    run.log({"scaling/points": points_table, "scaling/optimal": optimal_table,
             **{f"scaling/{p.stem}": wandb.Image(str(p)) for p in images}})
    run.summary.update({"runs": len(points), **_flat_summary(results)})
    run.finish()
    return run_id


def refit_and_log(sources: str | Path | Sequence[str | Path], fit_cfg: FitConfig | None = None,
                  logging_cfg: LoggingConfig | None = None, output: str | Path | None = None) -> dict:
    """Collect every finished run under `sources`, fit, write the outputs and log them to W&B.

    Called after each run of a sweep (see megatrain.scaling.callback.RefitCallback) and by
    launcher.fit_scaling. Returns {"results", "errors", "output", "wandb_run"}.
    """
    fit_cfg = fit_cfg or FitConfig()
    logging_cfg = logging_cfg or LoggingConfig()
    inputs = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    out = Path(output or fit_cfg.output)
    if str(fit_cfg.approach) == "hparams":
        return refit_hparams(inputs, fit_cfg, logging_cfg, out)
    points = collect(inputs, fit_cfg.params, fit_cfg.loss, fit_cfg.compute)
    if str(fit_cfg.approach) == "data":
        return refit_data_constrained(points, fit_cfg, out)
    fits, results, errors = fit_all(points, fit_cfg)
    images = write_outputs(points, fits, results, errors, fit_cfg, out)
    run_id = log_to_wandb(points, results, images, fit_cfg, logging_cfg, out)
    return {"results": results, "errors": errors, "output": str(out), "wandb_run": run_id,
            "basis": f"N = {PARAMS[fit_cfg.params]}, {COMPUTE[fit_cfg.compute]}"}


def update_wandb_summary(output: Path, fit_cfg: FitConfig, logging_cfg: LoggingConfig, values: dict) -> str | None:
    """Add `values` to the summary of the W&B run of this output directory (as log_to_wandb names it)."""
    if logging_cfg.wandb_mode == "disabled":
        return None
    import wandb

    output.mkdir(parents=True, exist_ok=True)
    run_id = "scaling-" + hashlib.sha1(str(output.resolve()).encode()).hexdigest()[:10]
    run = wandb.init(project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity,
                     mode=logging_cfg.wandb_mode, id=run_id, resume="allow", job_type="scaling-fit",
                     name=f"scaling-fit:{output.name}", dir=str(output), config={"fit": vars(fit_cfg)})
    run.summary.update(values)
    run.finish()
    return run_id


def refit_hparams(inputs: list[str], fit_cfg: FitConfig, logging_cfg: LoggingConfig, out: Path) -> dict:
    """fit.approach=hparams: eta_opt(C) and B_opt(C) with intervals -> hparams.json (+ the W&B summary)."""
    points: list[hparams.HparamPoint] = []
    for item in inputs:
        if item.endswith(".csv") and Path(item).is_file():
            points += hparams.read_hparam_csv(Path(item), fit_cfg.compute)
        else:
            points += hparams.read_hparam_points(collect([item], fit_cfg.params, fit_cfg.loss, fit_cfg.compute))
    budget = fit_cfg.budget or max(p.compute for p in points) if points else 0.0
    result = hparams.report(points, budget, fit_cfg.bootstrap, fit_cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    basis = f"N = {PARAMS[fit_cfg.params]}, {COMPUTE[fit_cfg.compute]}"
    _write_json(out / "hparams.json", {"params": fit_cfg.params, "compute": fit_cfg.compute,
                                       "compute_rule": COMPUTE[fit_cfg.compute], "runs": len(points), **result})
    run_id = update_wandb_summary(out, fit_cfg, logging_cfg, {
        "runs": len(points), **{f"hparams/{k}": v for k, v in result["laws"].items()}})
    return {"hparams": result, "results": {}, "errors": {}, "output": str(out), "wandb_run": run_id,
            "basis": basis}


def refit_data_constrained(points: Sequence[Point], fit_cfg: FitConfig, out: Path) -> dict:
    """fit.approach=data: Muennighoff et al.'s L(N, D') with a fitted R_D* -> data.json."""
    missing = [p.name for p in points if p.unique_tokens is None]
    if missing:
        raise ValueError(f"fit.approach=data: {len(missing)} run(s) record no unique_tokens, e.g. {missing[0]} "
                         "(summary.json of a run trained with this version, or a CSV unique_tokens column)")
    runs = [RepeatedPoint(p, p.unique_tokens) for p in points]
    f = data_constrained.fit_data_constrained(runs)
    result = {**f.summary(), "runs": len(runs), "repeating_runs": sum(r.repetitions > 0 for r in runs),
              "max_epochs": max(r.point.tokens / r.unique_tokens for r in runs)}
    if fit_cfg.bootstrap > 0:
        result |= data_constrained.bootstrap_data_constrained(runs, fit_cfg.bootstrap, fit_cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "data.json", {"params": fit_cfg.params, "loss": fit_cfg.loss, **result})
    return {"data": result, "results": {}, "errors": {}, "output": str(out), "wandb_run": None,
            "basis": f"N = {PARAMS[fit_cfg.params]}, D' = effective tokens"}


def format_results(outcome: dict) -> str:
    """The console summary of a fit."""
    lines = [f"scaling fit -> {outcome['output']} ({outcome['basis']})"]
    if "hparams" in outcome:
        return "\n".join(lines + hparams.format_report(outcome["hparams"]))
    if "data" in outcome:
        r, ci = outcome["data"], outcome["data"].get("ci", {})
        span = {k: f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else "" for k in r}
        return "\n".join(lines + [f"data-constrained: R_D*={r['R_D_star']:.3g}{span['R_D_star']} E={r['E']:.3f} "
                                   f"alpha={r['alpha']:.3f}{span['alpha']} beta={r['beta']:.3f}{span['beta']} "
                                   f"({r['repeating_runs']} of {r['runs']} runs repeat data, up to "
                                   f"{r['max_epochs']:.3g} epochs)"])
    for k, r in outcome["results"].items():
        o, ci = r["optimal"], r.get("ci", {})

        def span(key: str, ci: dict = ci, r: dict = r, o: dict = o) -> str:
            if key not in ci:
                return ""
            scale = abs(r[key] if key in r else o[key.removesuffix("_opt")])  # the estimate the interval is around
            return f" [{_num(ci[key][0], scale)}, {_num(ci[key][1], scale)}]"

        law = (f"E={r['E']:.3f} A={r['A']:.4g} B={r['B']:.4g} alpha={r['alpha']:.3f}{span('alpha')} "
               f"beta={r['beta']:.3f}{span('beta')} " if k == 3 else "")
        lines.append(f"approach {k}: {law}a={r['a']:.3f}{span('a')} b={r['b']:.3f}{span('b')} | "
                     f"C={o['C']:.3g}: N_opt={o['N']:.4g}{span('N_opt')} D_opt={o['D']:.4g}{span('D_opt')} "
                     f"D/N={o['tokens_per_param']:.3g}")
        lines += [f"warning: approach {k}: budget skipped: {s}" for s in r.get("skipped", [])]
    lines += [f"not fitted: {_reason(k, e)}" for k, e in outcome["errors"].items()]
    return "\n".join(lines)


def _reason(approach: int, error: str) -> str:
    """`approach k: <why>`, once: most fit errors already name their approach."""
    return error if error.startswith(f"approach {approach}") else f"approach {approach}: {error}"


def _num(x: float, scale: float) -> str:
    """x to 3 significant digits; 0 when it is float noise next to `scale` (a bound of 7e-17 around 0.3)."""
    return "0" if abs(x) <= 1e-12 * max(scale, 1.0) else f"{x:.3g}"


def run(cfg: Config) -> dict:
    """launcher.fit_scaling: fit.input -> fit.output (+ W&B per logging.wandb_mode)."""
    if not cfg.fit.input:
        raise ValueError("fit.input is empty: give run or sweep directories, a CSV or wandb:<entity/project>")
    outcome = refit_and_log(cfg.fit.input, cfg.fit, cfg.logging, cfg.fit.output)
    print(format_results(outcome))
    return outcome
