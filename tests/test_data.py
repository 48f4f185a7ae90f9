"""Tests for harness.engine.data: loading, class subsets, seeded splits, caching, and batches."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from harness.engine import data
from harness.engine.data import cache, fashion, folders, resize, splits
from harness.engine.data import CLASS_NAMES_FASHION, Split
from harness.engine.input_stats import IMAGENET_MEAN, IMAGENET_STD
from harness.errors import HarnessError

needs_fashion = pytest.mark.skipif(
    not data.SYSTEM_FASHION_DIR.is_dir(),
    reason=f"Fashion-MNIST not installed at {data.SYSTEM_FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)


def make_cfg(**overrides) -> SimpleNamespace:
    """A data config with test-friendly defaults."""
    values = dict(
        dataset="fashion-mnist", root=None, classes=None, train_per_class=None, test_per_class=None,
        val_fraction=0.1, image_size=28, batch_size=32, augment=False,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def raises_harness(match: str):
    """pytest.raises for HarnessError whose message matches (regex)."""
    return pytest.raises(HarnessError, match=match)


def one_line(exc_info) -> str:
    """The caught error's message, checked to be a single line."""
    message = str(exc_info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def fashion_ws(tmp_path_factory) -> Path:
    """One workspace shared by the Fashion-MNIST tests, so the 70k images decode once."""
    return tmp_path_factory.mktemp("fashion_ws")


@pytest.fixture(scope="module")
def t10k() -> tuple[torch.Tensor, torch.Tensor]:
    images = fashion._read_idx(data.SYSTEM_FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    labels = fashion._read_idx(data.SYSTEM_FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


# ---------------------------------------------------------------- Fashion-MNIST (Debian files)


@needs_fashion
def test_fashion_subset_by_name_counts_labels_and_test_is_t10k(fashion_ws, t10k):
    ds = data.load_dataset(make_cfg(classes=["Bag", "Sandal"], val_fraction=0.1), fashion_ws, seed=0)
    assert ds.class_names == ["Bag", "Sandal"]
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.train.x.shape[1:] == (1, 28, 28)
    # 6000 training images per class: 600 to val, 5400 to train.
    assert ds.train.y.bincount().tolist() == [5400, 5400]
    assert ds.val.y.bincount().tolist() == [600, 600]
    # Test is the t10k set's Bag (8) and Sandal (5) images, relabelled 0 and 1, in file order.
    images, labels = t10k
    keep = (labels == 8) | (labels == 5)
    assert torch.equal(ds.test.x, images[keep])
    assert torch.equal(ds.test.y, torch.where(labels[keep] == 8, 0, 1))


@needs_fashion
def test_fashion_subset_by_index_matches_by_name(fashion_ws):
    by_name = data.load_dataset(make_cfg(classes=["Bag", "Sandal"]), fashion_ws, seed=3)
    by_index = data.load_dataset(make_cfg(classes=[8, 5]), fashion_ws, seed=3)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(by_name, part).x, getattr(by_index, part).x)
        assert torch.equal(getattr(by_name, part).y, getattr(by_index, part).y)
    everything = data.load_dataset(make_cfg(), fashion_ws, seed=3)
    assert everything.class_names == CLASS_NAMES_FASHION
    assert len(everything.test.y) == 10_000


@needs_fashion
def test_fashion_train_per_class_caps_train_and_scales_val(fashion_ws):
    ds = data.load_dataset(make_cfg(classes=[0, 1, 2], train_per_class=50, val_fraction=0.25), fashion_ws, seed=0)
    assert ds.train.y.bincount().tolist() == [50, 50, 50]
    # val : train keeps 0.25 : 0.75, so round(50 / 3) = 17 per class.
    assert ds.val.y.bincount().tolist() == [17, 17, 17]
    no_val = data.load_dataset(make_cfg(classes=[0], train_per_class=50, val_fraction=0.0), fashion_ws, seed=0)
    assert len(no_val.train.y) == 50
    assert no_val.val.x.shape == (0, 1, 28, 28) and no_val.val.y.shape == (0,)


@needs_fashion
def test_test_per_class_caps_the_test_split_alike_for_every_seed(fashion_ws):
    cfg = make_cfg(classes=[0, 9, 3], test_per_class=7)
    a, b = (data.load_dataset(cfg, fashion_ws, seed=s) for s in (0, 5))
    assert a.test.y.bincount().tolist() == [7, 7, 7]
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)   # the same images
    whole = data.load_dataset(make_cfg(classes=[0, 9, 3]), fashion_ws, seed=0)
    assert whole.test.y.bincount().tolist() == [1000, 1000, 1000]
    rows = {bytes(img.numpy()) for img in whole.test.x}
    assert all(bytes(img.numpy()) in rows for img in a.test.x)   # a subset of the test split
    assert torch.equal(a.train.x, whole.train.x) and torch.equal(a.val.x, whole.val.x)
    # a cap above a class's count keeps all of it
    assert data.load_dataset(make_cfg(classes=[0, 1], test_per_class=5000), fashion_ws, seed=0).test.y.bincount() \
        .tolist() == [1000, 1000]


@needs_fashion
def test_fashion_val_is_stratified_and_disjoint_from_train(fashion_ws):
    prepared = cache.prepared_dataset(make_cfg(), fashion_ws)
    pool_y = prepared["train_y"]
    for cap in (None, 40):
        train_idx, val_idx = splits.split_indices(pool_y, [3, 7, 1], cap, 0.2, seed=5)
        assert not set(train_idx.tolist()) & set(val_idx.tolist())
        val_counts = pool_y[val_idx].bincount(minlength=10)
        expected = 1200 if cap is None else 10
        assert val_counts[[3, 7, 1]].tolist() == [expected] * 3
        assert val_counts.sum() == 3 * expected


@needs_fashion
def test_fashion_split_is_deterministic_per_seed(fashion_ws):
    cfg = make_cfg(classes=[0, 9], train_per_class=100, val_fraction=0.2)
    a = data.load_dataset(cfg, fashion_ws, seed=1)
    b = data.load_dataset(cfg, fashion_ws, seed=1)
    c = data.load_dataset(cfg, fashion_ws, seed=2)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.train.x, c.train.x)
    assert not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.x, c.test.x)  # test never depends on the seed


