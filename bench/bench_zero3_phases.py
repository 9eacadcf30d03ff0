"""Where ZeRO-3's memory per rank grows from step 2: per phase, RSS, the phase's own RSS peak, the bytes of
live CPU tensors, the fp32 bytes of gathered parameters, and what glibc holds freed in its arenas (MiB).

    python bench/bench_zero3_phases.py

The llama-0.7b preset's width (d 2048, ffn 8192, 32k tied vocabulary) cut to 2 blocks, 0.19B parameters
(714 MiB in fp32), fp32, ZeRO-3, full activation checkpointing, micro batch 1, seq 128, reduce bucket 5e7,
2 gloo ranks, 3 steps (about 2.5 min per variant, ~3.7 GB per rank): with DeepSpeed's defaults and with
stage3_prefetch_bucket_size, stage3_max_reuse_distance and stage3_max_live_parameters at 0 (nothing kept
gathered once a module is done). The peak of a phase is VmHWM after /proc/self/clear_refs reset it.
"""

from __future__ import annotations

import ctypes
import gc

import torch

from megatrain.scaling.flops import param_counts
from tests.distributed.harness import run_ranks
from tests.distributed.workloads import make_config, synthetic_batches

MODEL = dict(vocab_size=32000, d_model=2048, n_layers=2, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
             max_seq_len=128, tie_embeddings=True)
VARIANTS = {"defaults": {},
            "nothing kept live": dict(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0,
                                      stage3_max_live_parameters=0)}
MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _rss_and_peak_mib() -> tuple[int, int]:
    """VmRSS and VmHWM, then reset VmHWM to the current RSS so the next phase's peak is its own."""
    with open("/proc/self/status") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return kb["VmRSS"] // 1024, kb["VmHWM"] // 1024


def _live_tensor_mib() -> int:
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values()) // MIB


def phases(rank: int, cfg, steps: int, zero_overrides: dict) -> list[str]:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    import megatrain.engine.build as build
    from megatrain.config import validate
    from megatrain.parallel.mesh import Mesh

    ds_config = build.deepspeed_config

    def with_overrides(*args):
        config = ds_config(*args)
        config["zero_optimization"].update(zero_overrides)
        return config

    build.deepspeed_config = with_overrides
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    layout = validate(cfg, 2)
    build.init_distributed(torch.device("cpu"))
    mesh = Mesh.build(layout)
    data = synthetic_batches(steps, layout.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size)
    log = [f"start  RSS {_rss_and_peak_mib()[0]:5} (before the engine)"]
    engine = build.build_engine(cfg, mesh, torch.device("cpu"))
    params = list(engine.module.parameters())
    gathered_peak = [0]

    def gathered(*_) -> None:  # at every module's forward: fp32 bytes of the parameters gathered now
        now = sum(4 * p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE)
        gathered_peak[0] = max(gathered_peak[0], now)

    torch.nn.modules.module.register_module_forward_hook(gathered)

    def record(phase: str) -> None:
        live = _live_tensor_mib()
        rss, peak = _rss_and_peak_mib()
        log.append(f"{phase:6} RSS {rss:5} peak {peak:5} tensors {live:5} gathered {gathered_peak[0] // MIB:4} "
                   f"malloc-free {libc.mallinfo2().fordblks // MIB}")
        gathered_peak[0] = 0

    record("built")
    per = layout.micro_batch_size
    for step in range(1, steps + 1):
        batch = data[step - 1, mesh.dp_rank * per:(mesh.dp_rank + 1) * per]
        loss = engine(batch[:, :-1], batch[:, 1:])
        record(f"fwd{step}")
        engine.backward(loss)
        record(f"bwd{step}")
        engine.step()
        record(f"step{step}")
    return log


def main() -> None:
    cfg = make_config(MODEL, parallel=dict(zero_stage=3, reduce_bucket_size=50_000_000),
                      train=dict(precision="fp32", micro_batch_size=1, global_batch_size=2, seq_len=128,
                                 activation_checkpointing="full"))
    total = param_counts(cfg.model).total
    print(f"{total:,} parameters, {total * 4 / MIB:.0f} MiB in fp32; rank 0 per phase, MiB "
          "(peak: the phase's own RSS high-water mark)")
    for name, overrides in VARIANTS.items():
        print(f"{name}:\n  " + "\n  ".join(run_ranks(2, phases, cfg, 3, overrides, start_method="spawn")[0]))


if __name__ == "__main__":
    main()
