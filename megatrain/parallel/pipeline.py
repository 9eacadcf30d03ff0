"""Pipeline parallelism: the same Transformer pieces as a sequence of DeepSpeed pipeline layers.

Layers: [embedding, block x n_layers, final norm, LM head]. DeepSpeed's PipelineModule runs them
with its 1F1B schedule; we choose the stage boundaries (balanced by training FLOPs, the LM head
counted, or named explicitly by `parallel.pp_split`) and map the layer-indexed parameter names
back to the single-process names, so init, checkpoints and export agree across layouts.
A tied embedding lives on the first and the last stage; DeepSpeed all-reduces its gradient.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch.utils.checkpoint import checkpoint

from megatrain.config import Config, ModelConfig
from megatrain.model.norms import Norm
from megatrain.model.transformer import Block, Context, Embedding, tp_input
from megatrain.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatrain.parallel.layers import ColumnParallelLinear
from megatrain.parallel.mesh import Mesh


def _split(inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage inputs travel as a tensor, or (tensor, doc_ids) with document masking."""
    return (inputs[0], inputs[1]) if isinstance(inputs, tuple) else (inputs, None)


def _join(h: torch.Tensor, doc_ids: torch.Tensor | None):
    return h if doc_ids is None else (h, doc_ids)


class PipeEmbedding(Embedding):
    def forward(self, inputs):
        ids, doc_ids = _split(inputs)
        return _join(super().forward(ids), doc_ids)


class PipeBlock(Block):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool, checkpointing: str):
        super().__init__(cfg, mesh, sp, checkpointing)
        self.cfg, self.seq_factor = cfg, mesh.tp if sp else 1

    def forward(self, inputs):
        h, doc_ids = _split(inputs)
        ctx = Context(self.cfg, h.shape[1] * self.seq_factor, h.device, doc_ids)
        return _join(super().forward(h, ctx), doc_ids)


class PipeNorm(Norm):
    def forward(self, inputs):
        return super().forward(_split(inputs)[0])


def _tied_logits(embedding: Embedding, h: torch.Tensor) -> torch.Tensor:
    return F.linear(tp_input(h, embedding.mesh, embedding.sp), embedding.tokens.weight)


def stage_boundaries(cfg: Config) -> list[int]:
    """Blocks per stage as cumulative boundaries [0, b1, ..., n_layers].

    Minimises the most expensive stage, where a block costs its training FLOPs and the last
    stage also pays for the LM head (6 V d per token), which is often worth several blocks.
    """
    m, pp = cfg.model, cfg.parallel.pp
    if cfg.parallel.pp_split is not None:
        bounds = [0]
        for n in cfg.parallel.pp_split:
            bounds.append(bounds[-1] + n)
        return bounds
    attention = 2 * m.d_model**2 + 2 * m.d_model * m.kv_heads * m.head_dim
    mlp = (3 if m.activation == "swiglu" else 2) * m.d_model * m.ffn_dim
    block = 6 * (attention + mlp) + 12 * m.d_model * cfg.train.seq_len
    head = 6 * m.vocab_size * m.d_model
    n = m.n_layers
    # best[k][j]: the smallest max-stage cost placing blocks [0, j) on stages [0, k).
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                cost = (j - i) * block + (head if k == pp else 0)
                worst = max(best[k - 1][i], cost)
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    bounds, j = [n], n
    for k in range(pp, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    return bounds[::-1]


class TransformerPipe(PipelineModule):
    """The Transformer cut into `parallel.pp` stages; this rank builds only its own stage."""

    def __init__(self, cfg: Config, mesh: Mesh):
        m, sp = cfg.model, cfg.parallel.sequence_parallel
        n = m.n_layers
        blocks = stage_boundaries(cfg)
        # Layer index: 0 embedding, 1..n blocks, n+1 final norm, n+2 LM head.
        object.__setattr__(self, "_stage_parts", [0] + [1 + b for b in blocks[1:-1]] + [n + 3])
        object.__setattr__(self, "_n_layers", n)
        if m.tie_embeddings:
            embed = TiedLayerSpec("embed", PipeEmbedding, m, mesh, sp, tied_weight_attr=["tokens.weight"])
            head = TiedLayerSpec("embed", PipeEmbedding, m, mesh, sp, forward_fn=_tied_logits,
                                 tied_weight_attr=["tokens.weight"])
        else:
            embed = LayerSpec(PipeEmbedding, m, mesh, sp)
            head = LayerSpec(ColumnParallelLinear, m.d_model, m.vocab_size, mesh, std=m.init_std,
                             sequence_parallel=sp)
        layers = [embed,
                  *[LayerSpec(PipeBlock, m, mesh, sp, cfg.train.activation_checkpointing) for _ in range(n)],
                  LayerSpec(PipeNorm, m.d_model, m.norm, m.norm_eps, m.bias, mesh, sp),
                  head]
        vocab_start, group = mesh.tp_rank * (m.vocab_size // mesh.tp), mesh.tp_group

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(logits, labels, vocab_start, group).mean()

        full = cfg.train.activation_checkpointing == "full"
        super().__init__(layers, topology=PipeModelDataParallelTopology(num_pp=mesh.pp, num_mp=mesh.tp,
                                                                        num_dp=mesh.dp),
                         loss_fn=loss_fn, partition_method="megatrain",
                         activation_checkpoint_interval=1 if full else 0,
                         activation_checkpoint_func=_checkpoint, checkpointable_layers=["PipeBlock"])

    def _partition_layers(self, method: str = "megatrain") -> None:
        """DeepSpeed's hook for stage boundaries: ours are computed in __init__."""
        self.parts = self._stage_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def canonical_name(self, name: str) -> str:
        """'3.attn.q.weight' -> 'blocks.2.attn.q.weight'; 'tied_modules.embed.x' -> 'embed.x'."""
        if name.startswith("tied_modules.embed."):
            return "embed." + name[len("tied_modules.embed."):]
        index, rest = re.match(r"(\d+)\.(.*)", name).groups()
        index = int(index)
        if index == 0:
            return f"embed.{rest}"
        if index <= self._n_layers:
            return f"blocks.{index - 1}.{rest}"
        return f"head.norm.{rest}" if index == self._n_layers + 1 else f"head.proj.{rest}"


def _checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B pipeline: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)
