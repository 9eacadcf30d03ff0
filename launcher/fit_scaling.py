"""python -m launcher.fit_scaling fit.input=<run dirs, sweep dirs, CSV, wandb:entity/project>
fit.approach=1|2|3|all fit.output=<dir> fit.budget=<FLOPs> : Chinchilla scaling-law fits."""

from __future__ import annotations

from launcher.common import fail, hydra_main
from megatrain.config import ConfigError, to_config
from megatrain.scaling.report import run


def task(cfg) -> None:
    config = to_config(cfg)  # a bad key: ConfigError, exit 2 (launcher.common)
    try:
        run(config)
    except ConfigError:
        raise
    except ValueError as e:  # bad inputs: a clear message, not a traceback
        fail(f"fit_scaling: {e}")


main = hydra_main(task)

if __name__ == "__main__":
    main()
