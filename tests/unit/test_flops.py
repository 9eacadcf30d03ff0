"""Parameter counts and FLOPs per token against published model sizes and hand counts."""

from __future__ import annotations

from megatrain.config import ModelConfig
from megatrain.scaling.flops import (
    forward_flops_per_token,
    matmul_params,
    param_counts,
    training_flops_per_token,
)


def test_gpt2_small_matches_published_124m_parameters() -> None:
    # Hugging Face GPT-2 (vocab 50257, tied head, learned positions, LayerNorm with biases).
    m = ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024,
                    norm="layernorm", position="learned", activation="gelu", bias=True,
                    tie_embeddings=True)
    counts = param_counts(m)
    assert counts.total == 124_439_808
    assert counts.embedding == 50257 * 768 + 1024 * 768
    assert counts.non_embedding == counts.total - counts.embedding


def test_llama2_7b_matches_published_parameter_count() -> None:
    m = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, ffn_hidden=11008,
                    max_seq_len=4096)
    counts = param_counts(m)
    assert counts.total == 6_738_415_616
    assert counts.embedding == 2 * 32000 * 4096  # untied head counts as embedding


def test_gqa_tiny_model_hand_count() -> None:
    m = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    d, kv, f = 64, 2 * 16, m.ffn_dim
    block = 2 * d + (d * d + 2 * d * kv + d * d) + 3 * d * f
    assert param_counts(m).non_embedding == 2 * block + d
    assert param_counts(m).embedding == 2 * 512 * d


def test_biases_and_layernorm_bias_are_counted_only_with_model_bias() -> None:
    base = dict(vocab_size=100, d_model=32, n_layers=1, n_heads=4, norm="layernorm", activation="gelu")
    without = param_counts(ModelConfig(**base, bias=False)).non_embedding
    with_bias = param_counts(ModelConfig(**base, bias=True)).non_embedding
    # q, k, v, o biases + up (4d) and down biases + 3 LayerNorm biases
    assert with_bias - without == 4 * 32 + 4 * 32 + 32 + 3 * 32


def test_training_flops_are_6n_plus_attention_term() -> None:
    m = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    n = param_counts(m).non_embedding + 512 * 64
    assert matmul_params(m) == n
    assert forward_flops_per_token(m, 128) == 2 * n + 4 * 2 * 128 * 64
    assert training_flops_per_token(m, 128) == 6 * n + 12 * 2 * 128 * 64


def test_attention_term_grows_linearly_with_sequence_length() -> None:
    m = ModelConfig(d_model=128, n_layers=3, n_heads=4)
    delta = training_flops_per_token(m, 2048) - training_flops_per_token(m, 1024)
    assert delta == 12 * 3 * 1024 * 128
