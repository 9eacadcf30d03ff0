"""WSD sweeps: one stable run per model, the shorter budgets as cooldown branches forked from it.

With optim.schedule=wsd a run is identical to any longer one up to the start of its decay
(OptimConfig.stable_steps). So per model shape (and lr / batch of the grid) the point of the
largest budget is trained as the stable run, with `train.cooldowns` = the token counts of the
other points of that shape; each of those becomes a branch that forks from the stable run's
checkpoint at its decay start (`train.fork_from`) and trains only its decay. A branch finishes as
a run directory of its own, with the same summary.json, so collect and fit read it as any run.
Cost: the stable runs plus the branches' decays, against every point trained from scratch.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from megatrain.config import Config, ConfigError
from megatrain.scaling.sweep import SweepPoint


def _family(p: SweepPoint) -> str:
    return p.name.split("_", 1)[1]  # the name without its budget prefix c<i>_: shape, lr and batch tags


def split(cfg: Config, points: list[SweepPoint]) -> tuple[list[SweepPoint], dict[str, SweepPoint]]:
    """(stable runs, {branch name: the stable run it forks from})."""
    if cfg.optim.schedule != "wsd":
        raise ConfigError(f"sweep.wsd=true needs optim.schedule=wsd (got {cfg.optim.schedule}): cooldown "
                          "branches fork from the stable phase of a warmup-stable-decay run")
    if not cfg.train.global_batch_size:
        raise ConfigError("sweep.wsd=true: set train.global_batch_size, the tokens per step of stable runs "
                          "and branches")
    if cfg.train.cooldown_rule.tokens_per_param is not None:
        raise ConfigError("sweep.wsd=true takes the branches' token counts from sweep.budgets; drop "
                          "train.cooldown_rule (it is for a single stable run)")
    families: dict[str, list[SweepPoint]] = defaultdict(list)
    for p in points:
        families[_family(p)].append(p)
    stable, parent = [], {}
    for members in families.values():
        longest = max(members, key=lambda p: p.steps)
        if len({p.batch for p in members}) > 1:
            raise ConfigError(f"sweep.wsd=true: the points of {_family(longest)} train at different batches "
                              "(sweep.batch_law); a branch must keep its stable run's batch")
        stable.append(longest)
        parent |= {p.name: longest for p in members if p is not longest}
    return stable, parent


def point_configs(cfg: Config, points: list[SweepPoint], sweep_dir: Path) -> dict[str, dict]:
    """Extra config per point: train.cooldowns for stable runs, train.fork_from for branches."""
    stable, parent = split(cfg, points)
    extra: dict[str, dict] = {p.name: {"train": {"cooldowns": []}} for p in stable}
    for name, root in parent.items():
        branch = next(p for p in points if p.name == name)
        extra[root.name]["train"]["cooldowns"].append(branch.tokens)
        tag = f"step_{cfg.optim.stable_steps(branch.steps):08d}"  # checkpoint.tag_for
        fork = sweep_dir / "runs" / root.name / "cooldowns" / "checkpoints" / tag
        extra[name] = {"train": {"fork_from": str(fork)}, "optim": {"resume_schedule": "stretch"}}
    return extra


def cost(cfg: Config, points: list[SweepPoint]) -> tuple[float, float]:
    """(training FLOPs of the WSD sweep, of the same points trained independently)."""
    stable, parent = split(cfg, points)
    branches = [p for p in points if p.name in parent]
    decays = sum(p.flops * (p.steps - cfg.optim.stable_steps(p.steps)) / p.steps for p in branches)
    return sum(p.flops for p in stable) + decays, sum(p.flops for p in points)
