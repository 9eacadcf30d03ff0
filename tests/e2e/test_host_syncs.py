"""The training loop reads nothing from the device between log steps.

Every way megatrain code can pull a tensor to the host (.item, .tolist, .cpu, float(), int(), bool(),
torch.cuda.synchronize) is counted when called from a file under megatrain/, with the step
the loop is in; the real `train()` runs a tiny model for 8 steps, logging every 4th.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.e2e.conftest import TRAIN

PACKAGE = str(Path(__file__).resolve().parents[2] / "megatrain")
# Not .numpy(): it refuses CUDA tensors, so it only ever reads host tensors (the preemption flag).
READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")


def reads_per_step(rank: int, data: str, run_dir: str, *overrides: str, nan_at: int = 0) -> dict[tuple, int]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import megatrain.engine.trainer as trainer
    from launcher.common import CONF_DIR
    from megatrain.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        composed = compose("config", overrides=[*TRAIN, f"data.path={data}", f"run.dir={run_dir}",
                                                "train.eval_interval=0", "train.precision=fp32", *overrides])
    step, reads = [0], Counter()

    def counted(original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                reads[(step[0], f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}")] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in READS:
        setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    torch.cuda.synchronize = counted(torch.cuda.synchronize)
    real_step = trainer.train_step

    def train_step(*args, **kwargs):
        step[0] += 1  # reads until the next call belong to this step
        loss, lr = real_step(*args, **kwargs)
        return (loss * float("nan") if step[0] == nan_at else loss), lr

    trainer.train_step = train_step
    assert trainer.train(to_config(composed), OmegaConf.to_container(composed, resolve=True)) == 0
    return dict(reads)


def test_no_device_reads_between_log_steps(tiny_data, tmp_path):
    reads = run_ranks(1, reads_per_step, str(tiny_data), str(tmp_path / "run"), "train.steps=8",
                      "train.log_interval=4")[0]
    print(reads)
    steps = {step for step, _ in reads if step > 0}
    assert steps <= {4, 8}, reads  # log steps (8 also saves)
    assert 4 in steps  # the counter sees the loop's reads


def test_a_non_finite_loss_between_log_steps_stops_the_run_before_the_next_save(tiny_data, tmp_path):
    with pytest.raises(RuntimeError, match="loss is not finite at step 1 \\(read at step 2\\)"):
        run_ranks(1, functools.partial(reads_per_step, nan_at=1), str(tiny_data), str(tmp_path / "run"),
                  "train.steps=4", "train.log_interval=10", "train.save_interval=2")
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
