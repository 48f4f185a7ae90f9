"""The memory plan: before a dataset is decoded, where its decoded images will live.

The decoded images of a split need n_images x channels x side x side bytes (uint8). They live
- on the `device` (all of them in the training device's memory: on a GPU, airbench's fast path;
  on the CPU, in RAM), or
- on the `host`: in the decoded-data cache file (a memory-mapped .npy in WORKSPACE/cache/, read
  through the page cache), each batch's rows read into a small buffer and copied to the device,
  the next batch read while the current one trains.
`data.residency: auto` (the default) takes `device` when the images fit in half of the free
memory there (the rest is headroom for the model, its activations and the optimizer), else
`host`. A choice that cannot fit is one line with the bytes needed and available, raised before
anything is decoded or written; `host` needs the cache file's room on disk when it is not there yet.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError

HEADROOM = 0.5   # auto: the images may take at most this share of the free memory on the device


@dataclass(frozen=True)
class MemoryPlan:
    residency: str                 # "device" or "host": where the decoded images live
    requested: str                 # data.residency: auto | device | host
    bytes_needed: int              # the decoded images, all splits
    bytes_free: int                # free memory where `device` would put them (RAM on the CPU)
    bytes_free_disk: int | None    # free disk for the cache file, when it is still to be written

    def params(self) -> dict[str, str | int]:
        """What a run logs (MLflow params) so the choice and its numbers can be read back."""
        out: dict[str, str | int] = {"data.residency_used": self.residency, "data.bytes_needed": self.bytes_needed,
                                     "data.bytes_free": self.bytes_free}
        if self.bytes_free_disk is not None:
            out["data.bytes_free_disk"] = self.bytes_free_disk
        return out


def free_ram() -> int:
    """Bytes of RAM the kernel can give without swapping (MemAvailable), or free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device(device: torch.device) -> int:
    """Free bytes where `device` residency puts the images: the GPU's free memory, or RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return free_ram()


def free_disk(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def plan_memory(requested: str, bytes_needed: int, device: torch.device, cache_dir: Path,
                cached: bool, what: str) -> MemoryPlan:
    """Where the decoded images of `what` (e.g. "50,000 images at 224 px") live; a choice that
    cannot fit raises a one-line HarnessError naming data.residency and the bytes."""
    if requested not in ("auto", "device", "host"):
        raise HarnessError(f"data.residency: must be auto, device or host, got {requested!r}")
    where = "RAM" if device.type == "cpu" else str(device)
    free = free_device(device)
    disk = None if cached else free_disk(cache_dir)
    if requested == "device" and bytes_needed > free:
        raise HarnessError(f"data.residency: device needs {gb(bytes_needed)} for {what}, "
                           f"{gb(free)} free in {where} (use host, or a smaller image_size)")
    if disk is not None and bytes_needed > disk:
        raise HarnessError(f"data.residency: the decoded cache of {what} needs {gb(bytes_needed)} of disk in "
                           f"{cache_dir}, {gb(disk)} free")
    if requested == "auto":
        residency = "device" if bytes_needed <= HEADROOM * free else "host"
    else:
        residency = requested
    return MemoryPlan(residency, requested, bytes_needed, free, disk)


def plan_for(cfg: Any, workspace: Path, device: torch.device) -> MemoryPlan:
    """The plan for a recipe's data (cfg: a validated DataConfig) on `device`: its input found
    and counted, nothing decoded. Bytes are the upper bound the source states (3 channels
    unless the source is known to be grey), every split of the input together."""
    from harness.engine.data.cache import cache_base, is_cached
    from harness.engine.data.sources import open_source

    source = open_source(cfg, workspace)
    side = source.stored_size or cfg.image_size
    needed = source.n_images * source.channels * side * side
    what = f"{source.n_images:,} images at {side} px"
    return plan_memory(cfg.residency, needed, device, cache_base(source, workspace).parent,
                       is_cached(source, workspace), what)
