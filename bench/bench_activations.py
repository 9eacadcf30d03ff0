"""Activation bytes autograd keeps per transformer block per token, in units of h (= s*b*h bytes).

    python bench/bench_activations.py [--models llama-7b,gpt2-small] [--seq 64] [--precision bf16]

Method: the model is built with n_layers 1 and 2 at the preset's width on the CPU, one forward runs
under `torch.autograd.graph.saved_tensors_hooks`, and the distinct storages saved for backward
(parameters excluded) are summed; the 2-block minus the 1-block total is one block. Per token it does
not depend on the sequence length (SDPA's CPU kernel, like flash attention, keeps no seq x seq
scores; the meta device would pick the math kernel, which does), so a short sequence keeps the run
cheap. Printed beside it: the planner's `layer_activation_bytes`. Run it with PYTHONPATH set to an
older checkout to measure that checkout's blocks.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from megatrain.config import ModelConfig

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], ids[:, 1:])
    del loss
    return sum(saved.values())


def block_bytes_per_token(cfg: ModelConfig, seq: int, precision: str) -> float:
    from megatrain.model.transformer import Transformer

    totals = []
    for layers in (1, 2):
        model = Transformer(replace(cfg, n_layers=layers, max_seq_len=max(seq, cfg.max_seq_len)))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        if precision == "bf16":
            model = model.bfloat16()
        totals.append(saved_bytes(model, torch.randint(0, cfg.vocab_size, (1, seq + 1))))
        del model
    return (totals[1] - totals[0]) / seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-7b,gpt2-small")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    try:
        from megatrain.plan import layer_activation_bytes
    except ImportError:
        layer_activation_bytes = None
    print(f"micro batch 1 x seq {args.seq}, {args.precision}, no TP, no checkpointing, CPU")
    print("| model | measured per block (s*b*h bytes) | planner (s*b*h bytes) |\n|---|---|---|")
    for name in args.models.split(","):
        cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")))
        if cfg.vocab_size is None:
            cfg = replace(cfg, vocab_size=50304)
        measured = block_bytes_per_token(cfg, args.seq, args.precision) / cfg.d_model
        planned = (layer_activation_bytes(cfg, 1, False, args.precision, "none") / cfg.d_model
                   if layer_activation_bytes else float("nan"))
        print(f"| {name} | {measured:.2f} | {planned:.2f} |")


if __name__ == "__main__":
    main()
