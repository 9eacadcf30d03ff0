"""IsoFLOP sweep generation: (model shape, training tokens) points emitted as a Hydra multirun.

Shape rule (documented in docs/scaling.md): a model of n_layers L has
    d_model = head_dim * max(1, round(aspect * L / head_dim)),  n_heads = d_model / head_dim,
i.e. a fixed head width and a fixed aspect ratio d_model / n_layers (Kaplan et al. find loss flat
over a wide range of aspect ratios, so one ratio spans the sizes). The GQA group size of the base
model is kept (n_kv_heads = n_heads / group when it divides, else MHA) and the MLP width is derived
from d_model (ffn_hidden=null). Everything else (vocab, norm, activation, ...) is the base model's.
N grows monotonically with L along this ray; for each target size the L whose exact N (flops.py)
is closest in log is taken, and duplicate shapes are dropped.

Tokens: D = C / (6 N) for each budget C (C / measured FLOPs per token with fit.compute=measured),
rounded to whole optimizer steps of (train.global_batch_size or train.micro_batch_size) *
train.seq_len tokens; points outside
[sweep.min_tokens_per_param, sweep.max_tokens_per_param] are dropped.

Each point becomes an option of a generated config group `scaling_point` under
<sweep.dir>/conf, so one plain Hydra multirun (`+scaling_point=p000,p001,...`) runs the sweep with
any launcher (basic, submitit_local, submitit_slurm) and the training CLI needs no sweep logic.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatrain.config import Config, ModelConfig
from megatrain.data.manifest import parse_blend, read_manifest, vocab_from_data
from megatrain.scaling.flops import param_counts, training_flops_per_token

GROUP = "scaling_point"
CALLBACK = "megatrain.scaling.callback.RefitCallback"
# Keys each point sets itself: forwarding a user's value for them would override every point.
POINT_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.ffn_hidden",
              "train.steps", "train.eval_interval", "optim.warmup_steps", "run.", "sweep.", "train.cooldowns",
              "train.fork_from")
# Of Hydra's own overrides only the launcher choice and its settings carry over to the multirun.
LAUNCHER_KEYS = ("hydra/launcher", "hydra.launcher.")


@dataclass(frozen=True)
class SweepPoint:
    name: str
    budget: float
    model: ModelConfig
    params: int  # the N of the fits (fit.params)
    params_total: int
    steps: int
    tokens: int
    flops: float  # measured-style training FLOPs: tokens * training_flops_per_token
    lr: float | None = None  # optim.lr of this point; None: the config's
    batch: int | None = None  # train.global_batch_size of this point; None: the config's

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def shaped_model(base: ModelConfig, n_layers: int, head_dim: int, aspect: float) -> ModelConfig:
    """The base model reshaped to n_layers by the shape rule (module doc)."""
    d_model = head_dim * max(1, round(aspect * n_layers / head_dim))
    n_heads = d_model // head_dim
    group = base.n_heads // base.kv_heads
    kv = n_heads // group if n_heads % group == 0 else None
    return dataclasses.replace(base, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                               n_kv_heads=kv, ffn_hidden=None)


def model_shapes(cfg: Config, max_layers: int = 256) -> list[ModelConfig]:
    """Distinct shapes closest (in log N) to `sweep.sizes` sizes log-spaced in [min_params, max_params]."""
    sweep = cfg.sweep
    if sweep.head_dim <= 0 or sweep.head_dim % 2 or sweep.aspect <= 0:
        raise ValueError(f"sweep.head_dim={sweep.head_dim} must be a positive even number and "
                         f"sweep.aspect={sweep.aspect} positive")
    if not 0 < sweep.min_params <= sweep.max_params or sweep.sizes < 1:
        raise ValueError(f"need 0 < sweep.min_params <= sweep.max_params and sweep.sizes >= 1; got "
                         f"{sweep.min_params}, {sweep.max_params}, {sweep.sizes}")
    ray = [shaped_model(cfg.model, n, sweep.head_dim, sweep.aspect) for n in range(1, max_layers + 1)]
    sizes = [getattr(param_counts(m), cfg.fit.params) for m in ray]
    step = (math.log(sweep.max_params) - math.log(sweep.min_params)) / max(1, sweep.sizes - 1)
    chosen: list[ModelConfig] = []
    for i in range(sweep.sizes):
        target = math.log(sweep.min_params) + i * step
        best = min(range(len(ray)), key=lambda j: abs(math.log(sizes[j]) - target))
        if ray[best] not in chosen:
            chosen.append(ray[best])
    return chosen


def _with_vocab(cfg: Config) -> Config:
    """Runs size a null model.vocab_size from the data's tokenizer: count N the same way."""
    if cfg.model.vocab_size is not None:
        return cfg
    try:
        vocab = vocab_from_data(cfg.data, cfg.model.vocab_multiple, cfg.parallel.tp).vocab_size
    except ValueError as err:
        raise ValueError(f"model.vocab_size is null (sized from the data's tokenizer): {err}; "
                         "give model.vocab_size=<n> to plan a sweep without data") from None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def _hparam_grid(cfg: Config, budget: float) -> list[tuple[str, float | None, int | None]]:
    """(name tag, peak lr, global batch) of a budget's points; None: the config's own value, left unset.

    The centre is sweep.lr_law / sweep.batch_law at this budget (B in tokens, as DeepSeek LLM 2024
    states it), else optim.lr and the global batch; sweep.lr_factors / batch_factors multiply it.
    Batches round to a multiple of train.micro_batch_size.
    """
    sweep, micro = cfg.sweep, cfg.train.micro_batch_size
    lr0 = sweep.lr_law[0] * budget ** sweep.lr_law[1] if sweep.lr_law else cfg.optim.lr
    b0 = (sweep.batch_law[0] * budget ** sweep.batch_law[1] / cfg.train.seq_len if sweep.batch_law
          else cfg.train.global_batch_size or micro)
    set_lr = bool(sweep.lr_law) or sweep.lr_factors != [1.0]
    set_batch = bool(sweep.batch_law) or sweep.batch_factors != [1.0]
    grid, seen = [], set()
    for i, f in enumerate(sweep.lr_factors):
        for j, g in enumerate(sweep.batch_factors):
            batch = max(micro, micro * round(b0 * g / micro))
            if (f, batch) in seen:  # two factors rounded to one batch: one run
                continue
            seen.add((f, batch))
            tag = (f"_lr{i}" if len(sweep.lr_factors) > 1 else "") + (f"_b{j}" if len(sweep.batch_factors) > 1 else "")
            grid.append((tag, lr0 * f if set_lr else None, batch if set_batch else None))
    return grid


