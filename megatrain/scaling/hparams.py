"""Learning-rate and batch-size laws: eta_opt = a C^b and B_opt = c C^d, as DeepSeek LLM (2024) fits them.

A sweep that varies optim.lr and train.global_batch_size at each compute budget (sweep.lr_factors,
sweep.batch_factors) leaves runs of (C, eta, B, loss). Per budget, loss is fitted by a quadratic in
(log eta, log B) (a parabola in the one that varies, if only one does); its vertex is that
budget's optimum, kept only where it is bracketed: the lowest-loss run is not on the edge of the
swept grid and the vertex lies inside it (otherwise the number would be an extrapolation, and the
budget is skipped with the reason). The optima at 2+ budgets give the power laws by least squares
in log-log; intervals come from resampling runs within each budget. B is in tokens per optimizer
step (global batch x seq_len), eta the peak learning rate; C follows fit.compute (6ND or measured).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from megatrain.scaling.fit import Point, PowerLaw, fit_power_law, group_by_budget, group_compute, interval


@dataclass(frozen=True)
class HparamPoint:
    """One finished run at compute C, peak learning rate `lr`, `batch` tokens per step, final `loss`."""

    compute: float
    lr: float
    batch: float
    loss: float
    budget: float | None = None
    name: str = ""


@dataclass
class HparamFit:
    lr: PowerLaw | None  # None where no budget varied the learning rate at 3+ values
    batch: PowerLaw | None
    optima: list[dict]  # per budget: C, lr, batch, loss
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = {}
        for key, law in (("lr", self.lr), ("batch", self.batch)):
            if law is not None:
                out[f"{key}_coefficient"], out[f"{key}_exponent"] = law.coefficient, law.exponent
        return out


def _optimum(group: list[HparamPoint]) -> tuple[dict | None, str]:
    """The bracketed vertex of the loss surface over (log lr, log batch) of one budget, or why not."""
    c = group_compute(group)
    axes = {"lr": np.log([p.lr for p in group]), "batch": np.log([p.batch for p in group])}
    varied = [k for k, x in axes.items() if len(np.unique(x)) >= 3]
    if not varied:
        return None, f"C={c:.3g}: neither the learning rate nor the batch takes 3+ values"
    x = np.stack([axes[k] for k in varied], axis=1)
    center = x.mean(axis=0)  # centred for conditioning
    u = x - center
    cols = [np.ones(len(group)), *u.T, *(u**2).T] + ([u[:, 0] * u[:, 1]] if len(varied) == 2 else [])
    design = np.stack(cols, axis=1)
    if len(group) <= design.shape[1]:
        return None, f"C={c:.3g}: {len(group)} runs for a {design.shape[1]}-term quadratic in {' and '.join(varied)}"
    coef, *_ = np.linalg.lstsq(design, np.array([p.loss for p in group]), rcond=None)
    k = len(varied)
    grad, hess = coef[1 : 1 + k], np.diag(2 * coef[1 + k : 1 + 2 * k])
    if k == 2:
        hess[0, 1] = hess[1, 0] = coef[-1]
    if np.any(np.linalg.eigvalsh(hess) <= 0):
        return None, f"C={c:.3g}: loss is not convex in log {' and '.join(varied)}, no minimum"
    vertex = center + np.linalg.solve(hess, -grad)
    best = min(range(len(group)), key=lambda i: group[i].loss)
    for j, key in enumerate(varied):
        lo, hi = x[:, j].min(), x[:, j].max()
        if x[best, j] in (lo, hi) or not lo < vertex[j] < hi:
            return None, (f"C={c:.3g}: the optimum {key} is not bracketed (lowest loss at {key}="
                          f"{math.exp(x[best, j]):.3g}, swept {math.exp(lo):.3g}-{math.exp(hi):.3g}); sweep beyond it")
    u0 = vertex - center
    row = [1.0, *u0, *(u0**2)] + ([u0[0] * u0[1]] if k == 2 else [])
    out = {"C": c, "lr": None, "batch": None, "loss": float(np.dot(coef, row)), "runs": len(group)}
    for j, key in enumerate(varied):
        out[key] = float(math.exp(vertex[j]))
    return out, ""


def fit_hparams(points: Sequence[HparamPoint]) -> HparamFit:
    """eta_opt(C) and B_opt(C) from the per-budget optima (module doc)."""
    if not points:
        raise ValueError("no runs to fit learning-rate and batch laws to")
    for p in points:
        for key in ("compute", "lr", "batch", "loss"):
            value = getattr(p, key)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"run {p.name or '?'}: {key}={value} must be a finite positive number")
    optima, skipped = [], []
    for group in group_by_budget(points):
        o, why = _optimum(group)
        if o is None:
            skipped.append(why)
        else:
            optima.append(o)
    laws = {}
    for key in ("lr", "batch"):
        found = [o for o in optima if o[key] is not None]
        laws[key] = fit_power_law([o["C"] for o in found], [o[key] for o in found]) if len(found) >= 2 else None
    if laws["lr"] is None and laws["batch"] is None:
        raise ValueError("learning-rate and batch laws need bracketed optima at 2 or more budgets; usable: "
                         f"{len(optima)}" + "".join(f"\n  {s}" for s in skipped))
    return HparamFit(laws["lr"], laws["batch"], optima, skipped)


def bootstrap_hparams(points: Sequence[HparamPoint], n: int, seed: int = 0) -> tuple[list[HparamFit], int]:
    """Refits on `n` resamples of the runs within each budget; returns the fits and the failures."""
    rng = np.random.default_rng(seed)
    groups, fits, failed = group_by_budget(points), [], 0
    for _ in range(n):
        try:
            fits.append(fit_hparams([g[i] for g in groups for i in rng.integers(0, len(g), len(g))]))
        except ValueError:
            failed += 1
    return fits, failed


def report(points: Sequence[HparamPoint], budget: float, n_boot: int, seed: int) -> dict:
    """The laws, their 95% intervals and eta_opt, B_opt at `budget`, as fit.json stores them."""
    f = fit_hparams(points)
    out: dict = {"laws": f.summary(), "optima": f.optima, "skipped": f.skipped, "budget": budget}
    boots, failed = bootstrap_hparams(points, n_boot, seed) if n_boot > 0 else ([], 0)
    out["bootstrap"] = {"resamples": n_boot, "failed": failed}
    for key, law in (("lr", f.lr), ("batch", f.batch)):
        if law is None:
            continue
        laws = [getattr(b, key) for b in boots if getattr(b, key) is not None]
        out[key] = {"coefficient": law.coefficient, "exponent": law.exponent, "at_budget": law(budget)}
        if laws:
            out[key]["ci"] = {"coefficient": interval([x.coefficient for x in laws]),
                              "exponent": interval([x.exponent for x in laws]),
                              "at_budget": interval([x(budget) for x in laws])}
    return out


def read_hparam_points(points: Sequence[Point]) -> list[HparamPoint]:
    """(C, lr, batch tokens, loss) of collected run-directory points, from each run's config.yaml."""
    out = []
    for p in points:
        cfg_path = Path(p.name) / "config.yaml"
        if not cfg_path.is_file():
            raise ValueError(f"{p.name}: learning-rate and batch laws read optim.lr and the batch from a run "
                             "directory's config.yaml; this input has none (CSV: columns C or N+D, lr, batch, loss)")
        cfg = OmegaConf.load(cfg_path)
        lr = OmegaConf.select(cfg, "optim.lr")
        batch = OmegaConf.select(cfg, "train.global_batch_size") or OmegaConf.select(cfg, "train.micro_batch_size")
        seq_len = OmegaConf.select(cfg, "train.seq_len")
        if lr is None or batch is None or seq_len is None:
            raise ValueError(f"{cfg_path}: needs optim.lr, train.global_batch_size (or micro_batch_size), "
                             "train.seq_len")
        out.append(HparamPoint(p.compute, float(lr), float(batch * seq_len), p.loss, p.budget, p.name))
    return out


