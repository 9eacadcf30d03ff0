"""`train.init_from` reads a Hugging Face directory by slices: each rank of a TP2 x PP2 layout reads its
stage's tensors and its TP slices of them, about a quarter of the bytes, and they equal the whole model's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from megatrain.config import Layout, ModelConfig
from megatrain.export.hf import HFWeights, hf_config, to_hf
from megatrain.model.init import canonical_parameters, init_parameter
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh
from megatrain.parallel.stages import stage_boundaries

LLAMA = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64)
GPT2 = replace(LLAMA, n_kv_heads=None, norm="layernorm", position="learned", activation="gelu", bias=True,
               tie_embeddings=True)
SEQ = 64


def _export(m: ModelConfig, directory) -> dict[str, torch.Tensor]:
    """A Hugging Face directory of a seeded model (as launcher.export writes it); returns its canonical weights."""
    mesh = Mesh.single()
    model = Transformer(m, mesh)
    for name, p in canonical_parameters(model):
        init_parameter(p, name, 7, mesh)
    weights = {name: p.detach().clone() for name, p in canonical_parameters(model)}
    directory.mkdir()
    save_file(to_hf(m, weights), str(directory / "model.safetensors"))
    hf_config(m).save_pretrained(directory)
    return weights


def _stage_names(m: ModelConfig, names, stage: int, pp: int) -> list[str]:
    bounds = stage_boundaries(m, pp, SEQ)
    blocks = tuple(f"blocks.{i}." for i in range(bounds[stage], bounds[stage + 1]))
    first, last = stage == 0, stage == pp - 1
    tied_copy = last and m.tie_embeddings  # the last stage keeps its own copy of a tied table
    return [n for n in names if n.startswith(blocks) or (first and n.startswith("embed."))
            or (last and n.startswith("head.")) or (tied_copy and n == "embed.tokens.weight")]


@pytest.mark.parametrize("m", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_each_rank_of_tp2_pp2_reads_its_share_and_gets_the_whole_models_slices(m, tmp_path):
    weights = _export(m, tmp_path / "hf")
    whole = HFWeights(tmp_path / "hf", m)
    assert all(torch.equal(whole.local(n), w) for n, w in weights.items())
    assert whole.shapes() == {n: list(w.shape) for n, w in weights.items()}
    read = []
    for tp_rank in range(2):
        tp_dims = {n: p.tp_dim for n, p in canonical_parameters(Transformer(m, Mesh(Layout(tp=2), rank=tp_rank)))}
        for stage in range(2):
            source = HFWeights(tmp_path / "hf", m)
            for name in _stage_names(m, weights, stage, 2):
                dim = tp_dims[name]
                expected = weights[name] if dim is None else weights[name].chunk(2, dim)[tp_rank]
                assert torch.equal(source.local(name, dim, 2, tp_rank), expected), (name, stage, tp_rank)
            read.append(source.bytes_read)
    total = whole.file_bytes()
    print(f"{m.norm}: bytes read per TP2 x PP2 rank {read} of {total:,}")
    # A quarter each, plus the replicated norms (and a tied table read by both stages).
    assert max(read) < 0.36 * total
