"""One stage split: the planner reports the blocks per stage that the pipeline runtime builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatrain.parallel.stages import bubble_fraction, stage_layers
from megatrain.plan import plan
from tests.unit.test_plan import preset

PRESETS = {p.stem: yaml.safe_load(p.read_text())
           for p in sorted((Path(__file__).resolve().parents[2] / "conf" / "model").glob("*.yaml"))}
# MoE presets are refused under PP (config.validate), so only dense presets are cut into stages.
LAYOUTS = [(name, pp) for name, model in PRESETS.items() for pp in (2, 4, 8)
           if pp <= model["n_layers"] and not (model.get("moe") or {}).get("experts")]


@pytest.mark.parametrize(("name", "pp"), LAYOUTS)
def test_planner_and_runtime_cut_every_preset_the_same_way(name, pp):
    vocab = [] if PRESETS[name]["vocab_size"] else ["model.vocab_size=50304"]  # null: sized from data
    cfg = preset(name, f"parallel.pp={pp}", f"plan.num_gpus={pp}", "train.seq_len=128", *vocab)
    planned = plan(cfg).stage_blocks
    assert list(planned) == stage_layers(cfg.model, pp, cfg.train.seq_len)  # what model/pipeline.py builds
    assert sum(planned) == cfg.model.n_layers and min(planned) >= 1


def test_the_lm_head_of_a_large_vocabulary_takes_the_place_of_blocks():
    """llama-1b's 128k-token head costs about four blocks: the last of 4 stages gets one block."""
    cfg = preset("llama-1b", "parallel.pp=4", "plan.num_gpus=4", "train.seq_len=256")
    assert plan(cfg).stage_blocks == (5, 5, 5, 1)


def test_an_explicit_split_is_used_as_given():
    cfg = preset("llama-7b", "parallel.pp=4", "plan.num_gpus=4", "parallel.pp_split=[10,8,8,6]")
    assert plan(cfg).stage_blocks == (10, 8, 8, 6)


def test_planner_step_time_counts_the_1f1b_bubble():
    flat = plan(preset("llama-7b", "parallel.pp=4", "plan.num_gpus=4", "train.micro_batch_size=1",
                       "train.global_batch_size=4"))
    deep = plan(preset("llama-7b", "parallel.pp=4", "plan.num_gpus=4", "train.micro_batch_size=1",
                       "train.global_batch_size=64"))
    idle = bubble_fraction(4, 4), bubble_fraction(4, 64)
    # per token, the step time scales with 1 / (1 - idle) (communication aside)
    ratio = (flat.step_time_s / 4) / (deep.step_time_s / 64)
    assert ratio == pytest.approx((1 - idle[1]) / (1 - idle[0]), rel=0.02)