def read_hparam_csv(path: Path, compute: str = "6nd") -> list[HparamPoint]:
    """Rows of lr, batch (tokens per step), loss and the compute: a C column, else N and D (6ND, or a
    `flops` column under fit.compute=measured); an optional `budget` column groups the runs."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = {h.strip().lower(): h for h in (rows[0].keys() if rows else [])}
    need = ["lr", "batch", "loss"] + ([] if "c" in header else ["flops"] if compute == "measured" else ["n", "d"])
    missing = [k for k in need if k not in header]
    if missing:
        raise ValueError(f"{path}: learning-rate and batch laws need columns lr, batch, loss and C (or N, D); "
                         f"missing {', '.join(missing)}")
    out = []
    for i, row in enumerate(rows, start=2):
        get = {k: row[h] for k, h in header.items()}
        try:
            c = float(get["c"]) if "c" in get else float(get["flops"]) if compute == "measured" else (
                6 * float(get["n"]) * float(get["d"]))
            budget = float(get["budget"]) if get.get("budget") else None
            out.append(HparamPoint(c, float(get["lr"]), float(get["batch"]), float(get["loss"]), budget, f"{path}:{i}"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} line {i}: {e}") from e
    return out


def format_report(result: dict) -> list[str]:
    lines = []
    names = {"lr": "eta_opt", "batch": "B_opt (tokens)"}
    for key in ("lr", "batch"):
        if key not in result:
            continue
        r, ci = result[key], result[key].get("ci", {})

        def span(k: str, ci: dict = ci) -> str:
            return f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else ""

        lines.append(f"{names[key]} = {r['coefficient']:.4g}{span('coefficient')} C^{r['exponent']:.4f}"
                     f"{span('exponent')} | C={result['budget']:.3g}: {r['at_budget']:.4g}{span('at_budget')}")
    laws = [f"sweep.{k}_law=[{result[k]['coefficient']:.4g},{result[k]['exponent']:.4g}]"
            for k in ("lr", "batch") if k in result]
    lines.append("to plan runs with these laws: " + " ".join(laws))
    lines += [f"warning: budget skipped: {s}" for s in result["skipped"]]
    return lines
