"""Learning-rate and batch-size laws: eta_opt = a C^b and B_opt = c C^d, as DeepSeek LLM (2024) fits them.

A sweep that varies optim.lr and train.global_batch_size at each compute budget (sweep.lr_factors,
sweep.batch_factors) leaves runs of (C, eta, B, loss), possibly several seeds per (budget, eta, B)
cell. Per budget, the runs of a cell are averaged (their spread is the seed noise) and the cell
means are fitted by a quadratic in (log eta, log B) (a parabola in the one that varies, if only
one does); its vertex is that budget's optimum, kept only where it is bracketed: the lowest-mean
cell is not on the edge of the swept grid and the vertex lies inside it (otherwise the number
would be an extrapolation, and the budget is skipped with the reason). Where cells repeat, the
lowest cell is compared with its grid neighbours: a neighbour closer than twice the standard
error of the difference (seed sd pooled over those cells) means the optimum is not resolved
beyond seed noise, and the fit says so. The optima at 2+ budgets give the power laws by least squares in log-log;
intervals come from a two-stage bootstrap (cells within each budget, then runs within each
cell), so they carry the seed noise. B is in tokens per optimizer step (global batch x seq_len),
eta the peak learning rate; C follows fit.compute (6ND or measured).
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

Z = 2.0  # a neighbour within Z standard errors of the lowest cell is not told apart from it


@dataclass(frozen=True)
class HparamPoint:
    """One finished run at compute C, peak learning rate `lr`, `batch` tokens per step, final `loss`."""

    compute: float
    lr: float
    batch: float
    loss: float
    budget: float | None = None
    name: str = ""
    seed: int | None = None


@dataclass(frozen=True)
class Cell:
    """The runs of one budget at one (lr, batch): their mean loss is what the fit sees."""

    compute: float
    lr: float
    batch: float
    losses: tuple[float, ...]
    budget: float | None = None

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses))


@dataclass
class HparamFit:
    lr: PowerLaw | None  # None where no budget varied the learning rate at 3+ values
    batch: PowerLaw | None
    optima: list[dict]  # per budget: C, lr, batch, loss, and how the lowest cell stands out of the noise
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = {}
        for key, law in (("lr", self.lr), ("batch", self.batch)):
            if law is not None:
                out[f"{key}_coefficient"], out[f"{key}_exponent"] = law.coefficient, law.exponent
        return out


def cells_of(group: Sequence[HparamPoint]) -> list[Cell]:
    """The runs of one budget averaged per (lr, batch); two runs of a cell with the same seed are refused
    (the same run given twice would pass for seed noise of zero)."""
    found: dict[tuple[float, float], list[HparamPoint]] = {}
    for p in group:
        found.setdefault((round(math.log(p.lr), 6), round(math.log(p.batch), 6)), []).append(p)
    out = []
    for runs in found.values():
        seeds = [p.seed for p in runs if p.seed is not None]
        if len(set(seeds)) < len(seeds):
            names = ", ".join(p.name or "?" for p in runs)
            raise ValueError(f"runs {names} share budget, lr={runs[0].lr:.4g}, batch={runs[0].batch:.4g} and a "
                             "seed: the same run given twice? repeats of a cell need different train.seed")
        out.append(Cell(group_compute(runs), runs[0].lr, runs[0].batch, tuple(p.loss for p in runs), runs[0].budget))
    return out


def _resolution(cells: list[Cell], best: int, varied: list[str]) -> dict:
    """How the lowest cell stands against its grid neighbours (8-neighbourhood) beyond the seed noise: the
    sd pooled over the lowest cell and its neighbours, since unstable corners of a grid (high lr) are
    noisier than its valley; over the whole budget where none of those repeats."""
    out: dict = {"seeds": max(len(c.losses) for c in cells), "seed_sd": None, "resolved": None}
    index = {k: sorted({round(math.log(getattr(c, k)), 6) for c in cells}) for k in varied}
    where = [[index[k].index(round(math.log(getattr(c, k)), 6)) for k in varied] for c in cells]
    near = [i for i in range(len(cells)) if i != best and
            max(abs(a - b) for a, b in zip(where[i], where[best], strict=True)) == 1]
    repeats = [cells[i] for i in [best, *near] if len(cells[i].losses) >= 2] or [
        c for c in cells if len(c.losses) >= 2]
    if not repeats:
        return out
    dof = sum(len(c.losses) - 1 for c in repeats)
    sd = math.sqrt(sum((len(c.losses) - 1) * np.var(c.losses, ddof=1) for c in repeats) / dof)
    closest = None
    for c in (cells[i] for i in near):
        se = sd * math.sqrt(1 / len(c.losses) + 1 / len(cells[best].losses))
        gap = c.loss - cells[best].loss
        z = gap / se if se > 0 else math.inf if gap > 0 else 0.0  # se 0: repeats that agree exactly
        if closest is None or z < closest[0]:
            closest = (z, gap, se, c)
    out["seed_sd"] = sd
    if closest is not None:
        z, gap, se, c = closest
        out.update(resolved=bool(z > Z), closest={"lr": c.lr, "batch": c.batch, "gap": gap, "se": se})
    return out


def _optimum(cells: list[Cell]) -> tuple[dict | None, str]:
    """The bracketed vertex of the loss surface over (log lr, log batch) of one budget, or why not."""
    c = group_compute(cells)
    axes = {"lr": np.log([p.lr for p in cells]), "batch": np.log([p.batch for p in cells])}
    varied = [k for k, x in axes.items() if len(np.unique(x)) >= 3]
    if not varied:
        return None, f"C={c:.3g}: neither the learning rate nor the batch takes 3+ values"
    x = np.stack([axes[k] for k in varied], axis=1)
    center = x.mean(axis=0)  # centred for conditioning
    u = x - center
    cols = [np.ones(len(cells)), *u.T, *(u**2).T] + ([u[:, 0] * u[:, 1]] if len(varied) == 2 else [])
    design = np.stack(cols, axis=1)
    if len(cells) <= design.shape[1]:
        return None, f"C={c:.3g}: {len(cells)} cells for a {design.shape[1]}-term quadratic in {' and '.join(varied)}"
    coef, *_ = np.linalg.lstsq(design, np.array([p.loss for p in cells]), rcond=None)
    k = len(varied)
    grad, hess = coef[1 : 1 + k], np.diag(2 * coef[1 + k : 1 + 2 * k])
    if k == 2:
        hess[0, 1] = hess[1, 0] = coef[-1]
    if np.any(np.linalg.eigvalsh(hess) <= 0):
        return None, f"C={c:.3g}: loss is not convex in log {' and '.join(varied)}, no minimum"
    vertex = center + np.linalg.solve(hess, -grad)
    best = min(range(len(cells)), key=lambda i: cells[i].loss)
    for j, key in enumerate(varied):
        lo, hi = x[:, j].min(), x[:, j].max()
        if x[best, j] in (lo, hi) or not lo < vertex[j] < hi:
            return None, (f"C={c:.3g}: the optimum {key} is not bracketed (lowest loss at {key}="
                          f"{math.exp(x[best, j]):.3g}, swept {math.exp(lo):.3g}-{math.exp(hi):.3g}); sweep beyond it")
    u0 = vertex - center
    row = [1.0, *u0, *(u0**2)] + ([u0[0] * u0[1]] if k == 2 else [])
    out = {"C": c, "lr": None, "batch": None, "loss": float(np.dot(coef, row)),
           "runs": sum(len(q.losses) for q in cells),
           "best_cell": {"lr": cells[best].lr, "batch": cells[best].batch, "loss": cells[best].loss},
           **_resolution(cells, best, varied)}
    for j, key in enumerate(varied):
        out[key] = float(math.exp(vertex[j]))
    return out, ""


def _noise_warning(o: dict) -> str | None:
    if o["resolved"] is not False:
        return None
    b, n = o["best_cell"], o["closest"]
    return (f"C={o['C']:.3g}: the lowest cell (lr {b['lr']:.3g}, batch {b['batch']:.4g}) is not distinguishable "
            f"from its neighbour (lr {n['lr']:.3g}, batch {n['batch']:.4g}) beyond seed noise: gap {n['gap']:.4f} < "
            f"{Z:g} x se {n['se']:.4f} (seed sd {o['seed_sd']:.4f}, {o['seeds']} seeds); this optimum is noise-limited")


def fit_cells(budgets: Sequence[list[Cell]]) -> HparamFit:
    """eta_opt(C) and B_opt(C) from the per-budget optima of cell means (module doc)."""
    optima, skipped = [], []
    for cells in budgets:
        o, why = _optimum(cells)
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
    warnings = [w for w in map(_noise_warning, optima) if w]
    if all(o["seed_sd"] is None for o in optima):
        warnings.append("one run per (lr, batch) cell: the seed noise is not measured, so whether each budget's "
                        "optimum stands out of it is unchecked; repeat the sweep with another train.seed")
    return HparamFit(laws["lr"], laws["batch"], optima, skipped, warnings)


def _check(points: Sequence[HparamPoint]) -> None:
    if not points:
        raise ValueError("no runs to fit learning-rate and batch laws to")
    for p in points:
        for key in ("compute", "lr", "batch", "loss"):
            value = getattr(p, key)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"run {p.name or '?'}: {key}={value} must be a finite positive number")


def fit_hparams(points: Sequence[HparamPoint]) -> HparamFit:
    """The laws of the runs: per budget, the runs averaged per (lr, batch) cell, then fit_cells."""
    _check(points)
    return fit_cells([cells_of(g) for g in group_by_budget(points)])


def bootstrap_hparams(points: Sequence[HparamPoint], n: int, seed: int = 0) -> tuple[list[HparamFit], int]:
    """Refits on `n` two-stage resamples: cells within each budget, then the runs (seeds) within each
    drawn cell, so the intervals hold the seed noise as well as the grid's; returns fits and failures."""
    _check(points)
    rng = np.random.default_rng(seed)
    budgets, fits, failed = [cells_of(g) for g in group_by_budget(points)], [], 0
    for _ in range(n):
        drawn = []
        for cells in budgets:
            picked = [cells[i] for i in rng.integers(0, len(cells), len(cells))]
            drawn.append([Cell(c.compute, c.lr, c.batch, tuple(rng.choice(c.losses, len(c.losses))), c.budget)
                          for c in picked])
        try:
            fits.append(fit_cells(drawn))
        except ValueError:
            failed += 1
    return fits, failed