@needs_fashion
def test_fashion_cache_file_is_written_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_MEMORY_CACHE", {})
    cfg = make_cfg(classes=["Coat"], train_per_class=20)
    first = data.load_dataset(cfg, tmp_path, seed=0)
    cache_files = list((tmp_path / "cache").glob("*.npy"))   # the images; labels and names in .json
    assert len(cache_files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    assert cache_files[0].with_suffix(".json").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(fashion, "decode_fashion", no_decoding)
    cache._MEMORY_CACHE.clear()  # forces the disk cache
    from_disk = data.load_dataset(cfg, tmp_path, seed=0)
    assert torch.equal(first.train.x, from_disk.train.x)
    cache_files[0].unlink()  # now only the in-process cache can answer
    from_memory = data.load_dataset(cfg, tmp_path, seed=0)
    assert torch.equal(first.test.x, from_memory.test.x)


# ---------------------------------------------------------------- Fashion-MNIST lookup (tiny fake idx files)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_fake_fashion(folder: Path, n_train: int = 40, n_test: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_root_with_torchvision_layout_and_resize(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "SYSTEM_FASHION_DIR", tmp_path / "absent")
    write_fake_fashion(tmp_path / "root" / "FashionMNIST" / "raw")
    cfg = make_cfg(root=str(tmp_path / "root"), image_size=32, val_fraction=0.25)
    ds = data.load_dataset(cfg, tmp_path / "ws", seed=0)
    # held at the native 28 px (60k images at 224 px would be 9 GB); batches come out at 32
    assert ds.train.x.shape == (30, 1, 28, 28) and ds.train.size == 32  # 4 per class: 1 to val, 3 to train
    assert ds.val.y.bincount().tolist() == [1] * 10
    assert ds.test.x.shape == (20, 1, 28, 28)
    images, _ = next(data.eval_batches(ds.test, 8))
    assert images.shape == (8, 3, 32, 32)
    # the per-batch resize is the one the old cache applied up front: shorter side, antialiased
    assert torch.equal(images, data.normalize(resize.resize(ds.test.x[:8], 32)))
    batch, _ = next(data.train_batches(ds.train, 8, torch.Generator().manual_seed(0), augment="flip"))
    assert batch.shape == (8, 3, 32, 32)


def test_fashion_cache_is_one_file_for_every_image_size(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "SYSTEM_FASHION_DIR", tmp_path / "absent")
    monkeypatch.setattr(cache, "_MEMORY_CACHE", {})
    write_fake_fashion(tmp_path / "root" / "FashionMNIST" / "raw")
    for size in (32, 96, 224):
        ds = data.load_dataset(make_cfg(root=str(tmp_path / "root"), image_size=size), tmp_path / "ws", seed=0)
        assert ds.train.size == size and ds.train.x.shape[-1] == 28
        assert next(data.eval_batches(ds.val, 4))[0].shape[-1] == size
    assert len(list((tmp_path / "ws" / "cache").glob("*.npy"))) == 1


def test_fashion_not_found_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "SYSTEM_FASHION_DIR", tmp_path / "absent")

    def offline(dest):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fashion, "_download_fashion", offline)
    with raises_harness("apt-get install dataset-fashion-mnist") as exc_info:
        data.load_dataset(make_cfg(), tmp_path, seed=0)
    assert str(tmp_path / "data" / "fashion-mnist") in one_line(exc_info)


