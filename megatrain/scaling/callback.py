"""Live refit during a sweep: a Hydra callback that refits the scaling laws after every job.

launcher.sweep adds it to the multirun it writes:
    +hydra.callbacks.scaling_refit._target_=megatrain.scaling.callback.RefitCallback
After each job it refits every finished run of the job's `sweep.dir` into `<sweep.dir>/fit` and
updates that fit's W&B run. Early in a sweep too few runs exist for a fit: that is reported, not
raised, so the sweep goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from megatrain.config import FitConfig, LoggingConfig
from megatrain.scaling.report import format_results, refit_and_log


def _section(config: DictConfig, key: str, cls: type) -> Any:
    node = OmegaConf.select(config, key, default=None)
    return cls(**OmegaConf.to_container(node, resolve=True)) if node is not None else cls()


class RefitCallback(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "sweep.dir", default=None)
        if job_return.status != JobStatus.COMPLETED or not sweep_dir:
            return
        runs = Path(sweep_dir) / "runs"
        try:
            outcome = refit_and_log(runs, _section(config, "fit", FitConfig),
                                    _section(config, "logging", LoggingConfig), Path(sweep_dir) / "fit")
        except ValueError as e:
            print(f"scaling refit: not fitted yet: {e}")
            return
        print(format_results(outcome))