def report(points: Sequence[HparamPoint], budget: float, n_boot: int, seed: int) -> dict:
    """The laws, their 95% intervals and eta_opt, B_opt at `budget`, as fit.json stores them; per budget the
    optimum's own interval and how often the resamples bracket it."""
    f = fit_hparams(points)
    out: dict = {"laws": f.summary(), "optima": f.optima, "skipped": f.skipped, "warnings": f.warnings,
                 "budget": budget}
    boots, failed = bootstrap_hparams(points, n_boot, seed) if n_boot > 0 else ([], 0)
    out["bootstrap"] = {"resamples": n_boot, "failed": failed}
    for o in f.optima:  # a resample's budget is the one whose C is within 10%
        same = [b for fit in boots for b in fit.optima if abs(math.log(b["C"] / o["C"])) < 0.1]
        o["bracketed_in"] = len(same)
        o["ci"] = {k: interval([b[k] for b in same]) for k in ("lr", "batch") if o[k] is not None and same}
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
        seed = OmegaConf.select(cfg, "train.seed")
        out.append(HparamPoint(p.compute, float(lr), float(batch * seq_len), p.loss, p.budget, p.name,
                               None if seed is None else int(seed)))
    return out


def read_hparam_csv(path: Path, compute: str = "6nd") -> list[HparamPoint]:
    """Rows of lr, batch (tokens per step), loss and the compute: a C column, else N and D (6ND, or a
    `flops` column under fit.compute=measured); optional columns: `budget` groups the runs, `seed` tells
    repeats of a cell apart."""
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
            seed = int(get["seed"]) if get.get("seed") else None
            out.append(HparamPoint(c, float(get["lr"]), float(get["batch"]), float(get["loss"]), budget,
                                   f"{path}:{i}", seed))
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
    for o in result["optima"]:
        ci = o.get("ci", {})
        at = ", ".join(f"{k} {o[k]:.4g}" + (f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else "")
                       for k in ("lr", "batch") if o[k] is not None)
        noise = (f"; seed sd {o['seed_sd']:.4f} ({o['seeds']} seeds), "
                 + ("resolved" if o["resolved"] else "NOT resolved" if o["resolved"] is False else "no neighbour")
                 if o["seed_sd"] is not None else "; one run per cell")
        boot = f", bracketed in {o['bracketed_in']}/{result['bootstrap']['resamples']} resamples" if ci else ""
        lines.append(f"  C={o['C']:.3g}: {at}{noise}{boot}")
    lines.append("to plan runs with these laws: " + " ".join(laws))
    lines += [f"warning: budget skipped: {s}" for s in result["skipped"]]
    lines += [f"warning: {w}" for w in result.get("warnings", [])]
    return lines
