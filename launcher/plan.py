"""`python -m launcher.plan <the overrides of launcher.train>`: memory, FLOPs and time per GPU, no GPU needed.

`plan.num_gpus=N` sets the world size (default tp x pp: one replica); `plan.search=true` ranks the
layouts that fit on N GPUs of `plan.gpu_memory_gb`.
"""

from omegaconf import DictConfig

from launcher.common import hydra_main
from megatrain.config import ConfigError, to_config
from megatrain.plan import describe, describe_search, plan, search


def _plan(cfg: DictConfig) -> None:
    config = to_config(cfg)
    if config.plan.search:
        print(describe_search(search(config), config, config.plan.top))
        return
    try:
        print(describe(plan(config), config))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


main = hydra_main(_plan)

if __name__ == "__main__":
    main()
