"""Wiring shared by every launcher: Hydra's entry point on the config tree in conf/."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import hydra

from megatrain.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def hydra_main(task: Callable) -> Callable[[], None]:
    """Wrap `task(cfg)` as a Hydra CLI over conf/config.yaml with the typed schema registered."""
    register_configs()
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    return hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)(task)
