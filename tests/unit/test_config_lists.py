"""Keys that take a list of inputs accept one value too; anything else is refused naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from launcher.common import CONF_DIR
from megatrain.config import ConfigError, register_configs, to_config


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def test_a_single_path_or_budget_is_a_list_of_one() -> None:
    cfg = composed("fit.input=runs.csv", "sweep.budgets=1e17")
    assert cfg.fit.input == ["runs.csv"] and cfg.sweep.budgets == [1e17]
    cfg = composed("fit.input=[a.csv,runs/b]", "sweep.budgets=[1e17,3e17]")
    assert cfg.fit.input == ["a.csv", "runs/b"] and cfg.sweep.budgets == [1e17, 3e17]


@pytest.mark.parametrize(("override", "key"), [("fit.input=[a.csv,3]", "fit.input"),
                                               ("sweep.budgets=[1e17,big]", "sweep.budgets")])
def test_a_wrong_entry_is_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}=.*each entry must be"):
        composed(override)


def test_cli_takes_one_csv_and_refuses_a_bad_entry_with_exit_2(tmp_path: Path) -> None:
    from tests.unit.test_scaling_report import law_csv

    law_csv(tmp_path / "law.csv")
    base = [sys.executable, "-m", "launcher.fit_scaling", "fit.approach=3", f"fit.output={tmp_path / 'out'}",
            "fit.bootstrap=0", "logging.wandb_mode=disabled"]
    ok = subprocess.run([*base, f"fit.input={tmp_path / 'law.csv'}"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "approach 3: E=" in ok.stdout
    bad = subprocess.run([*base, "fit.input=[a.csv,3]"], capture_output=True, text=True)
    assert bad.returncode == 2 and "fit.input=['a.csv', 3]: each entry must be a string" in bad.stderr


@pytest.mark.parametrize(("override", "key"), [("fit.compute=6ndx", "fit.compute"), ("fit.params=all", "fit.params"),
                                               ("fit.approach=4", "fit.approach")])
def test_fit_choices_are_checked_when_the_config_is_read(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not allowed; choose one of"):
        composed(override)
