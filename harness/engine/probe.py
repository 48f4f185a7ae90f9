"""Free probes: a head-only stage on a truly frozen body trains the head on cached features.

A stage qualifies when only the head trains (`trained_groups == (head,)`), the body is truly
frozen (`model.train_bn: false`: its modules in eval mode, harness/engine/groups.py) and
nothing is augmented (`data.augment: none`). Then the body's output on a split depends only
on the split, the body's weights, the image size, the input statistics and the device, so it
is computed once (eval mode, `data.eval_batches` in chunks of the batch size the uncached run
gives the body that split, the step's autocast) and the head trains on it: `model.head_forward(features)` is `model(x)` (the LayerGroups contract). The
batches' indices come from the same `data.train_indices` as `data.train_batches`'s, drawn from
the same generator, and the head's dropout from the same global RNG, so a cached run is the
uncached one, step for step.

Features are kept in a small in-process cache (on their device, oldest evicted first), keyed
by a digest of all of the above. `HARNESS_FEATURE_CACHE`: `memory` (default), `disk` (also
WORKSPACE/cache/features/<key>.pt, written atomically; a damaged file is recomputed) or
`off` (never cached: every stage runs the body).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from harness.engine import data as data_mod
from harness.engine.data.host_rows import HostRows
from harness.engine.files import torch_save_atomic
from harness.engine.recipe import Recipe, Stage
from harness.engine.step import Hyper, Score, autocast, model_format, score, train_step
from harness.errors import HarnessError

ENV = "HARNESS_FEATURE_CACHE"
MODES = ("memory", "disk", "off")
FORMAT = "finetune-harness-features/1"   # bump when what a key covers or a file holds changes
MAX_ENTRIES = 8                          # in-process cache: splits kept at most ...
MAX_BYTES = 4 << 30                      # ... and their bytes


def cache_mode() -> str:
    """HARNESS_FEATURE_CACHE: memory (unset), disk or off; anything else is a one-line error."""
    mode = os.environ.get(ENV, "").strip().lower() or "memory"
    if mode not in MODES:
        raise HarnessError(f"{ENV}: {mode!r} is not one of {', '.join(MODES)}")
    return mode


def qualifies(recipe: Recipe, stage: Stage, n_groups: int) -> bool:
    """Does this stage train the head alone on a truly frozen body, with no augmentation?"""
    return (stage.trained_groups(n_groups) == (n_groups - 1,) and not recipe.model.train_bn
            and recipe.data.augment == "none" and cache_mode() != "off")


class FeatureCache:
    """Features by key, on their device; the oldest go first beyond `max_entries` / `max_bytes`.
    Counters say what happened: `computed` (body runs), `memory_hits`, `disk_reads`, `disk_writes`."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.computed = self.memory_hits = self.disk_reads = self.disk_writes = 0

    def get(self, key: str) -> torch.Tensor | None:
        f = self.entries.get(key)
        if f is not None:
            self.entries.move_to_end(key)
            self.memory_hits += 1
        return f

    def put(self, key: str, f: torch.Tensor) -> None:
        if _nbytes(f) > self.max_bytes:
            return   # used by this stage, kept by none
        self.entries[key] = f
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries or sum(map(_nbytes, self.entries.values())) > self.max_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
        self.computed = self.memory_hits = self.disk_reads = self.disk_writes = 0


CACHE = FeatureCache()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --- keys ------------------------------------------------------------------------------------

def _tensor_bytes(tensors: list[torch.Tensor]) -> bytes:
    """The raw bytes of tensors, gathered on their device and copied to the host once."""
    if not tensors:
        return b""
    flat = torch.cat([t.detach().reshape(-1).contiguous().view(torch.uint8) for t in tensors])
    return flat.cpu().numpy().tobytes()


def body_digest(model: nn.Module) -> str:
    """What the body computes with: the model's kind and every tensor of its body state."""
    state = sorted(model.body_state_dict().items())
    h = hashlib.sha256(f"{type(model).__name__}|{model.arch}|{getattr(model, 'mode', '')}".encode())
    for name, t in state:
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}".encode())
    h.update(_tensor_bytes([t for _, t in state]))
    return h.hexdigest()


def split_digest(split: data_mod.Split) -> str:
    """A split's content: its uint8 images, labels and the size batches come out at."""
    h = hashlib.sha256(f"{tuple(split.x.shape)}|{split.x.dtype}|{tuple(split.y.shape)}|{split.size}|{split.stored}".encode())
    if isinstance(split.x, HostRows):   # rows of a cache file, whose name is its content's key
        h.update(f"{split.x.path.name}|{split.x.offset}".encode())
        h.update(_tensor_bytes([split.x.rows, split.y]))
    else:
        h.update(_tensor_bytes([split.x, split.y]))
    return h.hexdigest()


