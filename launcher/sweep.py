"""python -m launcher.sweep sweep.budgets=[..] sweep.min_params=.. sweep.max_params=.. sweep.dir=..
<training overrides> [hydra/launcher=submitit_slurm ...] [sweep.launch=true] : an IsoFLOP sweep.

Writes the sweep's point configs, points.csv and command.sh (the Hydra multirun) under sweep.dir,
and runs that multirun when sweep.launch=true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from launcher.common import fail, hydra_main
from megatrain.config import to_config
from megatrain.scaling import wsd
from megatrain.scaling.predict import format_verification, run_verification
from megatrain.scaling.sweep import plan, sweep_warnings, write_sweep


def task(cfg) -> None:
    config = to_config(cfg)
    overrides = HydraConfig.get().overrides
    try:
        points = plan(config)
    except ValueError as e:
        fail(f"sweep: {e}")
    # sweep.wsd: stable runs and the cooldown branches that fork from them (a ConfigError exits 2)
    extra = wsd.point_configs(config, points, Path(config.sweep.dir).resolve()) if config.sweep.wsd else None
    argvs = write_sweep(config, points, [*overrides.hydra, *overrides.task], extra)
    for p in points:
        print(f"{p.name}: C={p.budget:.3g} N={p.params} ({p.params_total} total) D={p.tokens} "
              f"steps={p.steps} D/N={p.tokens_per_param:.3g}")
    print(f"{len(points)} runs; multirun command in {config.sweep.dir}/command.sh")
    if config.sweep.wsd:
        spent, independent = wsd.cost(config, points)
        print(f"wsd: {len(points)} points for {spent:.3g} training FLOPs, against {independent:.3g} as independent "
              f"runs ({independent / spent:.2f}x the points per FLOP)")
    for warning in sweep_warnings(config, points):
        print(f"warning: {warning}", file=sys.stderr)
    if config.sweep.launch:
        for argv in argvs:  # with sweep.wsd the branches run after the stable runs they fork from
            subprocess.run(argv, check=True)
        if config.sweep.verify:
            result = run_verification(config, [*overrides.hydra, *overrides.task],
                                      lambda argv: subprocess.run(argv, check=True))
            print(format_verification(result))


main = hydra_main(task)

if __name__ == "__main__":
    main()