def _shapes_for(cfg: Config, budget: float, shapes: list[ModelConfig]) -> list[ModelConfig]:
    """All shapes, or with sweep.tokens_per_param the one shape closest to that D/N at this budget."""
    ratio = cfg.sweep.tokens_per_param
    if ratio is None:
        return shapes

    def off(m: ModelConfig) -> float:
        n = getattr(param_counts(m), cfg.fit.params)
        return abs(math.log(budget / (_per_token(cfg, m) * n)) - math.log(ratio))

    return [min(shapes, key=off)]


def _per_token(cfg: Config, model: ModelConfig) -> float:
    # Tokens priced as the fit will price them (fit.compute): 6N, or the measured FLOPs per token.
    if cfg.fit.compute == "measured":
        return training_flops_per_token(model, cfg.train.seq_len)
    return 6.0 * getattr(param_counts(model), cfg.fit.params)


def plan(cfg: Config) -> list[SweepPoint]:
    """Every (shape, tokens, lr, batch) point of the sweep described by cfg.sweep, smallest budget first."""
    cfg = _with_vocab(cfg)
    if not cfg.sweep.budgets:
        raise ValueError("sweep.budgets is empty: give budgets in FLOPs, e.g. sweep.budgets=[1e13,3e13]")
    lo, hi = cfg.sweep.min_tokens_per_param, cfg.sweep.max_tokens_per_param
    shapes = model_shapes(cfg)
    points = []
    for i, budget in enumerate(sorted(cfg.sweep.budgets)):
        for model in _shapes_for(cfg, budget, shapes):
            counts = param_counts(model)
            n = getattr(counts, cfg.fit.params)
            for tag, lr, batch in _hparam_grid(cfg, budget):
                per_step = batch or cfg.train.global_batch_size or cfg.train.micro_batch_size
                tokens_per_step = per_step * cfg.train.seq_len
                steps = round(budget / _per_token(cfg, model) / tokens_per_step)
                tokens = steps * tokens_per_step
                if steps < 1 or not lo <= tokens / n <= hi:
                    continue
                name = f"c{i}_L{model.n_layers}_d{model.d_model}{tag}"
                points.append(SweepPoint(name, float(budget), model, n, counts.total, steps, tokens,
                                         tokens * training_flops_per_token(model, cfg.train.seq_len), lr, batch))
    if not points:
        raise ValueError("no sweep point has a token count in [sweep.min_tokens_per_param, "
                         "sweep.max_tokens_per_param]; widen the params range or change the budgets")
    return points


def sweep_warnings(cfg: Config, points: list[SweepPoint]) -> list[str]:
    """What the planned sweep cannot mean as asked: fewer shapes than asked, points dropped, data repeated."""
    out = []
    sweep, distinct = cfg.sweep, len(model_shapes(_with_vocab(cfg)))
    if distinct < sweep.sizes:
        out.append(f"sweep.sizes={sweep.sizes} asked for {sweep.sizes} model sizes in [{sweep.min_params:g}, "
                   f"{sweep.max_params:g}], the shape rule (sweep.head_dim={sweep.head_dim}, sweep.aspect="
                   f"{sweep.aspect:g}) gives {distinct} distinct shapes there; widen the range or lower sweep.head_dim")
    planned = len(sweep.budgets) * distinct
    if len(points) < planned:
        out.append(f"{planned - len(points)} of {planned} (budget, size) points fall outside "
                   f"[sweep.min_tokens_per_param, sweep.max_tokens_per_param] = [{sweep.min_tokens_per_param:g}, "
                   f"{sweep.max_tokens_per_param:g}] tokens per parameter and are not run")
    try:
        available = sum(read_manifest(path)["tokens"] for path, _ in parse_blend(cfg.data))
    except ValueError:
        return out + [f"data.path={cfg.data.path} is not a prepared dataset yet: the sweep's token counts are not "
                      "checked against it"]
    largest = max(points, key=lambda p: p.tokens)
    if largest.tokens > available:
        out.append(f"point {largest.name} trains on {largest.tokens:,} tokens, {largest.tokens / available:,.1f} "
                   f"epochs of the {available:,} tokens of the data: runs repeat their data; prepare more data "
                   "or use smaller budgets")
    return out


