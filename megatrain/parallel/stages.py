"""Pipeline stages: which blocks each stage holds, and the 1F1B bubble. Pure arithmetic on the config.

The runtime (model/pipeline.py) and the planner (plan.py) both cut the model here, so the memory and
time the planner reports are those of the stages the run builds.
"""

from __future__ import annotations

from megatrain.config import ModelConfig
from megatrain.scaling.flops import training_flops_per_token


def stage_boundaries(model: ModelConfig, pp: int, seq_len: int, split: list[int] | None = None) -> list[int]:
    """Blocks per stage as cumulative boundaries [0, b1, ..., n_layers].

    `split` (parallel.pp_split) names the blocks per stage; otherwise the most expensive stage is
    minimised, a block costing its training FLOPs and the last stage also paying for the LM head
    (6 V d per token), which is often worth several blocks.
    """
    if split is not None:
        bounds = [0]
        for blocks in split:
            bounds.append(bounds[-1] + blocks)
        return bounds
    n = model.n_layers
    head = 6.0 * model.vocab_size * model.d_model
    block = (training_flops_per_token(model, seq_len) - head) / n
    # best[k][j]: the smallest max-stage cost placing blocks [0, j) on stages [0, k); cut[k][j]: where stage k starts.
    best = [[float("inf")] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                worst = max(best[k - 1][i], (j - i) * block + (head if k == pp else 0.0))
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    bounds, j = [n], n
    for k in range(pp, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    return bounds[::-1]


def stage_layers(model: ModelConfig, pp: int, seq_len: int, split: list[int] | None = None) -> list[int]:
    """Blocks held by each pipeline stage."""
    bounds = stage_boundaries(model, pp, seq_len, split)
    return [hi - lo for lo, hi in zip(bounds, bounds[1:])]


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B pipeline step: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)
