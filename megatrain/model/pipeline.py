"""The Transformer as a sequence of DeepSpeed pipeline layers: the same pieces, cut into stages.

Layers: [embedding, block x n_layers, final norm, LM head]. DeepSpeed's PipelineModule runs them
with its 1F1B schedule; the stage boundaries come from parallel/stages.py (the planner's too), and
the layer-indexed parameter names map back to the single-process names, so init, checkpoints and
export agree across layouts. A tied embedding lives on the first and the last stage; DeepSpeed
all-reduces its gradient. Importing this module imports DeepSpeed: do it after its set-up.
"""

from __future__ import annotations

import re

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch.utils.checkpoint import checkpoint

from megatrain.config import ModelConfig
from megatrain.model.norms import Norm
from megatrain.model.transformer import Block, Context, Embedding, lm_loss
from megatrain.parallel.deepspeed_internals import staged_pipeline_module
from megatrain.parallel.layers import ColumnParallelLinear
from megatrain.parallel.mesh import Mesh
from megatrain.parallel.stages import stage_boundaries


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


class TransformerPipe(staged_pipeline_module()):
    """This rank's stage of the model cut into `mesh.pp` stages (DeepSpeed builds only that stage)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, *, checkpointing: str, seq_len: int,
                 pp_split: list[int] | None = None):
        sp, n = mesh.layout.sequence_parallel, cfg.n_layers
        blocks = stage_boundaries(cfg, mesh.pp, seq_len, pp_split)
        if cfg.tie_embeddings:
            embed = TiedLayerSpec("embed", PipeEmbedding, cfg, mesh, sp, tied_weight_attr=["tokens.weight"])
            head = TiedLayerSpec("embed", PipeEmbedding, cfg, mesh, sp, forward_fn=Embedding.logits,
                                 tied_weight_attr=["tokens.weight"])
        else:
            embed = LayerSpec(PipeEmbedding, cfg, mesh, sp)
            head = LayerSpec(ColumnParallelLinear, cfg.d_model, cfg.vocab_size, mesh, std=cfg.init_std,
                             sequence_parallel=sp)
        layers = [embed,
                  *[LayerSpec(PipeBlock, cfg, mesh, sp, checkpointing) for _ in range(n)],
                  LayerSpec(PipeNorm, cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias, mesh, sp),
                  head]

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return lm_loss(logits, labels, cfg.vocab_size, mesh)

        # Layer index: 0 embedding, 1..n blocks, n+1 final norm, n+2 LM head.
        super().__init__(layers, [0] + [1 + b for b in blocks[1:-1]] + [n + 3],
                         topology=PipeModelDataParallelTopology(num_pp=mesh.pp, num_mp=mesh.tp, num_dp=mesh.dp),
                         loss_fn=loss_fn, activation_checkpoint_interval=1 if checkpointing == "full" else 0,
                         activation_checkpoint_func=_checkpoint, checkpointable_layers=["PipeBlock"])
        self.n_layers = n

    def canonical_name(self, name: str) -> str:
        """'3.attn.q.weight' -> 'blocks.2.attn.q.weight'; 'tied_modules.embed.x' -> 'embed.x'."""
        if name.startswith("tied_modules.embed."):
            return "embed." + name[len("tied_modules.embed."):]
        index, rest = re.match(r"(\d+)\.(.*)", name).groups()
        index = int(index)
        if index == 0:
            return f"embed.{rest}"
        if index <= self.n_layers:
            return f"blocks.{index - 1}.{rest}"
        return f"head.norm.{rest}" if index == self.n_layers + 1 else f"head.proj.{rest}"


def _checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)