def _device_tag(device: torch.device) -> str:
    """The device and the numerics it runs with (autocast dtype, torch version)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    return f"{device}|{name}|{precision}|torch {torch.__version__}"


def feature_key(body: str, split: str, stats: data_mod.InputStats, device: torch.device, chunk: int) -> str:
    """The features' key. `chunk` is in it: kernels may round differently per batch shape."""
    parts = [FORMAT, body, split, repr(tuple(stats.mean)), repr(tuple(stats.std)), _device_tag(device), str(chunk)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


# --- computing, reading and writing features -------------------------------------------------

def feature_format(f: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of features as the body hands them to the head: a map channels-last on CUDA."""
    return model_format(f, device) if f.ndim == 4 else f


@torch.no_grad()
def compute_features(model: nn.Module, split: data_mod.Split, device: torch.device, chunk: int) -> torch.Tensor:
    """The body's output on every image of a (device) split, in order: eval mode, normalised
    as every batch is, under the step's autocast, `chunk` images at a time (the uncached
    run's batch shape for that split, so that the kernels are the same ones)."""
    was_training = model.training
    model.eval()
    try:
        parts = []
        for x, _ in data_mod.eval_batches(split, chunk, model.input_stats):
            with autocast(device):
                parts.append(model.features(model_format(x, device)))
        return torch.cat(parts)
    finally:
        model.train(was_training)


def read_features(path: Path, key: str, n: int, device: torch.device) -> torch.Tensor | None:
    """A disk cache file's features, or None when missing, damaged or not this key's."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        f = blob["features"]
        ok = blob.get("format") == FORMAT and blob.get("key") == key
        return f if ok and isinstance(f, torch.Tensor) and f.is_floating_point() and len(f) == n else None
    except Exception:   # a damaged cache is only a miss: computing again repairs it
        return None


def write_features(path: Path, key: str, f: torch.Tensor) -> None:
    """Save atomically (a temp file in the same folder, then a rename); a failure only warns."""
    try:
        torch_save_atomic({"format": FORMAT, "key": key, "features": f.detach().cpu()}, path)
    except OSError as exc:
        warnings.warn(f"could not write feature cache {path}: {exc}", stacklevel=2)


# --- the probe stage ---------------------------------------------------------------------------

class Probe:
    """One qualifying stage's view of the cache: features per split for the body as it is now.
    `digests` (split name -> split_digest) is the caller's memo: a run's splits do not change."""

    def __init__(self, model: nn.Module, device: torch.device, workspace: str | Path | None,
                 digests: dict[str, str]):
        self.model, self.device, self.digests = model, device, digests
        self.body = body_digest(model)
        self.folder = Path(workspace) / "cache" / "features" if workspace is not None and cache_mode() == "disk" else None

    def fits(self, split: data_mod.Split, n_images: int) -> bool:
        """Would the features of `n_images` images like `split`'s first fit the cache's byte
        budget? If not, the stage runs uncached: a cache must not cost device memory the
        uncached run does not need."""
        one = compute_features(self.model, data_mod.Split(split.x[:1], split.y[:1], split.size, split.stored), self.device, 1)
        return _nbytes(one) * n_images <= CACHE.max_bytes

    def features(self, name: str, split: data_mod.Split, chunk: int) -> torch.Tensor:
        """The body's output on `split` (on the device): from memory, the disk, or computed
        `chunk` images at a time. With the disk cache on, features found in memory are also
        written if the file is missing."""
        if name not in self.digests:
            self.digests[name] = split_digest(split)
        key = feature_key(self.body, self.digests[name], self.model.input_stats, self.device, chunk)
        path = self.folder / f"{key}.pt" if self.folder is not None else None
        f = CACHE.get(key)
        if f is None:
            f = read_features(path, key, len(split.y), self.device) if path is not None else None
            CACHE.disk_reads += f is not None
            if f is None:
                f = compute_features(self.model, split, self.device, chunk)
                CACHE.computed += 1
                self._write(path, key, f)
            CACHE.put(key, f)
        elif path is not None and not path.is_file():
            self._write(path, key, f)
        return f

    @staticmethod
    def _write(path: Path | None, key: str, f: torch.Tensor) -> None:
        if path is not None:
            write_features(path, key, f)
            CACHE.disk_writes += 1

    def train_batches(self, split: data_mod.Split, generator: torch.Generator,
                      batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """data.train_batches over the cached features: the same indices (`data.train_indices`), the same batches."""
        feats = self.features("train", split, batch_size)
        for idx in data_mod.train_indices(len(split.y), batch_size, generator, split.x.device):
            yield feature_format(feats[idx], self.device), split.y[idx]

    def evaluate(self, name: str, split: data_mod.Split, batch_size: int) -> tuple[float | None, float | None]:
        """train.evaluate on the cached features: the same batches, loss and accuracy."""
        s = self.score(name, split, batch_size)
        return (None, None) if s is None else (s.loss, s.accuracy)

    def score(self, name: str, split: data_mod.Split, batch_size: int) -> Score | None:
        """train.evaluate_split on the cached features: the same batches, the same Score."""
        if len(split.y) == 0:
            return None
        # fetched outside inference mode: features computed here are ordinary tensors
        return self._evaluate(self.features(name, split, batch_size), split.y, batch_size)

    def _evaluate(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Score:
        batches = ((feature_format(feats[i:i + batch_size], self.device), labels[i:i + batch_size])
                   for i in range(0, len(labels), batch_size))
        return score(self.model, batches, self.device, forward=self.model.head_forward)


def head_step(model: nn.Module, opt: torch.optim.Optimizer, f: torch.Tensor, y: torch.Tensor,
              hyper: Hyper) -> torch.Tensor:
    """step.train_step with the head alone on a batch of features."""
    return train_step(model, opt, f, y, hyper, forward=model.head_forward)
