"""What each of issue 15's changes buys on an H100 / H200, on paper: bytes and the arithmetic, no GPU.

Every input is a datasheet figure (SPECS, cited) or a byte count this repository measured on the CPU (the
constants below name the docs/benchmarks.md section they come from) or derives exactly from the shapes. The
reference for each time is the micro-batch's compute at the datasheet's dense bf16 peak, the fastest a step can
be, so "share" is an upper bound: at 50% MFU the same saving is half that share. Kernel efficiency, launch
latency and L2 reuse are not modelled; a GPU run (bench/gpu_check.sh) is what would measure them.

    python -m bench.on_paper
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from hydra import compose, initialize_config_dir

from megatrain.config import Config, register_configs, to_config
from megatrain.plan import layer_activation_bytes, plan
from megatrain.scaling.flops import training_flops_per_token

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
GB = 1e9
# nvidia.com/en-us/data-center/h100 and /h200 (SXM): dense bf16 989 TFLOP/s (1,979 with sparsity), HBM3 80 GB at
# 3.35 TB/s, HBM3e 141 GB at 4.8 TB/s; NVLink 900 GB/s per GPU, both directions together.
SPECS = {"H100": {"bf16": 989e12, "hbm_bytes_s": 3.35e12, "memory": 80 * GB},
         "H200": {"bf16": 989e12, "hbm_bytes_s": 4.8e12, "memory": 141 * GB}}
NVLINK_ONE_WAY = 450 * GB
# docs/benchmarks.md, "Activations per block": llama-7b, bf16, bytes autograd kept per block per token in
# s*b*h units before lean norms and RoPE (the planner computes the after figure, pinned to the measurement).
ACTIVATIONS_BEFORE = 49.66
# docs/benchmarks.md, "LM head + loss memory": vocab 128,256, 4,096 tokens, d 2,048 (llama-1b's shape), bf16.
LOSS_PEAK_MIB = {"before": 7014, "fused, chunk 1,024": 1269}
LOSS_FP32_COPIES = 3  # before: the loss kept float, shifted and exp copies of the fp32 logits for backward
# docs/benchmarks.md, "Loader": ms rank 0 waited for its batch per ~20 ms step with the host idle, DP 64.
LOADER_WAIT_MS = {"in the step": 2.99, "ahead (data.prefetch=2)": 0.26}


def preset(name: str, *overrides: str) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return to_config(compose("config", overrides=[f"model={name}", "train.precision=bf16", *overrides]))


def step_at_peak(cfg: Config, tokens: int, gpu: str) -> float:
    return training_flops_per_token(cfg.model, cfg.train.seq_len) * tokens / SPECS[gpu]["bf16"]


def rows(model: str, seq: int, tp: int) -> list[tuple[str, str, float, float | None, float, bool]]:
    """(change, what it removes, bytes moved per micro-batch per GPU, bytes of memory freed, FLOPs the saving is
    compared with, whether the bytes cross NVLink rather than HBM)."""
    cfg = preset(model, f"train.seq_len={seq}")
    m, tokens, two = cfg.model, seq, 2  # one micro-batch of one sequence; bf16 activations
    th = tokens * m.d_model * two  # one [tokens, h] bf16 activation
    flops = training_flops_per_token(m, seq) * tokens
    out = []
    # 1. Fused projections. Unfused, x is read by q, k, v (and gate, up) separately in forward and by their
    # grad-weight GEMMs in backward, and the grad-inputs are summed by separate adds (2 for qkv, 1 for gate/up:
    # each reads two [tokens, h] tensors and writes one).
    reads, adds = (2 + 1) * th * 2, (2 + 1) * 3 * th
    out.append(("fused qkv and gate/up", "x re-read 3x forward + 3x backward, 3 grad-input adds; per block "
                "GEMMs fwd 5->2, bwd 10->4", (reads + adds) * m.n_layers, None, flops, False))
    # 3. Lean norms and RoPE: activation bytes kept per block, before (measured) and after (the planner).
    after = layer_activation_bytes(m, 1, False, "bf16", "none") / m.d_model  # per token, in h units
    freed = (ACTIVATIONS_BEFORE - after) * tokens * m.d_model * m.n_layers
    out.append((f"lean norms and RoPE ({ACTIVATIONS_BEFORE} -> {after:.2f} s*b*h per block)",
                "saved tensors not written in forward nor read in backward (no checkpointing)", 2 * freed, freed,
                flops, False))
    # 4. SP at TP `tp`: the column-parallel linears (qkv, gate/up) keep their input shard, not the gathered copy;
    # backward re-gathers it over NVLink behind the grad-input GEMM. Compared with a TP rank's compute.
    kept = 2 * th * (1 - 1 / tp) * m.n_layers
    out.append((f"SP linear saves its shard (TP{tp})", "memory; costs a re-gather in backward over NVLink, "
                "behind the grad-input GEMM (time shown is that cost)", kept, kept, flops / tp, True))
    # 2. The chunked fused loss, at the shape it was measured (llama-1b's): 3 fp32 copies of the logits, each
    # written in forward and read in backward, are gone.
    loss = preset("llama-1b", "train.seq_len=4096").model
    copies = 2 * LOSS_FP32_COPIES * 4096 * loss.vocab_size * 4
    freed = (LOSS_PEAK_MIB["before"] - LOSS_PEAK_MIB["fused, chunk 1,024"]) * 2**20
    out.append((f"chunked fused loss (llama-1b, vocab {loss.vocab_size:,}, 4,096 tokens)", "3 fp32 logits copies",
                copies, freed, training_flops_per_token(loss, 4096) * 4096, False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--tp", type=int, default=8)
    args = parser.parse_args()
    cfg = preset(args.model, f"train.seq_len={args.seq}")
    flops = training_flops_per_token(cfg.model, args.seq) * args.seq
    print(f"{args.model}, seq {args.seq}, micro-batch 1, bf16: {flops / 1e12:.0f} TFLOP a micro-batch, "
          f"{flops / SPECS['H100']['bf16'] * 1e3:.0f} ms at the dense bf16 peak (H100 and H200 alike)")
    print("| change | removes | GB moved | H100 ms (share) | H200 ms (share) | memory freed, GB (of H100 / H200) |")
    print("|---|---|---|---|---|---|")
    for change, what, moved, freed, against, link in rows(args.model, args.seq, args.tp):
        cells = []
        for spec in SPECS.values():
            seconds = moved / (NVLINK_ONE_WAY if link else spec["hbm_bytes_s"])
            cells.append(f"{seconds * 1e3:.2f} ({seconds / (against / spec['bf16']):.1%})")
        memory = "" if freed is None else f"{freed / GB:.2f} (" + " / ".join(
            f"{freed / spec['memory']:.1%}" for spec in SPECS.values()) + ")"
        print(f"| {change} | {what} | {moved / GB:.2f} | {cells[0]} | {cells[1]} | {memory} |")
    # 5. Overlap, in the planner's step-time model: 8 GPUs of one node, DP8, 4 micro-batches a step.
    print("\nData-parallel overlap, the planner's step-time model (8 x H100, DP8, micro 1 x accum 4, compute at "
          "plan.mfu, NVLink at plan.intra_node_gbps):")
    base = preset(args.model, f"train.seq_len={args.seq}", "plan.gpu=H100", "train.micro_batch_size=1",
                  "train.global_batch_size=32")
    for label, zero, grads, gather in (
            ("ZeRO-1, fp32 grads (BF16_Optimizer: reduces after backward)", 1, "fp32", "block"),
            ("ZeRO-1, bf16 grads (overlap_comm at the last micro-batch)", 1, "bf16", "block"),
            ("ZeRO-2, fp32 grads (overlap_comm: bucket by bucket in backward)", 2, "fp32", "block"),
            ("ZeRO-3, fp32 grads, a block gathered at a time (forward and backward)", 3, "fp32", "block"),
            ("ZeRO-3, fp32 grads, parallel.zero3_gather=model (one gather per micro-batch)", 3, "fp32", "model")):
        p = plan(replace(base, parallel=replace(base.parallel, zero_stage=zero, zero3_gather=gather),
                         train=replace(base.train, grad_reduce_dtype=grads)), 8)
        print(f"- {label}: step {p.step_time_s:.3f} s, MFU {p.mfu:.1%}, peak {p.memory.total / GB:.1f} GB a GPU")
    wait, ids = LOADER_WAIT_MS, 2 * args.seq * 8  # int64 inputs and labels of one sequence
    print(f"\nLoader ahead (measured with the host idle, as under a GPU step, DP 64): the step waited "
          f"{wait['in the step']} ms for its batch, {wait['ahead (data.prefetch=2)']} ms with it built ahead; "
          f"the H2D copy of {ids / 1e3:.0f} KB of token ids is {ids / 64e9 * 1e6:.1f} us at PCIe Gen5 x16's "
          "64 GB/s each way (H100 datasheet: 128 GB/s both ways).")


if __name__ == "__main__":
    main()
