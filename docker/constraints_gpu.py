"""Pip inputs for the worker image (docker/Dockerfile), made at build time inside the image.

    python constraints_gpu.py constraints.txt pyproject.toml OUT_DIR

writes OUT_DIR/constraints-gpu.txt and OUT_DIR/requirements.txt.

constraints-gpu.txt: the repository's constraints.txt (the tested pins), less the torch stack
(torch, torchvision, torchaudio, triton, nvidia-*, cuda-*), plus `torch==` and `torchvision==` the
versions the CUDA base image already has. constraints.txt pins the stack of the development
machines (torch 2.14 with CUDA 13 wheels); in the image torch comes from the base, built for its
CUDA and the drivers it supports. Pinning the installed versions keeps pip from replacing them
(and from downloading gigabytes of other CUDA wheels); if a dependency ever needs another torch,
the build stops with a resolver error instead of swapping torch silently.

requirements.txt: the [project] dependencies of pyproject.toml, so that they install in their own
layer, before the package's source is copied (an edit to harness/ does not reinstall mlflow).

Standard library only: it runs on the base image's Python before anything is installed.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.+|cuda-.+)$")
FROM_BASE = ("torch", "torchvision")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return re.split(r"[\s<>=!~;\[@(]", line, maxsplit=1)[0]


def gpu_constraints(constraints: Path) -> list[str]:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        sys.exit("constraints_gpu.py: the base image has no torch; use a pytorch/pytorch:*-cuda* image")
    lines = [f"# made by docker/constraints_gpu.py from {constraints.name}: torch stack from the base image"]
    for raw in constraints.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not TORCH_STACK.match(normalize(requirement_name(line))):
            lines.append(line)
    lines.append(f"torch=={torch_version}")
    for dist in FROM_BASE[1:]:
        try:
            lines.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass  # pip then picks the torchvision release that requires exactly this torch
    return lines


def dependencies(pyproject: Path) -> list[str]:
    import tomllib  # Python >= 3.11, as in every pytorch/pytorch image this targets

    with pyproject.open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    constraints, pyproject, out = Path(argv[1]), Path(argv[2]), Path(argv[3])
    out.mkdir(parents=True, exist_ok=True)
    (out / "constraints-gpu.txt").write_text("\n".join(gpu_constraints(constraints)) + "\n")
    (out / "requirements.txt").write_text("\n".join(dependencies(pyproject)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