def test_truncated_idx_file_names_the_file(tmp_path, monkeypatch):
    write_fake_fashion(tmp_path / "root")
    bad = tmp_path / "root" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">i", 40) + bytes(5)))
    with raises_harness("train-labels-idx1-ubyte.gz") as exc_info:
        data.load_dataset(make_cfg(root=str(tmp_path / "root")), tmp_path / "ws", seed=0)
    assert "truncated" in one_line(exc_info)


# ---------------------------------------------------------------- imagefolder


def save_image(path: Path, value: int | tuple[int, int, int], mode: str = "RGB", size=(12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def make_folder(root: Path, per_class: int = 6, classes=("cat", "dog", "emu"), mode: str = "RGB") -> None:
    """Class folders of solid images, each image a distinct colour so rows identify images."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            value = 10 * c + i if mode == "L" else (10 * c + i, i, c)
            save_image(root / name / f"{i}.png", value, mode)


def folder_cfg(root: Path, **overrides) -> SimpleNamespace:
    return make_cfg(**{"dataset": "imagefolder", "root": str(root), "image_size": 8, **overrides})


def rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.flatten().tolist()) for r in x}


def test_imagefolder_class_folders_split_three_ways(tmp_path):
    make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image, ignored")
    ds = data.load_dataset(folder_cfg(tmp_path / "imgs", val_fraction=0.2), tmp_path / "ws", seed=0)
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.train.x.shape == (12, 3, 8, 8)
    # Per class of 6: test round(1.2) = 1, then val round(5 * 0.2) = 1, train 4.
    assert ds.test.y.bincount().tolist() == [1, 1, 1]
    assert ds.val.y.bincount().tolist() == [1, 1, 1]
    assert ds.train.y.bincount().tolist() == [4, 4, 4]
    train, val, test = rows(ds.train.x), rows(ds.val.x), rows(ds.test.x)
    assert len(train) == 12 and not train & val and not train & test and not val & test
    other_seed = data.load_dataset(folder_cfg(tmp_path / "imgs", val_fraction=0.2), tmp_path / "ws", seed=1)
    assert rows(other_seed.test.x) == test  # the carved test split ignores the seed


def test_imagefolder_train_val_test_layout(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root / "train", per_class=5, classes=("a", "b"))
    make_folder(root / "val", per_class=2, classes=("a", "b"))
    make_folder(root / "test", per_class=3, classes=("a", "b"))
    cfg = folder_cfg(root, classes=["b"], train_per_class=4, val_fraction=0.5)
    ds = data.load_dataset(cfg, tmp_path / "ws", seed=0)
    assert ds.class_names == ["b"]
    assert ds.train.y.tolist() == [0] * 4  # capped
    assert ds.val.y.tolist() == [0] * 2  # the val/ folder, whole
    assert ds.test.y.tolist() == [0] * 3


def test_imagefolder_without_val_and_test_folders_splits_train(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root / "train", per_class=10, classes=("a", "b"))
    ds = data.load_dataset(folder_cfg(root, val_fraction=0.3), tmp_path / "ws", seed=0)
    assert ds.test.y.bincount().tolist() == [3, 3]
    assert ds.val.y.bincount().tolist() == [2, 2]  # round(7 * 0.3)
    assert ds.train.y.bincount().tolist() == [5, 5]


def test_imagefolder_grayscale_stays_one_channel(tmp_path):
    make_folder(tmp_path / "imgs", per_class=3, classes=("a", "b"), mode="L")
    ds = data.load_dataset(folder_cfg(tmp_path / "imgs", val_fraction=0.0), tmp_path / "ws", seed=0)
    assert ds.train.x.shape == (6, 1, 8, 8)
    assert sorted(ds.train.x[:, 0, 0, 0].tolist()) == [0, 1, 2, 10, 11, 12]


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    root = tmp_path / "imgs"
    save_image(root / "a" / "gray.png", 77, "L")
    save_image(root / "b" / "color.jpg", (200, 10, 10))
    ds = data.load_dataset(folder_cfg(root, val_fraction=0.0), tmp_path / "ws", seed=0)
    assert ds.train.x.shape == (2, 3, 8, 8)
    gray = ds.train.x[ds.train.y == 0][0]
    assert (gray == 77).all()  # same value in all three channels


def test_imagefolder_resizes_shorter_side_then_center_crops(tmp_path):
    root = tmp_path / "imgs"
    image = Image.new("L", (30, 10), 0)  # wide: black, a white middle third
    image.paste(255, (10, 0, 20, 10))
    root.joinpath("a").mkdir(parents=True)
    image.save(root / "a" / "wide.png")
    ds = data.load_dataset(folder_cfg(root, val_fraction=0.0, image_size=5), tmp_path / "ws", seed=0)
    assert ds.train.x.shape == (1, 1, 5, 5)
    assert (ds.train.x[0, 0, :, 1:4] == 255).all()  # the crop is the middle of the image


def test_imagefolder_corrupt_image_names_the_file(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2)
    bad = tmp_path / "imgs" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with raises_harness("cannot read image") as exc_info:
        data.load_dataset(folder_cfg(tmp_path / "imgs"), tmp_path / "ws", seed=0)
    assert one_line(exc_info).startswith(f"data.root: cannot read image {bad}: ")


def test_load_folder_errors_name_its_field(tmp_path):
    """A second test folder (compare.shift_root) names its own field, as data.root's checks do."""
    make_folder(tmp_path / "shift", per_class=2, classes=("cat", "dog"))
    bad = tmp_path / "shift" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with raises_harness("cannot read image") as exc_info:
        data.load_folder(tmp_path / "shift", ["cat", "dog"], 8, "compare.shift_root")
    assert one_line(exc_info).startswith(f"compare.shift_root: cannot read image {bad}: ")
    bad.unlink()
    link = tmp_path / "shift" / "emu"
    link.symlink_to(tmp_path / "gone")
    with raises_harness("broken symbolic link") as exc_info:
        data.load_folder(tmp_path / "shift", ["cat", "dog"], 8, "compare.shift_root")
    assert one_line(exc_info) == f"compare.shift_root: {link} is a broken symbolic link"


def test_imagefolder_bad_roots_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with raises_harness(f"data.root: {missing} does not exist"):
        data.load_dataset(folder_cfg(missing), tmp_path / "ws", seed=0)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with raises_harness("not a directory"):
        data.load_dataset(folder_cfg(a_file), tmp_path / "ws", seed=0)
    (tmp_path / "bare").mkdir()
    with raises_harness("no class folders"):
        data.load_dataset(folder_cfg(tmp_path / "bare"), tmp_path / "ws", seed=0)
    make_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "imgs" / "zebra").mkdir()
    (tmp_path / "imgs" / "zebra" / "readme.md").write_text("no images here")
    with raises_harness("has no images") as exc_info:
        data.load_dataset(folder_cfg(tmp_path / "imgs"), tmp_path / "ws", seed=0)
    assert str(tmp_path / "imgs" / "zebra") in one_line(exc_info)


def test_imagefolder_cache_reused_and_invalidated_by_edits(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs", per_class=3)
    cfg = folder_cfg(tmp_path / "imgs", val_fraction=0.0)
    first = data.load_dataset(cfg, tmp_path / "ws", seed=0)
    assert len(list((tmp_path / "ws" / "cache").glob("imagefolder-8px-*.npy"))) == 1

    real_decode = folders.decode_imagefolder
    calls = []

    def counting_decode(*args):
        calls.append(1)
        return real_decode(*args)

    monkeypatch.setattr(folders, "decode_imagefolder", counting_decode)
    monkeypatch.setattr(cache, "_MEMORY_CACHE", {})
    assert torch.equal(data.load_dataset(cfg, tmp_path / "ws", seed=0).train.x, first.train.x)
    assert calls == []
    save_image(tmp_path / "imgs" / "cat" / "new.png", (250, 250, 250))
    assert len(data.load_dataset(cfg, tmp_path / "ws", seed=0).train.y) == len(first.train.y) + 1
    assert calls == [1]


# ---------------------------------------------------------------- class subsets


@pytest.mark.parametrize(
    "classes, message",
    [
        (["cat", "Foo"], r"data.classes: unknown class 'Foo' \(known: 'cat', 'dog', 'emu'\)"),
        ([0, 3], r"data.classes: class index 3 out of range \(0..2\)"),
        (["dog", 1], r"data.classes: duplicate class 'dog'"),
        ([], r"data.classes: is empty"),
    ],
)
def test_bad_classes_name_the_field(tmp_path, classes, message):
    make_folder(tmp_path / "imgs", per_class=2)
    with raises_harness(message) as exc_info:
        data.load_dataset(folder_cfg(tmp_path / "imgs", classes=classes), tmp_path / "ws", seed=0)
    one_line(exc_info)


def test_classes_reindexed_in_given_order(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2, mode="L")
    ds = data.load_dataset(folder_cfg(tmp_path / "imgs", classes=["emu", 0], val_fraction=0.0), tmp_path / "ws", seed=0)
    assert ds.class_names == ["emu", "cat"]
    # Grey values are 10 * original class + i: emu images (20, 21) must carry label 0.
    x, y = torch.cat([ds.train.x, ds.test.x]), torch.cat([ds.train.y, ds.test.y])
    assert set(x[y == 0][:, 0, 0, 0].tolist()) == {20, 21}
    assert set(x[y == 1][:, 0, 0, 0].tolist()) == {0, 1}


def test_unknown_dataset_and_bad_fraction(tmp_path):
    """The recipe schema holds these rules (load_dataset takes a validated DataConfig)."""
    from conftest import tiny_recipe_dict
    from harness.engine.recipe import Recipe
    with raises_harness("data.dataset: .*'mnist'"):
        Recipe.from_dict(tiny_recipe_dict(data={"dataset": "mnist"}))
    with raises_harness("data.val_fraction"):
        Recipe.from_dict(tiny_recipe_dict(data={"val_fraction": 1.0}))


# ---------------------------------------------------------------- batches


def synthetic_split(n: int = 50, channels: int = 1, size: int = 16) -> Split:
    """Random images; labels are the example ids so batches can be traced back."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)
    return Split(x, torch.arange(n))


def test_train_batches_count_shapes_and_normalisation():
    split = synthetic_split(n=50, channels=1)
    batches = list(data.train_batches(split, 16, torch.Generator().manual_seed(0), augment="none"))
    assert len(batches) == 50 // 16 == data.steps_per_epoch(50, 16)
    for images, labels in batches:
        assert images.shape == (16, 3, 16, 16) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert torch.equal(images, data.normalize(split.x[labels]))
    seen = torch.cat([labels for _, labels in batches])
    assert len(set(seen.tolist())) == 48  # a shuffled epoch without repeats
    assert not torch.equal(seen, torch.arange(48))


def test_train_batches_come_in_the_order_of_train_indices():
    """One index generator for images and for a probe's cached features (harness/engine/probe.py)."""
    split = synthetic_split(n=50, channels=1)
    indices = list(data.train_indices(50, 16, torch.Generator().manual_seed(3), split.x.device))
    batches = list(data.train_batches(split, 16, torch.Generator().manual_seed(3), augment="none"))
    assert len(indices) == len(batches) == 3
    assert all(torch.equal(idx, labels) for idx, (_, labels) in zip(indices, batches))


def test_normalize_uses_imagenet_statistics():
    x = torch.stack([torch.zeros(3, 2, 2, dtype=torch.uint8), torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    out = data.normalize(x)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[0, :, 0, 0], -mean / std)
    assert torch.allclose(out[1, :, 0, 0], (1 - mean) / std)
    assert torch.allclose(data.normalize(x[:, :1]), out)  # grey is expanded to three equal channels


def test_augmentation_crops_and_flips_but_keeps_labels():
    split = synthetic_split(n=32, channels=3, size=16)
    plain = list(data.train_batches(split, 8, torch.Generator().manual_seed(7), augment="none"))
    augmented = list(data.train_batches(split, 8, torch.Generator().manual_seed(7), augment="flip"))
    assert [torch.equal(a[1], b[1]) for a, b in zip(plain, augmented)] == [True] * 4
    images = torch.cat([a[0] for a in augmented])
    labels = torch.cat([a[1] for a in augmented])
    assert not torch.equal(images, torch.cat([p[0] for p in plain]))
    # Every output is one crop (pad 2, reflect) of its source image, possibly flipped.
    pad = 16 // 8
    padded = torch.nn.functional.pad(data.normalize(split.x), (pad,) * 4, mode="reflect")
    flips = 0
    for image, label in zip(images, labels):
        crops = [
            padded[label, :, top:top + 16, left:left + 16]
            for top in range(2 * pad + 1) for left in range(2 * pad + 1)
        ]
        if any(torch.equal(image, crop) for crop in crops):
            continue
        assert any(torch.equal(image.flip(-1), crop) for crop in crops)
        flips += 1
    assert 0 < flips < 32


def test_train_batches_reproducible_with_same_generator_seed():
    split = synthetic_split()
    a = list(data.train_batches(split, 10, torch.Generator().manual_seed(3), augment="flip"))
    b = list(data.train_batches(split, 10, torch.Generator().manual_seed(3), augment="flip"))
    c = list(data.train_batches(split, 10, torch.Generator().manual_seed(4), augment="flip"))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])


def test_eval_batches_cover_every_example_once_in_order():
    split = synthetic_split(n=23)
    batches = list(data.eval_batches(split, 10))
    assert [len(labels) for _, labels in batches] == [10, 10, 3]
    assert torch.equal(torch.cat([labels for _, labels in batches]), torch.arange(23))
    assert torch.equal(torch.cat([images for images, _ in batches]), data.normalize(split.x))


def test_to_device_keeps_dtypes():
    moved = data.to_device(synthetic_split(n=4), torch.device("cpu"))
    assert moved.x.dtype == torch.uint8 and moved.y.dtype == torch.int64


def test_batch_size_must_be_positive():
    with raises_harness("data.batch_size"):
        data.steps_per_epoch(10, 0)
