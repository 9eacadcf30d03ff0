"""The decoder-only transformer: LLaMA style (RMSNorm, RoPE, SwiGLU, GQA, no biases) or
GPT-2 style (LayerNorm, learned positions, GELU, biases), tied or untied embeddings.

Built from tensor-parallel layers; with a one-rank mesh they are plain linears. The model is
three kinds of pieces -- `Embedding`, `Block` x n_layers, `Head` -- so pipeline stages are
slices of the same pieces. Activations are [batch, seq, hidden]; under sequence parallelism
the residual stream holds this rank's sequence shard.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatrain.config import ModelConfig
from megatrain.model.attention import DocumentMask, attend
from megatrain.model.moe import MoE
from megatrain.model.norms import Norm
from megatrain.model.rope import apply_rope, rope_tables
from megatrain.parallel.context import context_parallel_attention, cp_mean_loss, zigzag_positions
from megatrain.parallel.cross_entropy import chunked_head_cross_entropy, vocab_parallel_cross_entropy
from megatrain.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    enter_tp_region,
    fused_column_linear,
    make_param,
    vocab_shard,
)
from megatrain.parallel.mappings import gather_last_dim, scatter_sequence
from megatrain.parallel.mesh import Mesh


class Context:
    """What every block needs besides its input: RoPE tables and the attention mask (None: causal).

    Under context parallelism `positions` are the sequence positions of this rank's tokens (its chunks)."""

    def __init__(self, cfg: ModelConfig, seq_len: int, device: torch.device, doc_ids: torch.Tensor | None,
                 positions: torch.Tensor | None = None):
        self.rope = rope_tables(seq_len, cfg.head_dim, cfg.rope_theta, device) if cfg.position == "rope" else None
        if self.rope is not None and positions is not None:
            self.rope = tuple(table[positions] for table in self.rope)
        # block-causal: attend only to earlier tokens of the same document, in the kernel's own form
        self.mask = None if doc_ids is None else DocumentMask.build(doc_ids, cfg.attention_backend)
        self.aux_losses: list[torch.Tensor] = []  # MoE balance losses of this forward, added to the training loss


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool, selective_checkpoint: bool):
        super().__init__()
        self.mesh, self.selective = mesh, selective_checkpoint
        self.head_dim = cfg.head_dim
        self.heads, self.kv_heads = cfg.n_heads // mesh.tp, cfg.kv_heads // mesh.tp
        self.dropout = cfg.dropout
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        d, q_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.q = ColumnParallelLinear(d, q_dim, mesh, bias=cfg.bias, std=std, sequence_parallel=sp)
        self.k = ColumnParallelLinear(d, kv_dim, mesh, bias=cfg.bias, std=std, sequence_parallel=sp)
        self.v = ColumnParallelLinear(d, kv_dim, mesh, bias=cfg.bias, std=std, sequence_parallel=sp)
        self.o = RowParallelLinear(q_dim, d, mesh, bias=cfg.bias, std=out_std, sequence_parallel=sp)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        q, k, v = fused_column_linear(x, [self.q, self.k, self.v])  # one GEMM (one gather under SP)
        b, s, _ = q.shape
        q, k, v = (y.view(b, s, -1, self.head_dim).transpose(1, 2) for y in (q, k, v))
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
            v = v.contiguous()  # else SDPA's saved v, a view, would keep the unrotated q and k alive
        if self.selective:  # recompute only the attention core: the largest activations, cheap FLOPs
            y = checkpoint(self.core, q, k, v, ctx.mask, use_reentrant=False)
        else:
            y = self.core(q, k, v, ctx.mask)
        return self.o(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask | None) -> torch.Tensor:
        if self.mesh.cp > 1:  # causal attention over the whole sequence, from this rank's chunks
            return context_parallel_attention(q, k, v, self.mesh.cp_group, self.mesh.layout.cp_mode)
        return attend(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        d, f = cfg.d_model, cfg.ffn_dim
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if self.swiglu:
            self.gate = ColumnParallelLinear(d, f, mesh, bias=cfg.bias, std=std, sequence_parallel=sp)
        self.up = ColumnParallelLinear(d, f, mesh, bias=cfg.bias, std=std, sequence_parallel=sp)
        self.down = RowParallelLinear(f, d, mesh, bias=cfg.bias, std=out_std, sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = fused_column_linear(x, [self.gate, self.up])
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool = False, checkpointing: str = "none", layer: int = 0):
        super().__init__()
        self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias, mesh, sp)
        self.attn = Attention(cfg, mesh, sp, selective_checkpoint=checkpointing == "selective")
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias, mesh, sp)
        self.mlp = MoE(cfg, mesh, sp, dense_mlp=MLP) if cfg.is_moe_layer(layer) else MLP(cfg, mesh, sp)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), ctx))
        h = self.mlp_norm(x)
        return x + self.dropout(self.mlp(h, ctx.aux_losses) if isinstance(self.mlp, MoE) else self.mlp(h))


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool = False):
        super().__init__()
        self.mesh, self.sp = mesh, sp
        self.tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, mesh, std=cfg.init_std,
                                             sequence_parallel=sp)
        self.positions = None
        if cfg.position == "learned":
            self.positions = make_param((cfg.max_seq_len, cfg.d_model), ("normal", cfg.init_std))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`positions`: of the tokens in `ids` under context parallelism, else 0..len-1."""
        h = self.tokens(ids)  # this rank's sequence shard under SP
        if self.positions is not None:
            positions = self.positions[: ids.shape[1]] if positions is None else self.positions[positions]
            # Under SP keep our chunk; the scatter's backward all-gathers, so every rank sees the full grad.
            h = h + (scatter_sequence(positions.unsqueeze(0), self.mesh.tp_group) if self.sp else positions)
        return self.dropout(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tied LM head: this rank's vocabulary slice of the logits, from the embedding table."""
        return F.linear(enter_tp_region(h, self.mesh, self.sp), self.tokens.weight)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, mesh: Mesh) -> torch.Tensor:
    """Mean next-token cross entropy from this rank's vocabulary slice of the logits (the pipeline's
    last stage, where the logits arrive made; the single-stage head fuses them with the loss)."""
    start, _ = vocab_shard(vocab_size, mesh)
    return vocab_parallel_cross_entropy(logits, labels, start, mesh.tp_group).mean()


