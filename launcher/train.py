"""`python -m launcher.train <overrides>` or `torchrun --nproc_per_node=N -m launcher.train <overrides>`."""

import sys

from omegaconf import DictConfig, OmegaConf

from launcher.common import EXIT_DISK_FULL, exit_without_teardown, fail, hydra_main
from megatrain.config import to_config, validate
from megatrain.engine.dist_env import resolve_dist_env


def _train(cfg: DictConfig) -> None:
    config = to_config(cfg)
    validate(config, resolve_dist_env().world_size)  # a bad value fails in a second, before torch is imported
    from megatrain.engine.divergence import EXIT_DIVERGED, Diverged
    from megatrain.engine.run_dir import DiskFull
    from megatrain.engine.trainer import train  # heavy imports after Hydra has checked the config

    try:
        code = train(config, OmegaConf.to_container(cfg, resolve=True))
    except DiskFull as err:  # whichever rank ran out of space says so
        fail(str(err), EXIT_DISK_FULL, every_rank=True)
    except Diverged as err:  # every rank agrees (a DP-mean loss, a global grad norm, an all-reduced flag)
        fail(str(err), EXIT_DIVERGED)
    if code:
        sys.exit(code)


main = hydra_main(_train)

if __name__ == "__main__":
    exit_without_teardown(main)
