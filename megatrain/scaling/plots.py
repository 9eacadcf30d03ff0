"""PNG figures of a scaling-law fit: IsoFLOP curves, the compute frontier, the parametric surface."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (runs on clusters and in tests)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megatrain.scaling.fit import AllocationFit, ParametricFit, Point, group_by_budget  # noqa: E402

COLORS = plt.get_cmap("viridis")


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def isoflop_curves(points: list[Point], fits: dict, path: Path) -> Path:
    """Loss against N for every IsoFLOP budget, with approach 2's parabolas and minima."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups = group_by_budget(points)
    a2 = fits.get(2)
    parabolas = {round(o["C"], 6): o for o in a2.optima} if isinstance(a2, AllocationFit) else {}
    for i, group in enumerate(groups):
        color = COLORS(i / max(1, len(groups) - 1))
        n = np.array([p.params for p in group])
        c = float(np.exp(np.mean(np.log([p.compute for p in group]))))  # as fit._budget
        ax.scatter(n, [p.loss for p in group], color=color, label=f"C={c:.2g}")
        o = parabolas.get(round(c, 6))
        if o:
            x = np.linspace(np.log(n.min()) - 0.3, np.log(n.max()) + 0.3, 100)
            ax.plot(np.exp(x), np.polyval(o["parabola"], x), color=color, lw=1)
            ax.scatter([o["N"]], [o["loss"]], color=color, marker="*", s=160, edgecolor="k", zorder=3)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss",
           title="IsoFLOP curves (approach 2 minima *)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def frontier(points: list[Point], fits: dict, path: Path) -> Path:
    """Loss against compute, coloured by N, with approach 1's frontier and approach 3's optimal loss."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    c = np.array([p.compute for p in points])
    sc = ax.scatter(c, [p.loss for p in points], c=np.log10([p.params for p in points]), cmap=COLORS, s=25)
    fig.colorbar(sc, ax=ax, label="log10 N")
    a1 = fits.get(1)
    if isinstance(a1, AllocationFit):
        ax.plot([o["C"] for o in a1.optima], [o["loss"] for o in a1.optima], "r-o",
                label="frontier (approach 1)")
    a3 = fits.get(3)
    if isinstance(a3, ParametricFit) and a3.alpha > 0 and a3.beta > 0:
        grid = np.geomspace(c.min(), c.max(), 50)
        ax.plot(grid, [a3.loss(*a3.optimal(x)) for x in grid], "k--", label="L(N_opt, D_opt) (approach 3)")
    ax.set(xscale="log", xlabel="compute C (FLOPs, fit.compute)", ylabel="final loss", title="Loss vs compute")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short spans
    ax.legend(fontsize=8)
    return _save(fig, path)


def allocation(points: list[Point], fits: dict, budget: float, path: Path) -> Path:
    """Compute-optimal N against C from every approach, extrapolated to the requested budget."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    c = np.array([p.compute for p in points])
    grid = np.geomspace(min(c.min(), budget), max(c.max(), budget), 50)
    for k, f in sorted(fits.items()):
        try:
            n = [f.optimal(x)[0] for x in grid]
        except ValueError:
            continue
        ax.plot(grid, n, label=f"approach {k}: a={f.summary()['a']:.3f}")
        if isinstance(f, AllocationFit):
            ax.scatter([o["C"] for o in f.optima], [o["N"] for o in f.optima], s=20)
    ax.axvline(budget, color="gray", ls=":", label=f"budget {budget:.2g}")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="optimal N",
           title="Compute-optimal model size")
    _log_ticks(ax)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _log_ticks(ax: plt.Axes, count: int = 5) -> None:
    """Evenly spaced labelled ticks on both log axes: matplotlib labels minor ticks when a span is under a
    decade, and those labels overlap or leave the outermost ticks bare."""
    ax.minorticks_off()
    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        axis.set_major_locator(matplotlib.ticker.FixedLocator(np.geomspace(*limits, count)))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:.2g}"))


def surface(points: list[Point], fit: ParametricFit, path: Path) -> Path:
    """Approach 3's L(N, D) as contours over (N, D), with the runs and the compute-optimal line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    n = np.array([p.params for p in points])
    d = np.array([p.tokens for p in points])
    nn, dd = np.meshgrid(np.geomspace(n.min() / 2, n.max() * 2, 80),
                         np.geomspace(d.min() / 2, d.max() * 2, 80))
    cs = ax.contourf(nn, dd, fit.loss(nn, dd), levels=20, cmap=COLORS)
    fig.colorbar(cs, ax=ax, label="predicted loss")
    ax.scatter(n, d, c="w", edgecolor="k", s=20, label="runs")
    if fit.alpha > 0 and fit.beta > 0:
        c = np.array([p.compute for p in points])
        grid = np.geomspace(c.min(), c.max(), 50)
        opt = np.array([fit.optimal(x) for x in grid])
        ax.plot(opt[:, 0], opt[:, 1], "r-", label="compute-optimal")
    ax.set(xscale="log", yscale="log", xlim=(nn.min(), nn.max()), ylim=(dd.min(), dd.max()),
           xlabel="parameters N", ylabel="tokens D",
           title=f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}")
    ax.legend(fontsize=8)
    return _save(fig, path)
