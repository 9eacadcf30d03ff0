"""Wiring shared by every launcher: Hydra's entry point on the config tree in conf/, and the error contract.

Exit codes (README, "Errors"): 2 for a bad key, value, file or layout (one line, naming the key and what is
allowed, before any process group), 3 for a plan that does not fit, 65 for a run that diverged
(engine/divergence.py), 74 for a save that ran out of disk space, 75 for a run saved on a signal.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import functools
import os
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig

from megatrain.config import Config, ConfigError, register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_CONFIG_ERROR = 2
EXIT_DOES_NOT_FIT = 3
EXIT_DISK_FULL = 74  # EX_IOERR: not 75, so a batch script does not requeue into the same full disk


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun or srun job, or a single process: the one process that prints errors."""
    return (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"


def fail(message: str, code: int = EXIT_CONFIG_ERROR, every_rank: bool = False) -> NoReturn:
    """Print `error: <message>` as one line (rank 0 only: every rank hits the same config error) and exit."""
    if every_rank or is_rank_zero():
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def exit_without_teardown(main: Callable[[], None]) -> NoReturn:
    """Run a launcher's main, then end the process without the interpreter's teardown.

    A finished gloo rank can abort there, even with its group destroyed: a gloo worker thread frees a finished
    collective whose tensors need the GIL, the finalizing interpreter ends that thread instead, and the unwind
    through a C++ destructor is std::terminate ("terminate called without an active exception", SIGABRT), after
    the checkpoint and summary were written. The exit code would say a good run failed, and torchrun would kill
    its peers. What a normal exit does for Python still runs: other threads are joined, atexit handlers (W&B,
    logging, the run-dir lock) run, output is flushed; only the destruction of modules and objects is skipped.
    """
    code = 0
    try:
        main()
    except SystemExit as stop:  # sys.exit(n), or sys.exit(message): printed, exit 1, as Python does
        if isinstance(stop.code, int):
            code = stop.code
        elif stop.code is not None:
            print(stop.code, file=sys.stderr)
            code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def hydra_main(task: Callable) -> Callable[[], None]:
    """Wrap `task(cfg)` as a Hydra CLI over conf/config.yaml with the typed schema registered.

    Hydra's own errors (a misspelt key, a wrong type, an unknown preset) and a ConfigError raised by the
    task are printed as one line and exit with 2: the user needs the message, not a traceback.
    """
    register_configs()

    @functools.wraps(task)
    def checked(cfg) -> None:
        try:
            task(cfg)
        except ConfigError as err:
            fail(str(err))

    entry = hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)(checked)

    def main() -> None:
        argv = sys.argv[1:]
        cfg = check_overrides(argv)
        if cfg is None or _needs_hydra(argv):
            entry()
            return
        # A single run with conf/config.yaml's hydra settings (run dir ".", no output subdir, no logging setup):
        # Hydra's entry would compose this same config twice more (~0.5 s each, on every rank) only to hand it
        # to the task, so hand it over here, as Hydra's run_job does.
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict, read_write

        HydraConfig.instance().set_config(cfg)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        checked(cfg)

    return main


def _needs_hydra(argv: list[str]) -> bool:
    """A multirun, or a run that overrides Hydra's own settings (hydra.run.dir, callbacks, job.chdir...)."""
    return any(a in ("-m", "--multirun") or a.lstrip("+~").startswith("hydra") for a in argv)


def check_overrides(argv: list[str]) -> DictConfig | None:
    """Compose the config as Hydra will, turning its multi-line errors into `fail()` lines; return it (with its
    hydra node), or None where flags other than --multirun (--help, --cfg, --config-dir...) leave it to Hydra
    itself. A multirun's sweep overrides (a=1,2) are checked by each of its jobs.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException

    multirun = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    parser, overrides = OverridesParser.create(), []
    for text in (a for a in argv if not a.startswith("-")):
        try:
            parsed = parser.parse_override(text)
        except HydraException as err:
            fail(f"cannot parse the override {text!r}: {str(err).splitlines()[0]} "
                 "(grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)")
        if not (multirun and parsed.is_sweep_override()):
            overrides.append(text)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as err:
        group, _, name = (err.missing_cfg_file or "").rpartition("/")
        options = ", ".join(err.options or [])
        fail(f"{group}={name}: no such preset; choose one of {options}" if group and options
             else str(err).splitlines()[0])
    except HydraException as err:
        fail(_hydra_message(err))
    for name, schema in typing.get_type_hints(Config).items():  # `+train.x=1` adds a key nothing reads
        unknown = set(cfg[name]) - {f.name for f in dataclasses.fields(schema)}
        if unknown:
            fail(_unknown_key(f"{name}.{sorted(unknown)[0]}", schema))
    return cfg


def _hydra_message(err: Exception) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = err.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return _unknown_key(cause.full_key, cause.object_type)
    if isinstance(cause, ValidationError) and cause.full_key:
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    return str(err).splitlines()[0]


def _unknown_key(full_key: str, owner: type | None) -> str:
    parent, _, key = full_key.rpartition(".")
    known = [f.name for f in dataclasses.fields(owner)] if owner and dataclasses.is_dataclass(owner) else []
    if not known:
        return f"{full_key} is not a config key"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    return f"{full_key} is not a config key; {hint}the keys of {parent or 'the config'} are {', '.join(known)}"
