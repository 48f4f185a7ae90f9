"""Decoding image files to uint8 [C, S, S] at one size S, in parallel over the machine's cores.

One image: shorter side to S (bilinear, antialiased, on uint8), then the centre S x S crop --
the geometry of resize.py's `resize`. C = 1 for a grayscale file, else 3 (a dataset stays
1-channel only if every image is grayscale: `widen`). The decoder is chosen per file, on
measurement (bench/RESULTS.md, "Decoding image folders"; images/s in one process):
- a JPEG at least twice S on both sides: PIL with `draft()`, which has libjpeg decode at
  1/2, 1/4 or 1/8 scale (1600x1200 JPEGs to 224 px: 1.9-2.2x a full PIL decode);
- any other RGB or grey JPEG: torchvision.io.decode_jpeg (500x375 to 224 px: 1.3-1.9x PIL;
  PIL where torchvision no longer has it: it is deprecated since torchvision 0.29);
- everything else (PNG, GIF, CMYK JPEG, ...): PIL, converted to L or RGB as before;
then torch's antialiased bilinear interpolate computed on uint8 (with PIL's decode: 1.1-1.3x
PIL's own resize, 1.7-2.0x the float interpolate the decode used before).
Every step is deterministic and independent of the thread count, so a file decodes to the
same bytes in any worker: the parallel decode equals the serial one bitwise.

`decode_rows` yields the images in order, in chunks, from a pool of forked worker processes
(fork: a worker inherits the loaded modules; a spawned one would import torch and the
harness again, ~4 s) or, below PARALLEL_MIN_IMAGES, in this process. At most a few chunks
are in flight, so memory stays bounded whatever the dataset's size.
"""
from __future__ import annotations

import functools
import io
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness.errors import HarnessError

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
CHUNK_SIZE = 32            # images per task: a chunk at 224 px is 4.8 MB to send back
PARALLEL_MIN_IMAGES = 512  # below: decoded here; 2 forked workers were no faster up to 512 (bench_decode)
PROGRESS_MIN_IMAGES = 200  # below: no progress bar (done in about a second)
_IN_FLIGHT_PER_WORKER = 3  # chunks submitted ahead per worker: bounds memory, keeps workers busy


def decode_image(path: Path, size: int, field: str = "data.root") -> np.ndarray:
    """One image file as uint8 [C, size, size], C = 1 for grayscale modes, else 3. Errors name `field`."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            gray = img.mode in GRAY_MODES
            pixels = _pixels(img, data, gray, size)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise HarnessError(f"{field}: cannot read image {path}: {reason}") from None
    return _fit(pixels, size).numpy()


def _pixels(img: Image.Image, data: bytes, gray: bool, size: int) -> torch.Tensor:
    """The decoded image as uint8 [C, h, w] (possibly a strided view), by the fastest decoder
    for its format (see the module docstring)."""
    mode = "L" if gray else "RGB"
    if img.format == "JPEG":
        width, height = img.size
        if min(width // size, height // size) >= 2:
            img.draft(None, (size, size))   # libjpeg scales by 1/2..1/8, both sides still >= size
        elif img.mode in ("L", "RGB") and _jpeg_decoder() is not None:
            return _jpeg_decoder()(data, gray)
    array = np.asarray(img.convert(mode))
    tensor = torch.from_numpy(array.copy())   # asarray's is read-only
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)   # channels-last: the fast kernel


@functools.lru_cache(maxsize=1)
def _jpeg_decoder() -> Callable[[bytes, bool], torch.Tensor] | None:
    """torchvision.io.decode_jpeg as (file bytes, gray) -> uint8 [C, h, w]; None where torchvision
    has no image decoding (it is deprecated since torchvision 0.29: then PIL decodes)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def read(data: bytes, gray: bool) -> torch.Tensor:
        with warnings.catch_warnings():   # the deprecation notice, at every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.GRAY if gray else ImageReadMode.RGB)
    return read


