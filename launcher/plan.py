"""`python -m launcher.plan <the overrides of launcher.train>`: memory, FLOPs and time per GPU, no GPU needed.

`plan.num_gpus=N` sets the world size (default tp x pp: one replica); `plan.search=true` ranks the
layouts that fit on N GPUs of `plan.gpu_memory_gb`. Exit 3: no layout fits (or the one asked DOES NOT FIT).
"""

import sys

from omegaconf import DictConfig

from launcher.common import EXIT_DOES_NOT_FIT, hydra_main
from megatrain.config import to_config
from megatrain.plan import describe, describe_search, plan, search


def _plan(cfg: DictConfig) -> None:
    """Prints the plan; exits 3 when nothing fits, so scripts can test it (a ConfigError exits 2)."""
    config = to_config(cfg)
    if config.plan.search:
        found = search(config)
        print(describe_search(found, config, config.plan.top))
    else:
        found = [plan(config)]
        print(describe(found[0], config))
    if not any(p.fits for p in found):
        sys.exit(EXIT_DOES_NOT_FIT)


main = hydra_main(_plan)

if __name__ == "__main__":
    main()
