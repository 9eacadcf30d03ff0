"""Dense peak FLOP/s of accelerators, from the vendors' datasheets: the one table MFU and the planner use.

Figures are dense (the datasheets' bf16 numbers "with sparsity" halved), per GPU:
    H100 / H200 SXM: nvidia.com/en-us/data-center/h100 and /h200 (bf16 1,979 sparse = 989 dense, fp32 67 TFLOP/s)
    H100 / H200 NVL: same pages (bf16 1,671 sparse, fp32 60); H100 PCIe: H100 datasheet 2022 (1,513, 51)
    A100 (40 and 80 GB, SXM and PCIe): A100 datasheet (bf16 312 dense, fp32 19.5)
    B200 (HGX B200): nvidia.com/en-us/data-center/hgx (bf16 4.5 PFLOP/s sparse); its fp32 is not listed here
    L40S: L40S datasheet (bf16 362.05 dense, fp32 91.6); A10: A10 datasheet (bf16 125 dense, fp32 31.2)
A device or precision without a figure has no peak (None): MFU is then omitted, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Accelerator:
    name: str  # the key `plan.gpu` takes
    pattern: str  # regex matched against torch.cuda.get_device_name()
    bf16: float  # dense FLOP/s
    fp32: float | None


# Most specific first: "H100 NVL" must win over "H100", "A100" over "A10".
ACCELERATORS = (
    Accelerator("H200-NVL", r"H200 NVL", 835.5e12, 60e12),
    Accelerator("H200", r"H200", 989e12, 67e12),
    Accelerator("H100-NVL", r"H100 NVL", 835.5e12, 60e12),
    Accelerator("H100-PCIe", r"H100 PCIe", 756.5e12, 51e12),
    Accelerator("H100", r"H100", 989e12, 67e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    Accelerator("A100-80GB", r"A100.*80GB", 312e12, 19.5e12),
    Accelerator("A100-40GB", r"A100", 312e12, 19.5e12),
    Accelerator("B200", r"B200", 2250e12, None),
    Accelerator("L40S", r"L40S", 362.05e12, 91.6e12),
    Accelerator("A10", r"A10\b", 125e12, 31.2e12),
)
ALIASES = {"A100": "A100-40GB"}  # same peak; plan.gpu=A100 keeps working


def by_name(name: str) -> Accelerator | None:
    """The table entry for a `plan.gpu` key (case-insensitive), or None."""
    name = ALIASES.get(name, name)
    return next((a for a in ACCELERATORS if a.name.lower() == name.lower()), None)


def by_device_name(device_name: str) -> Accelerator | None:
    """The table entry for what torch.cuda.get_device_name() reports, or None for an unknown device."""
    return next((a for a in ACCELERATORS if re.search(a.pattern, device_name)), None)


def peak_flops(accelerator: Accelerator, precision: str) -> float | None:
    """Dense peak FLOP/s at `precision` (bf16 | fp32), None where the datasheet figure is not in the table."""
    return accelerator.bf16 if precision == "bf16" else accelerator.fp32


def names() -> list[str]:
    return [a.name for a in ACCELERATORS]


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Without them bf16 matmuls are emulated:
    on an AVX2-only AMD EPYC of this project's CI pool, 0.0008 TFLOP/s against 0.09 in fp32 (2 threads)."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


# Host allocators that keep freed memory for reuse, by the shared library a process has mapped.
CACHING_ALLOCATORS = {"tcmalloc": "libtcmalloc", "jemalloc": "libjemalloc"}


def host_allocator(maps: str = "/proc/self/maps") -> str:
    """tcmalloc | jemalloc when one is loaded (LD_PRELOAD), else glibc (Linux) or unknown (no /proc).

    Why it matters on a CPU run: with the 128 KiB mmap threshold a CPU run holds (engine/build.py), glibc's malloc
    hands large freed tensors back to the OS and takes them again as page faults, every step (docs/benchmarks.md,
    "The host allocator")."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "unknown"
    return next((name for name, lib in CACHING_ALLOCATORS.items() if lib in text), "glibc")
