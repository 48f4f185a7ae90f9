"""Tests for the parallel decode of image folders (harness/engine/data/decode.py, rows.py) and
the memory-mapped decoded-data cache (cache.py): parallel equals serial bitwise, the grey /
colour channel rule for every mode, cache reuse without decoding, damaged cache files as
misses, nothing half-written."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from harness.engine.data import cache, decode, fashion, folders
from harness.engine.data.rows import RowArray, RowFile
from harness.engine.data.sources import open_source
from harness.errors import HarnessError


def texture(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image with detail everywhere (a resize and a JPEG both have work to do)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def mixed_folder(root: Path) -> Path:
    """Two classes, images of every decoder path and mode: small and large (draft) RGB JPEG,
    grey and CMYK JPEG, RGBA, palette, grey and 16-bit PNG, in several sizes."""
    save(root / "a" / "0.jpg", texture(40, 30, 0), quality=90)              # decode_jpeg
    save(root / "a" / "1.jpg", texture(130, 90, 1), quality=90)             # draft (>= 2x the size)
    save(root / "a" / "2.jpg", texture(50, 60, 2).convert("L"), quality=90)
    save(root / "a" / "3.jpg", texture(33, 47, 3).convert("CMYK"), quality=90)
    save(root / "b" / "4.png", texture(25, 25, 4).convert("RGBA"))
    save(root / "b" / "5.png", texture(64, 20, 5).quantize(16))
    save(root / "b" / "6.png", texture(17, 31, 6).convert("L"))
    save(root / "b" / "7.png", Image.fromarray(np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 50))
    save(root / "b" / "8.gif", texture(20, 20, 8).convert("P"))
    return root


def folder_cfg(root: Path, size: int = 8) -> SimpleNamespace:
    return SimpleNamespace(dataset="imagefolder", root=str(root), image_size=size)


@pytest.fixture
def fresh_memory(monkeypatch):
    """An empty in-process cache, so loads go to the disk cache (or decode)."""
    monkeypatch.setattr(cache, "_MEMORY_CACHE", {})


def decode_folder(root: Path, size: int, rows, **kwargs) -> dict:
    layout, names = folders.scan_imagefolder(str(root))
    return folders.decode_imagefolder(layout, names, size, rows, **kwargs)


# ---------------------------------------------------------------- parallel == serial


def test_parallel_decode_equals_serial_bitwise(tmp_path):
    root = mixed_folder(tmp_path / "imgs")
    serial = RowArray(9)
    labels = decode_folder(root, 8, serial, workers=1)
    with RowFile(tmp_path / "parallel.npy", 9) as rows:   # 2 processes, 2 images a task: 5 tasks
        parallel_labels = decode_folder(root, 8, rows, workers=2, chunk_size=2)
        parallel = rows.commit()
    expected = serial.array()
    assert expected.shape == (9, 3, 8, 8) and parallel.shape == expected.shape
    assert parallel.tobytes() == expected.tobytes()
    assert torch.equal(labels["train_y"], parallel_labels["train_y"])
    assert labels["train_y"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    # and per image: the same bytes whichever chunk an image lands in
    alone = np.stack([decode.widen(decode.decode_image(p, 8)[None])[0]
                      for p, _ in folders.scan_imagefolder(str(root))[0]["train"]])
    assert alone.tobytes() == expected.tobytes()


def test_a_bad_image_in_a_worker_is_a_one_line_error_naming_it(tmp_path):
    root = mixed_folder(tmp_path / "imgs")
    bad = root / "b" / "9.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(HarnessError) as info:
        list(decode.decode_rows([p for p, _ in folders.scan_imagefolder(str(root))[0]["train"]], 8,
                                workers=2, chunk_size=2))
    assert str(info.value).startswith(f"data.root: cannot read image {bad}: ") and "\n" not in str(info.value)


# ---------------------------------------------------------------- the channel rule


@pytest.mark.parametrize("modes, channels", [
    (("L", "LA", "I;16"), 1),              # every image grey: one channel
    (("L", "RGBA"), 3), (("L", "P"), 3), (("L", "CMYK"), 3), (("I;16", "RGB"), 3),
])
def test_modes_follow_the_grey_only_if_every_image_is_grey_rule(tmp_path, modes, channels):
    root = tmp_path / "imgs"
    for i, mode in enumerate(modes):
        img = texture(20, 14, i)
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 200) if mode == "I;16" else img.convert(mode)
        save(root / f"c{i}" / ("x.jpg" if mode == "CMYK" else "x.png"), img)
    rows = RowArray(len(modes))
    decode_folder(root, 8, rows, workers=1)
    x = rows.array()
    assert x.shape == (len(modes), channels, 8, 8)
    grey = x[0]   # the first class is grey: replicated in every channel when the set is in colour
    assert all(np.array_equal(grey[0], grey[c]) for c in range(channels))


def test_a_colour_image_after_grey_ones_widens_the_file(tmp_path):
    """The cache file starts with the first block's channel count; a later colour block
    rewrites the grey rows so far with 3 channels (bounded memory: no whole-dataset copy)."""
    root = tmp_path / "imgs"
    for i in range(5):
        save(root / "a" / f"{i}.png", texture(12, 12, i).convert("L"))
    save(root / "b" / "colour.png", texture(12, 12, 9))
    expected = RowArray(6)
    decode_folder(root, 8, expected, workers=1)
    with RowFile(tmp_path / "rows.npy", 6) as rows:
        decode_folder(root, 8, rows, workers=1, chunk_size=2)   # grey, grey, then grey + colour
        written = rows.commit()
    assert written.shape == (6, 3, 8, 8) and written.tobytes() == expected.array().tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "rows.npy"]   # no temporary file left


def test_a_row_file_left_before_its_commit_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with RowFile(tmp_path / "rows.npy", 4) as rows:
            rows.append(np.zeros((2, 3, 8, 8), np.uint8))
            raise RuntimeError("the decode failed")
    with RowFile(tmp_path / "rows.npy", 4) as rows:
        rows.append(np.zeros((3, 1, 8, 8), np.uint8))
        with pytest.raises(ValueError, match="3 images written of the 4"):
            rows.commit()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the memory-mapped cache


def cache_files(workspace: Path) -> list[str]:
    return sorted(p.suffix for p in (workspace / "cache").iterdir())


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_cache_is_memory_mapped_and_reused_without_decoding(tmp_path, monkeypatch, fresh_memory):
    root = mixed_folder(tmp_path / "imgs")
    ws = tmp_path / "ws"
    first = cache.prepared_dataset(folder_cfg(root), ws)
    assert cache_files(ws) == [".json", ".npy"]
    npy = next((ws / "cache").glob("imagefolder-8px-*.npy"))
    assert oct(npy.stat().st_mode & 0o777) == "0o644"
    calls = []
    monkeypatch.setattr(folders, "decode_imagefolder", lambda *a, **k: calls.append(1))
    cache._MEMORY_CACHE.clear()
    again = cache.prepared_dataset(folder_cfg(root), ws)
    assert calls == [] and torch.equal(again["train_x"], first["train_x"])
    assert again["class_names"] == ["a", "b"] and again["train_y"].tolist() == first["train_y"].tolist()
    # backed by the file's pages, not a copy: its address lies in a mapping of the .npy
    address = again["train_x"].data_ptr()
    spans = [line.split()[0].split("-") for line in mapped_files().splitlines() if line.endswith(str(npy))]
    assert any(int(lo, 16) <= address < int(hi, 16) for lo, hi in spans)
    # copy-on-write: the tensor is writable, the file never changes
    before = npy.read_bytes()
    again["train_x"][0] = 0
    assert npy.read_bytes() == before
    cache._MEMORY_CACHE.clear()
    assert torch.equal(cache.prepared_dataset(folder_cfg(root), ws)["train_x"], first["train_x"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no-json", "bad-json", "wrong-shape"])
def test_a_damaged_cache_is_a_miss_and_decoded_again(tmp_path, monkeypatch, fresh_memory, damage):
    root = mixed_folder(tmp_path / "imgs")
    ws = tmp_path / "ws"
    first = cache.prepared_dataset(folder_cfg(root), ws)["train_x"].clone()
    npy = next((ws / "cache").glob("*.npy"))
    meta = npy.with_suffix(".json")
    if damage == "truncated":
        npy.write_bytes(npy.read_bytes()[:-100])
    elif damage == "garbage":
        npy.write_bytes(b"\x93NUMPY garbage" * 50)
    elif damage == "no-json":
        meta.unlink()
    elif damage == "bad-json":
        meta.write_text("{not json")
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "shape": [9, 1, 8, 8]}))
    real, calls = folders.decode_imagefolder, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(folders, "decode_imagefolder", counting)
    cache._MEMORY_CACHE.clear()
    assert torch.equal(cache.prepared_dataset(folder_cfg(root), ws)["train_x"], first)
    assert calls == [1]
    cache._MEMORY_CACHE.clear()   # repaired: read from the disk again
    assert torch.equal(cache.prepared_dataset(folder_cfg(root), ws)["train_x"], first) and calls == [1]
    assert cache_files(ws) == [".json", ".npy"]


def test_a_failed_decode_leaves_no_cache_file(tmp_path, fresh_memory):
    root = mixed_folder(tmp_path / "imgs")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(HarnessError, match="cannot read image"):
        cache.prepared_dataset(folder_cfg(root), tmp_path / "ws")
    assert cache_files(tmp_path / "ws") == []


def test_an_unwritable_cache_still_loads_in_memory(tmp_path, fresh_memory):
    root = mixed_folder(tmp_path / "imgs")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "cache").write_text("a file where the cache folder would be")
    with pytest.warns(UserWarning, match="could not write dataset cache"):
        prepared = cache.prepared_dataset(folder_cfg(root), tmp_path / "ws")
    assert prepared["train_x"].shape == (9, 3, 8, 8)


def test_fashion_uses_the_same_cache_format(tmp_path, monkeypatch, fresh_memory):
    from test_data import write_fake_fashion
    monkeypatch.setattr(fashion, "SYSTEM_FASHION_DIR", tmp_path / "absent")
    write_fake_fashion(tmp_path / "root", n_train=40, n_test=20)
    cfg = SimpleNamespace(dataset="fashion-mnist", root=str(tmp_path / "root"), image_size=32)
    prepared = cache.prepared_dataset(cfg, tmp_path / "ws")
    assert prepared["train_x"].shape == (40, 1, 28, 28) and prepared["test_x"].shape == (20, 1, 28, 28)
    assert cache_files(tmp_path / "ws") == [".json", ".npy"]
    raw = fashion._read_idx(tmp_path / "root" / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(prepared["test_x"][:, 0].numpy(), raw)


# ---------------------------------------------------------------- what a memory plan reads first


def test_source_says_how_many_images_of_what_size_before_decoding(tmp_path, monkeypatch):
    from test_data import write_fake_fashion
    root = mixed_folder(tmp_path / "imgs")
    source = open_source(SimpleNamespace(dataset="imagefolder", root=str(root), image_size=96), tmp_path)
    assert (source.n_images, source.stored_size, source.channels) == (9, 96, 3)
    monkeypatch.setattr(fashion, "SYSTEM_FASHION_DIR", tmp_path / "absent")
    write_fake_fashion(tmp_path / "fm", n_train=30, n_test=12)
    source = open_source(SimpleNamespace(dataset="fashion-mnist", root=str(tmp_path / "fm")), tmp_path)
    assert (source.n_images, source.stored_size, source.channels) == (42, 28, 1)


# ---------------------------------------------------------------- progress


def test_progress_bar_only_for_long_decodes(tmp_path, capfd):
    root = tmp_path / "imgs"
    for i in range(decode.PROGRESS_MIN_IMAGES):
        save(root / "a" / f"{i:03d}.png", Image.new("L", (4, 4), i % 256))
    paths = sorted((root / "a").iterdir())
    list(decode.decode_rows(paths[:-1], 4, workers=1))
    assert capfd.readouterr().err == ""          # a short decode prints nothing
    list(decode.decode_rows(paths, 4, workers=1))
    assert "img/s" in capfd.readouterr().err     # a long one: the rate (and the ETA) on stderr
