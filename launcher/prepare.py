"""`python -m launcher.prepare prepare.input=... prepare.output=... tokenizer.vocab_size=...`."""

from __future__ import annotations

from launcher.common import hydra_main
from megatrain.config import to_config


def _prepare(cfg) -> None:
    from megatrain.data.preprocess import prepare

    config = to_config(cfg)
    prepare(config.prepare, config.tokenizer, progress=config.logging.progress)


main = hydra_main(_prepare)

if __name__ == "__main__":
    main()
