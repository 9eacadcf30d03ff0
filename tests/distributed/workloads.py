"""Training workloads run on every rank by the distributed tests."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatrain.config import Config, Layout, ModelConfig, validate
from megatrain.model.init import full_shape, init_parameter
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh

TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64)


def synthetic_batches(steps: int, global_batch: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """[steps, global_batch, seq_len + 1] token ids, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, global_batch, seq_len + 1), generator=gen)


def make_config(model: dict | None = None, **sections) -> Config:
    cfg = Config(model=ModelConfig(**(model or TINY)))
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def engine_losses(rank: int, cfg: Config, steps: int) -> dict[str, list[float]]:
    """Train `steps` steps through DeepSpeed on synthetic data; global-batch loss and grad norm per step."""
    from megatrain.engine.build import build_engine, init_distributed
    from megatrain.engine.step import train_step

    layout = validate(cfg, int(os.environ["WORLD_SIZE"]))
    device = torch.device("cpu")
    init_distributed(device)
    mesh = Mesh.build(layout)
    engine = build_engine(cfg, mesh, device)
    data = synthetic_batches(steps, layout.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size)
    per_rank = layout.micro_batch_size * layout.grad_accum
    curve: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    for step in range(steps):
        mine = iter(data[step, mesh.dp_rank * per_rank:(mesh.dp_rank + 1) * per_rank].split(layout.micro_batch_size))

        def next_batch(mine=mine) -> dict:
            micro = next(mine)
            batch = {"input_ids": micro[:, :-1], "labels": micro[:, 1:]}
            if cfg.data.document_mask:  # as the loader makes them, with the ids below vocab/8 as EODs
                is_eod = (batch["input_ids"] < cfg.model.vocab_size // 8).int()
                batch["doc_ids"] = torch.cumsum(is_eod, dim=1, dtype=torch.int32) - is_eod
            return batch

        curve["loss"].append(float(train_step(engine, next_batch, layout.grad_accum, device, mesh.dp_group)[0]))
        curve["grad_norm"].append(float(engine.get_global_grad_norm()))
    return curve


def assert_same_curve(curve: dict[str, list[float]], reference: dict[str, list[float]], rel: float = 1e-5) -> None:
    """Losses and gradient norms (each element counted once, however it is sharded) agree step by step."""
    for key in ("loss", "grad_norm"):
        assert len(curve[key]) == len(reference[key])
        for step, (value, expected) in enumerate(zip(curve[key], reference[key])):
            assert abs(value - expected) <= rel * abs(expected), f"{key} at step {step}: {value} != {expected}"


def model_gradients(rank: int, model_kw: dict, tp: int, sp: bool, checkpointing: str = "none",
                    document_mask: bool = False) -> dict:
    """One forward/backward of the raw model (no DeepSpeed) with TP; full gradients and the loss.
    `document_mask`: the windows hold several documents each (seeded doc_ids), attended block-causally."""
    dist.init_process_group("gloo")
    mesh = Mesh.build(Layout(tp=tp, sequence_parallel=sp))
    cfg = ModelConfig(**model_kw)
    model = Transformer(cfg, mesh, sequence_parallel=sp, checkpointing=checkpointing)
    for name, p in model.named_parameters():
        init_parameter(p, name, seed=7, mesh=mesh)
    result = loss_and_full_gradients(model, mesh, document_mask)
    dist.destroy_process_group()
    return result


def loss_and_full_gradients(model: Transformer, mesh: Mesh, document_mask: bool = False) -> dict:
    """One forward/backward on a fixed batch; the loss and every parameter's whole gradient (averaged over
    CP, as DeepSpeed reduces it over DP x CP, and gathered over TP)."""
    batch = synthetic_batches(1, 4, 32, model.cfg.vocab_size)[0]
    gen = torch.Generator().manual_seed(1)
    doc_ids = torch.cumsum((torch.rand(4, 32, generator=gen) < 0.15).int(), dim=1).int() if document_mask else None
    loss = model(batch[:, :-1], batch[:, 1:], doc_ids=doc_ids)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if mesh.cp > 1:
            dist.all_reduce(g, group=mesh.cp_group)
            g /= mesh.cp
        if p.tp_dim is not None and mesh.tp > 1:
            parts = [torch.empty_like(g) for _ in range(mesh.tp)]
            dist.all_gather(parts, g.contiguous(), group=mesh.tp_group)
            g = torch.cat(parts, dim=p.tp_dim)
        assert list(g.shape) == full_shape(p, mesh)
        grads[name] = g
    return {"loss": loss.item(), "grads": grads}
