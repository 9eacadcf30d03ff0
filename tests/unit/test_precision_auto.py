"""train.precision=auto: bf16 only where the hardware runs it natively."""

from __future__ import annotations

import torch

from megatrain import hardware
from megatrain.engine.build import resolve_precision


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    (tmp_path / "amx").write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    (tmp_path / "avx2").write_text("flags\t\t: fpu sse2 avx2 fma\n")
    assert hardware.cpu_has_native_bf16(str(tmp_path / "amx"))
    assert not hardware.cpu_has_native_bf16(str(tmp_path / "avx2"))
    assert not hardware.cpu_has_native_bf16(str(tmp_path / "missing"))


def test_auto_is_bf16_on_cuda_and_follows_the_cpu_flags_otherwise():
    assert resolve_precision(torch.device("cuda", 0)) == "bf16"
    assert resolve_precision(torch.device("cpu")) == ("bf16" if hardware.cpu_has_native_bf16() else "fp32")
