"""The model on one process: parameter counts, masking, checkpointing, sampling, schedule, config checks."""

from __future__ import annotations

import pytest
import torch

from megatrain.config import Config, ConfigError, ModelConfig, OptimConfig, validate
from megatrain.engine.schedule import lr_at
from megatrain.model.init import canonical_parameters, init_parameter
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh
from megatrain.scaling.flops import param_counts

LLAMA = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
GPT2 = dict(LLAMA, n_kv_heads=None, norm="layernorm", position="learned", activation="gelu", bias=True,
            tie_embeddings=True)


def build(checkpointing: str = "none", **kw) -> Transformer:
    model = Transformer(ModelConfig(**kw), checkpointing=checkpointing)
    for name, p in canonical_parameters(model):
        init_parameter(p, name, seed=3, mesh=Mesh.single())
    return model


@pytest.mark.parametrize("kw", [LLAMA, GPT2, dict(LLAMA, n_kv_heads=1)], ids=["llama-gqa", "gpt2", "mqa"])
def test_parameter_count_matches_the_flops_accounting(kw):
    model = build(**kw)
    counts = param_counts(ModelConfig(**kw))
    assert sum(p.numel() for p in model.parameters()) == counts.total


def test_init_is_deterministic_and_scaled_for_output_projections():
    a, b = build(**LLAMA), build(**LLAMA)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert a.blocks[0].attn.o.weight.std() < 0.7 * a.blocks[0].attn.q.weight.std()


def test_loss_matches_torch_cross_entropy_on_gathered_logits():
    model = build(**LLAMA)
    ids = torch.randint(0, 256, (2, 17))
    loss = model(ids[:, :-1], ids[:, 1:])
    reference = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, reference)


def test_document_mask_stops_attention_across_documents():
    model = build(**LLAMA)
    ids = torch.randint(0, 256, (1, 16))
    doc_ids = torch.tensor([[0] * 8 + [1] * 8])
    changed = ids.clone()
    changed[0, :8] = (changed[0, :8] + 1) % 256  # a different first document
    masked = model(ids, doc_ids=doc_ids)[0, 8:]
    torch.testing.assert_close(model(changed, doc_ids=doc_ids)[0, 8:], masked)
    assert not torch.allclose(model(changed)[0, 8:], model(ids)[0, 8:])  # without the mask it leaks


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_leaves_loss_and_gradients_unchanged(mode):
    ids = torch.randint(0, 256, (2, 17))
    grads = []
    for checkpointing in ("none", mode):
        model = build(checkpointing, **LLAMA)
        model(ids[:, :-1], ids[:, 1:]).backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def test_generate_is_reproducible_for_a_seed():
    model = build(**GPT2)
    prompt = torch.tensor([[1, 2, 3]])
    first = model.generate(prompt, 5, seed=11)
    assert first.shape == (1, 8) and torch.equal(first, model.generate(prompt, 5, seed=11))


def test_warmup_then_cosine_to_min_lr():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    assert lr_at(0, optim, 100) == pytest.approx(0.25)
    assert lr_at(3, optim, 100) == pytest.approx(1.0)
    assert lr_at(100, optim, 100) == pytest.approx(0.1)
    assert lr_at(52, optim, 100) == pytest.approx(0.55)


@pytest.mark.parametrize("change, message", [
    (dict(model=dict(n_kv_heads=3)), "model.n_heads=4 must be divisible by model.n_kv_heads=3"),
    (dict(parallel=dict(tp=2), model=dict(n_kv_heads=1)), "model.n_kv_heads=1 is not divisible by parallel.tp=2"),
    (dict(parallel=dict(tp=2), model=dict(vocab_size=255)), "model.vocab_size=255 is not divisible by parallel.tp=2"),
    (dict(parallel=dict(tp=2), model=dict(ffn_hidden=101)), "model.ffn_hidden=101 is not divisible by parallel.tp=2"),
    (dict(parallel=dict(pp=3)), "world size 4 is not divisible by parallel.tp x parallel.pp = 1 x 3"),
    (dict(parallel=dict(sequence_parallel=True)), "parallel.sequence_parallel=true needs parallel.tp > 1"),
    (dict(train=dict(seq_len=128)), "train.seq_len=128 exceeds model.max_seq_len=64"),
])
def test_invalid_layout_or_shape_fails_with_the_key_named(change, message):
    cfg = Config(model=ModelConfig(**LLAMA))
    cfg.train.seq_len = 32
    for section, values in change.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world_size=4)


def test_global_batch_derives_gradient_accumulation():
    cfg = Config(model=ModelConfig(**LLAMA))
    cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_size = 32, 2, 16
    layout = validate(cfg, world_size=4)
    assert (layout.dp, layout.grad_accum) == (4, 2)


def test_rope_tables_are_computed_once_per_shape():
    """Pipeline stages build a block context per block and micro-batch: the tables must be reused."""
    from megatrain.model.rope import rope_tables

    first = rope_tables(64, 16, 10000.0, torch.device("cpu"))
    assert rope_tables(64, 16, 10000.0, torch.device("cpu")) is first
    assert rope_tables(128, 16, 10000.0, torch.device("cpu"))[0].shape == (128, 16)


def test_a_block_compiles_as_one_graph_and_matches_eager():
    """train.compile compiles every Block: no graph break (fullgraph), the same output and gradients (fp32)."""
    from megatrain.model.transformer import Block, Context

    cfg = ModelConfig(**LLAMA)
    torch.manual_seed(0)
    block = Block(cfg, Mesh.single())
    for name, p in block.named_parameters():
        init_parameter(p, f"blocks.0.{name}", seed=3, mesh=Mesh.single())
    x = torch.randn(2, 16, cfg.d_model, requires_grad=True)
    ctx = Context(cfg, 16, x.device, None)
    compiled = torch.compile(block, fullgraph=True)
    results = []
    for fn in (block, compiled):
        y = fn(x, ctx)
        grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
        results.append((y, *grads))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
