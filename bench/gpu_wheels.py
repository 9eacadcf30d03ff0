"""Fetch the wheels bench/gpu_check.sh installs on a GPU machine that has only PyTorch (run where pip works).

The set: deepspeed, hydra-core, omegaconf, wandb, datasets and everything they require, at the versions
installed here (the tested ones), minus what the GPU image already holds (bench/gpu_image_packages.txt).
Binary wheels are fetched for CPython 3.12 on manylinux x86-64; a package published only as an sdist is
built here into a wheel (pure Python ones only).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix"}
ROOTS = ("deepspeed", "hydra-core", "omegaconf", "wandb", "datasets")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...], present: set[str]) -> dict[str, str]:
    """{name: installed version} of `roots` and their requirements (no extras), minus `present`."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in found or name in present:
            continue
        dist = metadata.distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            # markers as on the GPU machine: CPython 3.12 on Linux, no extras
            if req.marker is None or req.marker.evaluate({**TARGET, "extra": ""}):
                todo.append(req.name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("packages", nargs="*", help="NAME==VERSION to fetch instead of the computed set")
    args = parser.parse_args()
    image = Path(__file__).with_name("gpu_image_packages.txt").read_text().splitlines()
    present = {_norm(line) for line in image if line and not line.startswith("#")}
    wanted = args.packages or [f"{n}=={v}" for n, v in sorted(closure(ROOTS, present).items())]
    args.dest.mkdir(parents=True, exist_ok=True)
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    for spec in wanted:
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(args.dest), spec]
        if subprocess.run(download, capture_output=True).returncode != 0:  # an sdist only: build the wheel here
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(args.dest), spec],
                           check=True)
        print(spec, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
