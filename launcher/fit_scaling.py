"""python -m launcher.fit_scaling fit.input=<run dirs, sweep dirs, CSV, wandb:entity/project>
fit.approach=1|2|3|all fit.output=<dir> fit.budget=<FLOPs> : Chinchilla scaling-law fits."""

from __future__ import annotations

from launcher.common import fail, hydra_main
from megatrain.config import to_config
from megatrain.scaling.report import run


def task(cfg) -> None:
    try:
        run(to_config(cfg))
    except ValueError as e:  # bad inputs: a clear message, not a traceback
        fail(f"fit_scaling: {e}")


main = hydra_main(task)

if __name__ == "__main__":
    main()
