"""Exact parameter counts and FLOPs per token of a configured megatrain model.

Counts are exact for megatrain's transformer at TP=1 (tensor parallelism shards, it adds nothing).

Parameter split (as Kaplan et al. 2020 do):
    embedding     = token embedding [V, d] + learned position embedding [S, d] (if any)
                    + the lm head [V, d] when it is not tied to the token embedding
    non_embedding = everything else: per-block norms, q/k/v/o, MLP (and their biases), final norm
Scaling fits use one of the two N (`fit.params`, default non_embedding), as Kaplan et al.
recommend; Chinchilla (Hoffmann et al. 2022) uses the total. Both are always reported.

FLOPs per token (Chinchilla appendix F; PaLM appendix B):
    forward  = 2 * N_matmul + 4 * L * T * d_attn
    training = 3 * forward = 6 * N_matmul + 12 * L * T * d_attn
where
    N_matmul = active non_embedding + V * d: every weight that multiplies an activation once per token,
               i.e. the non-embedding weights plus the output projection (tied or not). The token
               and position embeddings are lookups, not matmuls, so they cost no FLOPs.
    L = n_layers, T = seq_len (the trained context), d_attn = n_heads * head_dim.
    4 * L * T * d_attn counts Q @ K^T and softmax(.) @ V, each 2 * T * d_attn per token per layer,
    over the full T x T score matrix (no discount for the causal mask), as Chinchilla and PaLM do,
    so MFU is comparable with published figures. Softmax, norms and activations are not counted.
Backward costs twice the forward (gradients w.r.t. activations and weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatrain.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int
    non_embedding: int
    # What one token uses: a MoE block counts its router, shared experts and top_k of its routed experts
    # (equal to the totals for a dense model). FLOPs per token, and so MFU, follow the active count.
    active_non_embedding: int = 0
    active_total: int = 0


def _norm_params(m: ModelConfig) -> int:
    # LayerNorm carries a bias only when the model uses biases; RMSNorm never does.
    return m.d_model * (2 if m.norm == "layernorm" and m.bias else 1)


def _mlp_params(m: ModelConfig, f: int, bias: bool) -> int:
    n_mlp_in = 2 if m.activation == "swiglu" else 1  # swiglu: gate and up
    return n_mlp_in * f * m.d_model + m.d_model * f + ((n_mlp_in * f + m.d_model) if bias else 0)


def _block_params(m: ModelConfig, layer: int, active: bool) -> int:
    """One block's parameters; `active`: only those a token uses (its top_k routed experts of a MoE block)."""
    d, q_dim, kv_dim = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d
    if m.bias:
        attention += q_dim + 2 * kv_dim + d
    if not m.is_moe_layer(layer):
        return 2 * _norm_params(m) + attention + _mlp_params(m, m.ffn_dim, m.bias)
    moe = m.moe  # router + routed experts (no biases) + the shared experts' dense MLP
    routed = (moe.top_k if active else moe.experts) * _mlp_params(m, m.expert_ffn_dim, False)
    shared = _mlp_params(m, moe.shared_experts * m.expert_ffn_dim, m.bias) if moe.shared_experts else 0
    return 2 * _norm_params(m) + attention + moe.experts * d + routed + shared


def expert_params(m: ModelConfig) -> int:
    """Router and routed experts of one MoE block: what megatrain replicates over TP (model/moe.py)."""
    return m.moe.experts * (m.d_model + _mlp_params(m, m.expert_ffn_dim, False))


def param_counts(m: ModelConfig) -> ParamCounts:
    """Exact parameter counts of megatrain's model for `m` (see the module doc for the split)."""
    embedding = m.vocab_size * m.d_model
    if m.position == "learned":
        embedding += m.max_seq_len * m.d_model
    if not m.tie_embeddings:
        embedding += m.vocab_size * m.d_model
    non_embedding, active = (sum(_block_params(m, layer, a) for layer in range(m.n_layers)) + _norm_params(m)
                             for a in (False, True))
    return ParamCounts(total=embedding + non_embedding, embedding=embedding, non_embedding=non_embedding,
                       active_non_embedding=active, active_total=embedding + active)


def matmul_params(m: ModelConfig) -> int:
    """Weights used in one multiply-add per token: the active non-embedding ones plus the output projection."""
    return param_counts(m).active_non_embedding + m.vocab_size * m.d_model


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 * N_matmul + 4 * n_layers * seq_len * n_heads * head_dim."""
    return 2.0 * matmul_params(m) + 4.0 * m.n_layers * seq_len * m.n_heads * m.head_dim


def training_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 * N_matmul + 12 * n_layers * seq_len * d_attn."""
    return 3.0 * forward_flops_per_token(m, seq_len)
