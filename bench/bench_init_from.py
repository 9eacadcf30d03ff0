"""Per-rank peak memory of `train.init_from` for a TP2 x PP2 layout against the whole model's.

Writes a Hugging Face LLaMA directory (fp32 safetensors, about 1 GB), then, in a fresh process per rank, reads
what that rank of a TP2 x PP2 run reads (its pipeline stage's tensors, its TP slice of each: the same
`HFWeights.local` calls `Checkpointer.init_from` makes) and copies it into its own memory, as the rank keeps its
shard. Each process
prints the growth of its peak RSS (file-backed pages of the memory-mapped safetensors count) from just before
the read. A last process reads the whole model the same way, as every rank did before reads were sliced.

    python bench/bench_init_from.py [--work /tmp/bench_init_from]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
from pathlib import Path

import torch

from megatrain.config import ModelConfig

MODEL = ModelConfig(vocab_size=32000, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=8, max_seq_len=2048)
TP, PP, SEQ = 2, 2, 2048



def write_hf(directory: Path) -> int:
    """A randomly initialised model of MODEL's shape as a Hugging Face directory; returns its parameter count."""
    from safetensors.torch import save_file

    from megatrain.export.hf import hf_config, to_hf
    from megatrain.model.init import canonical_parameters
    from megatrain.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(MODEL)
    weights = {}
    for name, p in canonical_parameters(model):
        weights[name] = torch.randn(p.shape) * 0.02 if p.dim() > 1 else torch.ones(p.shape)
    directory.mkdir(parents=True)
    hf_config(MODEL).save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in to_hf(MODEL, weights).items()}, str(directory / "model.safetensors"))
    return sum(w.numel() for w in weights.values())


def read_as_rank(directory: str, stage: int, tp_rank: int, tp: int, pp: int, out: mp.Queue) -> None:
    from megatrain.export.hf import HFWeights
    from megatrain.model.init import canonical_parameters
    from megatrain.model.transformer import Transformer
    from megatrain.observe.meters import process_memory
    from megatrain.parallel.stages import stage_boundaries

    with torch.device("meta"):  # names and TP dims only; the model's own weights are not what is measured
        params = dict(canonical_parameters(Transformer(MODEL)))
    bounds = stage_boundaries(MODEL, pp, SEQ)
    blocks = tuple(f"blocks.{i}." for i in range(bounds[stage], bounds[stage + 1]))
    mine = [n for n in params if n.startswith(blocks) or (stage == 0 and n.startswith("embed."))
            or (stage == pp - 1 and n.startswith("head."))]
    weights = HFWeights(Path(directory), MODEL)
    before = process_memory()["rss"]
    # a copy of each slice in the rank's own memory, as init_from copies it into the parameter (safetensors
    # hands back a view of the mapped file, resident only once touched)
    held = [weights.local(name, params[name].tp_dim, tp, tp_rank).clone() for name in mine]
    peak = process_memory()["peak_rss"]  # VmHWM: ru_maxrss starts at the RSS the parent had when it forked
    out.put((stage, tp_rank, sum(t.numel() * t.element_size() for t in held), weights.bytes_read, peak - before))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/bench_init_from")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    count = write_hf(work / "hf")
    size = (work / "hf" / "model.safetensors").stat().st_size
    print(f"model: {count:,} parameters, {size / 1e9:.2f} GB of fp32 safetensors")
    ctx = mp.get_context("spawn")
    results = []
    for stage, tp_rank, tp, pp in [(s, r, TP, PP) for s in range(PP) for r in range(TP)] + [(0, 0, 1, 1)]:
        out = ctx.Queue()
        proc = ctx.Process(target=read_as_rank, args=(str(work / "hf"), stage, tp_rank, tp, pp, out))
        proc.start()
        results.append((tp, pp, *out.get()))
        proc.join()
    print("\n| layout | stage | TP rank | kept (GB) | read (GB) | peak RSS growth (GB) | growth / model file |")
    print("|---|---|---|---|---|---|---|")
    for tp, pp, stage, tp_rank, kept, read, growth in results:
        layout = f"TP{tp} x PP{pp}" if tp * pp > 1 else "whole model"
        print(f"| {layout} | {stage} | {tp_rank} | {kept / 1e9:.3f} | {read / 1e9:.3f} | {growth / 1e9:.3f} | "
              f"{growth / size:.0%} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
