"""Wiring shared by every launcher: Hydra's entry point on the config tree in conf/."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import hydra

from megatrain.config import ConfigError, register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_CONFIG_ERROR = 2


def hydra_main(task: Callable) -> Callable[[], None]:
    """Wrap `task(cfg)` as a Hydra CLI over conf/config.yaml with the typed schema registered.

    A ConfigError (a bad key, value, file or layout) is printed as one line and exits with 2:
    the user needs the message, not a traceback.
    """
    register_configs()

    @functools.wraps(task)
    def checked(cfg) -> None:
        try:
            task(cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CONFIG_ERROR)

    return hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)(checked)
