"""The host allocator a CPU run uses, read from the libraries the process has mapped."""

from __future__ import annotations

import subprocess
import sys

from megatrain import hardware

TCMALLOC = "7f2a1c000000-7f2a1c02a000 r--p 00000000 fe:01 1234 /usr/lib/libtcmalloc_minimal.so.4.5.10\n"
LIBC = "7f2a1d000000-7f2a1d028000 r--p 00000000 fe:01 4321 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


def test_a_preloaded_caching_allocator_is_named_and_glibc_is_the_default(tmp_path):
    (tmp_path / "tcmalloc").write_text(LIBC + TCMALLOC)
    (tmp_path / "jemalloc").write_text(LIBC + LIBC.replace("libc.so.6", "libjemalloc.so.2"))
    (tmp_path / "glibc").write_text(LIBC)
    assert hardware.host_allocator(str(tmp_path / "tcmalloc")) == "tcmalloc"
    assert hardware.host_allocator(str(tmp_path / "jemalloc")) == "jemalloc"
    assert hardware.host_allocator(str(tmp_path / "glibc")) == "glibc"
    assert hardware.host_allocator(str(tmp_path / "missing")) == "unknown"


def test_a_plain_python_process_is_on_glibc():
    # pyarrow links its own jemalloc statically, as a pool for Arrow buffers only: it must not count.
    code = "import pyarrow, torch; from megatrain.hardware import host_allocator; print(host_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "glibc"