def point_config(cfg: Config, p: SweepPoint, sweep_dir: Path) -> dict:
    m = p.model
    # Warmup is capped at a fifth of the run so the shortest runs still decay; one eval at the end.
    return {"model": {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
                      "n_kv_heads": m.n_kv_heads, "ffn_hidden": None},
            "train": {"steps": p.steps, "eval_interval": p.steps,
                      **({"global_batch_size": p.batch} if p.batch else {})},
            "optim": {"warmup_steps": min(cfg.optim.warmup_steps, p.steps // 5),
                      # min_lr keeps its ratio to the peak
                      **({"lr": p.lr, "min_lr": p.lr * cfg.optim.min_lr / cfg.optim.lr} if p.lr else {})},
            "sweep": {"budget": p.budget, "dir": str(sweep_dir)},
            "run": {"dir": str(sweep_dir / "runs" / p.name), "name": p.name}}


def multirun_command(points: list[SweepPoint], sweep_dir: Path, overrides: list[str]) -> list[str]:
    """argv of the Hydra multirun that trains every point and refits after each run.

    `overrides` are the generator's own command-line overrides: training settings and the Hydra
    launcher (e.g. hydra/launcher=submitit_slurm hydra.launcher.partition=gpu) are passed on.
    """
    forwarded = []
    point_keys = POINT_KEYS + (("optim.lr=", "optim.min_lr=") if any(p.lr for p in points) else ()) + (
        ("train.global_batch_size=",) if any(p.batch for p in points) else ())
    for o in overrides:
        key = o.lstrip("+~")
        if key.startswith("hydra") and not key.startswith(LAUNCHER_KEYS) or key.startswith(point_keys):
            continue
        forwarded.append(o)
    # The point comes last: appended config groups merge in command-line order, so a forwarded
    # `+sweep=<preset>` cannot override a point's shape or steps.
    return [sys.executable, "-m", "launcher.train", "--multirun",
            f"hydra.searchpath=[file://{sweep_dir / 'conf'}]",
            f"hydra.sweep.dir={sweep_dir / 'hydra'}",
            f"+hydra.callbacks.scaling_refit._target_={CALLBACK}",
            *forwarded,
            f"+{GROUP}=" + ",".join(p.name for p in points)]


def write_sweep(cfg: Config, points: list[SweepPoint], overrides: list[str],
                extra: dict[str, dict] | None = None) -> list[list[str]]:
    """Write the point configs, points.csv and command.sh under sweep.dir; return the multirun argvs.

    `extra`: config merged into each named point (wsd.point_configs). One multirun; with sweep.wsd=true
    two, run in order: the stable runs, then the cooldown branches that fork from their checkpoints.
    """
    sweep_dir = Path(cfg.sweep.dir).resolve()
    extra = extra or {}
    group_dir = sweep_dir / "conf" / GROUP
    group_dir.mkdir(parents=True, exist_ok=True)
    for p in points:
        body = point_config(cfg, p, sweep_dir)
        for section, values in extra.get(p.name, {}).items():
            body[section] = {**body.get(section, {}), **values}
        (group_dir / f"{p.name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(body, sort_keys=False))
    with open(sweep_dir / "points.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "budget", "N", "N_total", "D", "steps", "tokens_per_param", "flops",
                    "d_model", "n_layers", "n_heads", "n_kv_heads", "lr", "global_batch_size", "fork_from"])
        for p in points:
            w.writerow([p.name, p.budget, p.params, p.params_total, p.tokens, p.steps,
                        f"{p.tokens_per_param:.4g}", f"{p.flops:.6g}", p.model.d_model, p.model.n_layers,
                        p.model.n_heads, p.model.n_kv_heads or p.model.n_heads,
                        f"{p.lr:.6g}" if p.lr else cfg.optim.lr, p.batch or cfg.train.global_batch_size or "",
                        extra.get(p.name, {}).get("train", {}).get("fork_from", "")])
    if cfg.sweep.wsd:
        stable = [p for p in points if "cooldowns" in extra[p.name]["train"]]
        branches = [p for p in points if p not in stable]
        argvs = [multirun_command(group, sweep_dir, overrides) for group in (stable, branches) if group]
    else:
        argvs = [multirun_command(points, sweep_dir, overrides)]
    (sweep_dir / "command.sh").write_text("#!/bin/sh\nset -e\n" + "".join(
        shlex.join(["python", *argv[1:]]) + "\n" for argv in argvs))
    return argvs