class Head(nn.Module):
    """Final norm, LM head (vocab-parallel) and loss. Tied: borrows the embedding's weight."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool = False):
        super().__init__()
        self.mesh, self.sp, self.vocab_size, self.chunk = mesh, sp, cfg.vocab_size, cfg.loss_chunk_tokens
        self.norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias, mesh, sp)
        self.proj = None if cfg.tie_embeddings else ColumnParallelLinear(
            cfg.d_model, cfg.vocab_size, mesh, std=cfg.init_std, sequence_parallel=sp)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                tied: Embedding | None = None) -> torch.Tensor:
        """Mean loss over all tokens when labels are given, else full-vocabulary logits."""
        h = self.norm(h)
        if labels is None:
            logits = self.proj(h) if self.proj is not None else tied.logits(h)
            return gather_last_dim(logits, self.mesh.tp_group)
        weight = self.proj.weight if self.proj is not None else tied.tokens.weight
        start, _ = vocab_shard(self.vocab_size, self.mesh)
        return chunked_head_cross_entropy(enter_tp_region(h, self.mesh, self.sp), weight, labels, start,
                                          self.mesh.tp_group, self.chunk)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh | None = None, sequence_parallel: bool = False,
                 checkpointing: str = "none"):
        super().__init__()
        mesh = mesh or Mesh.single()
        self.cfg, self.mesh, self.full_checkpoint = cfg, mesh, checkpointing == "full"
        self.embed = Embedding(cfg, mesh, sequence_parallel)
        self.blocks = nn.ModuleList(Block(cfg, mesh, sequence_parallel, checkpointing, layer)
                                    for layer in range(cfg.n_layers))
        self.head = Head(cfg, mesh, sequence_parallel)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = None
        if self.mesh.cp > 1:  # every CP rank gets the whole sample and keeps its two chunks
            positions = zigzag_positions(input_ids.shape[1], self.mesh.cp, self.mesh.cp_rank, input_ids.device)
            input_ids, labels = input_ids[:, positions], None if labels is None else labels[:, positions]
        ctx = Context(self.cfg, self.mesh.cp * input_ids.shape[1], input_ids.device, doc_ids, positions)
        h = self.embed(input_ids, positions)
        for block in self.blocks:
            if self.full_checkpoint and self.training:
                h = checkpoint(block, h, ctx, use_reentrant=False)
            else:
                h = block(h, ctx)
        out = self.head(h, labels, self.embed if self.cfg.tie_embeddings else None)
        if labels is not None and self.training and ctx.aux_losses:
            out = out + sum(ctx.aux_losses)
        # The loss over all tokens (equal counts per rank); logits stay this rank's chunks' (in `positions` order).
        return cp_mean_loss(out, self.mesh.cp_group) if self.mesh.cp > 1 and labels is not None else out

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                 seed: int = 0) -> torch.Tensor:
        """Sample a continuation. Every rank draws the same tokens (same seed, same logits)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = prompt
        for _ in range(new_tokens):
            window = ids[:, -self.cfg.max_seq_len:]
            logits = self(window)[:, -1].float().cpu() / temperature
            top = logits.topk(min(top_k, logits.shape[-1]))
            probs = torch.zeros_like(logits).scatter_(-1, top.indices, top.values.softmax(-1))
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen).to(ids.device)], dim=1)
        return ids
