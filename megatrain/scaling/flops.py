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
    N_matmul = non_embedding + V * d: every weight that multiplies an activation once per token,
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


def _norm_params(m: ModelConfig) -> int:
    # LayerNorm carries a bias only when the model uses biases; RMSNorm never does.
    return m.d_model * (2 if m.norm == "layernorm" and m.bias else 1)


def _block_params(m: ModelConfig) -> int:
    d, q_dim, kv_dim, f = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn_dim
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d
    if m.bias:
        attention += q_dim + 2 * kv_dim + d
    n_mlp_in = 2 if m.activation == "swiglu" else 1  # swiglu: gate and up
    mlp = n_mlp_in * f * d + d * f
    if m.bias:
        mlp += n_mlp_in * f + d
    return 2 * _norm_params(m) + attention + mlp


def param_counts(m: ModelConfig) -> ParamCounts:
    """Exact parameter counts of megatrain's model for `m` (see the module doc for the split)."""
    embedding = m.vocab_size * m.d_model
    if m.position == "learned":
        embedding += m.max_seq_len * m.d_model
    if not m.tie_embeddings:
        embedding += m.vocab_size * m.d_model
    non_embedding = m.n_layers * _block_params(m) + _norm_params(m)
    return ParamCounts(total=embedding + non_embedding, embedding=embedding, non_embedding=non_embedding)


def matmul_params(m: ModelConfig) -> int:
    """Weights used in one multiply-add per token: non-embedding plus the output projection."""
    return param_counts(m).non_embedding + m.vocab_size * m.d_model


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 * N_matmul + 4 * n_layers * seq_len * n_heads * head_dim."""
    return 2.0 * matmul_params(m) + 4.0 * m.n_layers * seq_len * m.n_heads * m.head_dim


def training_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 * N_matmul + 12 * n_layers * seq_len * d_attn."""
    return 3.0 * forward_flops_per_token(m, seq_len)