def _fit(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, h, w] -> contiguous [C, size, size]: shorter side to `size` (bilinear,
    antialiased, computed on uint8), then the centre crop; resize.resize's geometry."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[:, top:top + size, left:left + size]
    return x.contiguous()


def widen(block: np.ndarray) -> np.ndarray:
    """uint8 [N, 1, S, S] grey images as [N, 3, S, S] (the same value in every channel)."""
    return np.repeat(block, 3, axis=1) if block.shape[1] == 1 else block


def decode_chunk(paths: Sequence[Path], size: int, field: str) -> np.ndarray:
    """Images as one uint8 [N, C, size, size] block; C = 3 if any of them is in colour."""
    images = [decode_image(p, size, field) for p in paths]
    if any(a.shape[0] == 3 for a in images):
        images = [widen(a[None])[0] for a in images]
    return np.stack(images)


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def decode_rows(paths: Sequence[Path], size: int, field: str = "data.root", workers: int | None = None,
                chunk_size: int = CHUNK_SIZE) -> Iterator[np.ndarray]:
    """Every image of `paths`, in order, as consecutive uint8 [n, C, size, size] blocks (C per
    block: 3 if the block has a colour image). `workers`: processes (None: the cores; 1, or
    fewer than PARALLEL_MIN_IMAGES images with workers=None: this process). A progress bar on
    stderr (images/s, ETA) from PROGRESS_MIN_IMAGES images on."""
    chunks = [list(paths[i:i + chunk_size]) for i in range(0, len(paths), chunk_size)]
    if workers is None:
        workers = 1 if len(paths) < PARALLEL_MIN_IMAGES else default_workers()
    workers = max(1, min(workers, len(chunks)))
    blocks = (_on_one_thread(c, size, field) for c in chunks) if workers == 1 else \
        _pooled(chunks, size, field, workers)
    bar = _progress_bar(len(paths))
    try:
        for block in blocks:
            bar.update(len(block))
            yield block
    finally:   # also when the consumer stops early (a failed write): the pool is shut down now
        blocks.close()
        bar.close()


def _on_one_thread(paths: Sequence[Path], size: int, field: str) -> np.ndarray:
    """decode_chunk in this process with one torch thread, as in a worker: a resize of one
    image is too small to share, and two OpenMP threads on a busy machine spin-wait (measured:
    82 images/s with 2 threads, 240-307 with 1, on the 2-core machine under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return decode_chunk(paths, size, field)
    finally:
        torch.set_num_threads(threads)


def _pooled(chunks: list[list[Path]], size: int, field: str, workers: int) -> Iterator[np.ndarray]:
    """decode_chunk over `chunks` in worker processes, yielded in order, a bounded number ahead."""
    _jpeg_decoder()   # imported here, before the fork: no worker imports anything itself
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_init_worker)
    pending: deque[Future] = deque()
    todo = iter(chunks)
    try:
        with warnings.catch_warnings():   # Python >= 3.12 warns of any fork of a threaded process
            warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
            for chunk in todo:   # the first submit forks every worker
                pending.append(pool.submit(decode_chunk, chunk, size, field))
                if len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                    break
        while pending:
            block = pending.popleft().result()   # a worker's HarnessError is raised here
            chunk = next(todo, None)
            if chunk is not None:
                pending.append(pool.submit(decode_chunk, chunk, size, field))
            yield block
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _context():
    """fork where the platform has it (Linux): workers start in ~0.1 s with every module loaded;
    they run PIL, numpy and torch on one thread, never CUDA and never an import, so the
    parent's thread pools and locks do not matter (DataLoader's workers fork the same way).
    Elsewhere spawn, which imports the harness again in every worker (~4 s)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform == "linux" else "spawn")


def _init_worker() -> None:
    """A worker leaves Ctrl-C to its parent (which stops the pool) and uses one torch thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int):
    """tqdm on stderr (images/s and ETA) for a decode of PROGRESS_MIN_IMAGES images or more;
    redrawn every 30 s when stderr is no terminal (a log). TQDM_DISABLE=1 turns it off."""
    if total < PROGRESS_MIN_IMAGES:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="img", desc="decoding images", leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 30)
