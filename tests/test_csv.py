"""`data.dataset: csv`: a CSV of image paths and labels loads exactly as the same images laid
out as an image folder; its split column, paths, columns and every bad input (one line naming
the field, the CSV's line or column); its decoded-data cache."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.engine import data
from harness.engine.data import cache, folders
from harness.engine.recipe import DataConfig
from harness.errors import HarnessError
from test_bad_input import assert_no_store_written, full_recipe, listing
from test_data import folder_cfg, make_folder, save_image

CLASSES = ("cat", "dog", "emu")


def csv_cfg(csv_file: Path, **overrides) -> DataConfig:
    """A validated data config for a CSV dataset, at 8 px."""
    return DataConfig.model_validate({"dataset": "csv", "csv": str(csv_file), "image_size": 8,
                                      "val_fraction": 0.2, **overrides})


def write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def folder_rows(root: Path, classes=CLASSES, per_class: int = 6, prefix: str = "") -> list[str]:
    """'path,label' lines for make_folder's images, shuffled (row order must not matter)."""
    lines = [f"{prefix}{name}/{i}.png,{name}" for name in classes for i in range(per_class)]
    random.Random(0).shuffle(lines)
    return lines


def assert_same_dataset(a: data.Dataset, b: data.Dataset) -> None:
    assert a.class_names == b.class_names
    for part in ("train", "val", "test"):
        x, y = getattr(a, part), getattr(b, part)
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y), part


def load(cfg, ws: Path, seed: int = 0) -> data.Dataset:
    return data.load_dataset(cfg, ws, seed)


def message(cfg, ws: Path) -> str:
    """The one-line HarnessError that loading `cfg` raises."""
    with pytest.raises(HarnessError) as exc_info:
        load(cfg, ws)
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- the same as an image folder

@pytest.mark.parametrize("seed, settings", [
    (0, {}),
    (1, {"val_fraction": 0.3}),
    (2, {"classes": ["emu", "cat"], "train_per_class": 2}),
    (0, {"classes": [2, 1], "test_per_class": 1}),
])
def test_csv_without_split_column_loads_as_the_image_folder(tmp_path, seed, settings):
    root = tmp_path / "imgs"
    make_folder(root)
    csv_file = write_csv(root / "labels.csv", ["file,label", *folder_rows(root)])
    from_csv = load(csv_cfg(csv_file, **settings), tmp_path / "ws", seed)
    from_folder = load(folder_cfg(root, **settings), tmp_path / "ws", seed)
    assert_same_dataset(from_csv, from_folder)
    assert len(from_csv.train.y) > 0 and len(from_csv.val.y) > 0 and len(from_csv.test.y) > 0


@pytest.mark.parametrize("parts", [("train", "val", "test"), ("train", "val")])
def test_split_column_loads_as_train_val_test_folders(tmp_path, parts):
    root = tmp_path / "imgs"
    counts = {"train": 5, "val": 2, "test": 3}
    for part in parts:
        make_folder(root / part, per_class=counts[part], classes=("a", "b"))
    said = {"train": "train", "val": "Valid ", "test": "TEST"}   # case and spaces do not matter
    lines = [f"{part}/{name}/{i}.png,{name},{said[part]}" for part in parts for name in ("a", "b")
             for i in range(counts[part])]
    random.Random(1).shuffle(lines)
    csv_file = write_csv(root / "labels.csv", ["fname,label,split", *lines])
    settings = {"classes": ["b", "a"], "train_per_class": 3, "val_fraction": 0.25}
    from_csv = load(csv_cfg(csv_file, **settings), tmp_path / "ws", seed=3)
    assert_same_dataset(from_csv, load(folder_cfg(root, **settings), tmp_path / "ws", seed=3))
    assert from_csv.val.y.bincount().tolist() == [2, 2]   # the listed valid rows, whole


def test_fastai_is_valid_column_is_found_and_read_as_booleans(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=8, classes=("a", "b"))
    flags = ["True", "false", "1", "0", "yes", "No", "FALSE", "False"]   # 3 valid, 5 train per class
    lines = [f"{name}/{i}.png,{name},{flags[i]}" for name in ("a", "b") for i in range(8)]
    csv_file = write_csv(root / "labels.csv", ["name,label,is_valid", *lines])
    ds = load(csv_cfg(csv_file, val_fraction=0.2), tmp_path / "ws")
    assert ds.val.y.bincount().tolist() == [3, 3]
    assert ds.test.y.bincount().tolist() == [1, 1] and ds.train.y.bincount().tolist() == [4, 4]
    valid_values = {(10 * c + i, i, c) for c in range(2) for i in (0, 2, 4)}   # make_folder's colours
    assert {tuple(x[:, 0, 0].tolist()) for x in ds.val.x} == valid_values


def test_valid_col_by_name_and_columns_by_name_or_position(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=4, classes=("a", "b"))
    lines = [f"{'valid' if i == 0 else 'train'},{name},{name}/{i}.png,ignored" for name in ("a", "b") for i in range(4)]
    csv_file = write_csv(root / "labels.csv", ["fold,label,path,note", *lines])
    by_name = load(csv_cfg(csv_file, fn_col="path", label_col="label", valid_col="fold"), tmp_path / "ws")
    by_position = load(csv_cfg(csv_file, fn_col=2, label_col=1, valid_col="fold"), tmp_path / "ws")
    assert_same_dataset(by_name, by_position)
    assert by_name.val.y.tolist() == [0, 1]
    # without valid_col the 'fold' column is not a split column: every row is in the train pool
    assert len(load(csv_cfg(csv_file, fn_col=2), tmp_path / "ws").val.y) == 2   # carved by val_fraction 0.2


def test_paths_relative_to_the_csv_folder_or_absolute(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    lines = [f"{'../imgs/' if i % 2 else str(root) + '/'}{name}/{i}.png,{name}"
             for name in CLASSES for i in range(6)]
    csv_file = write_csv(tmp_path / "meta" / "labels.csv", ["file,label", *lines])
    assert_same_dataset(load(csv_cfg(csv_file), tmp_path / "ws"), load(folder_cfg(root), tmp_path / "ws"))


def test_labels_are_strings_sorted_as_strings(tmp_path):
    root = tmp_path / "imgs"
    labels = ("10", "2", "007")
    make_folder(root, per_class=2, classes=labels)
    csv_file = write_csv(root / "labels.csv", ["file,label", *folder_rows(root, labels, 2)])
    assert data.class_names(csv_cfg(csv_file)) == ["007", "10", "2"]   # as folders named so sort
    assert data.class_names(csv_cfg(csv_file, classes=["2", "10"])) == ["2", "10"]


# ---------------------------------------------------------------- bad input, one line each

def _images(tmp_path: Path) -> Path:
    make_folder(tmp_path / "imgs", per_class=2, classes=("a", "b"))
    return tmp_path / "imgs"


GOOD = ["file,label", "a/0.png,a", "a/1.png,a", "b/0.png,b", "b/1.png,b"]


def _case(lines: list[str] | None = None, expect: str = "", **settings):
    return pytest.param(lines, settings, expect)


BAD = [
    _case(GOOD, "data.label_delim: multi-label CSVs are not supported yet (single-label only)", label_delim=" "),
    _case(GOOD, "data.root: not used by dataset csv (image paths are relative to data.csv's folder); remove it",
          root="somewhere"),
    _case([], "data.csv: {csv} is empty (expected a header line, then a line per image)"),
    _case(["file,label", "", "  ,  "], "data.csv: {csv} has a header but no rows"),
    _case(["file,label", "a/0.png,a", "a/1.png,a,extra"], "data.csv: {csv}, line 3: 3 fields, the header has 2"),
    _case(["file,label", "a/0.png,a", '"b/0.png,b'], "data.csv: {csv}, line 3: 1 field, the header has 2"),
    _case(["a/0.png,a", "b/0.png,b"], "data.csv: {csv}: line 1 looks like data ('a/0.png'); "
                                      "the CSV needs a header line naming its columns"),
    _case(GOOD, "data.fn_col: no column 'image' in {csv} (its columns: 'file', 'label')", fn_col="image"),
    _case(GOOD, "data.label_col: column 2 is out of range: {csv} has 2 columns (0..1: 'file', 'label')", label_col=2),
    _case(GOOD, "data.valid_col: no column 'is_val' in {csv} (its columns: 'file', 'label')", valid_col="is_val"),
    _case(GOOD, "data.label_col: column 'file' is also data.fn_col (the image paths)", label_col=0),
    _case(["file,label,is_valid,split", "a/0.png,a,0,train"],
          "data.valid_col: {csv} has both an 'is_valid' and a 'split' column; set data.valid_col to the one to use"),
    _case([*GOOD, ",b"], "data.csv: {csv}, line 6: empty image path (column 'file')"),
    _case([*GOOD[:3], "b/0.png,", *GOOD[4:]], "data.csv: {csv}, line 4: empty label (column 'label')"),
    _case([*GOOD, "b/7.png,b"], "data.csv: {csv}, line 6: image {root}/b/7.png does not exist"),
    _case([*GOOD, "b,b"], "data.csv: {csv}, line 6: image {root}/b is not a file"),
    _case([*GOOD, "./a/1.png,b"], "data.csv: {csv}, lines 3 and 6 both list {root}/a/1.png"),
    _case(["file,label,split", "a/0.png,a,train", "b/0.png,b,tset"],
          "data.csv: {csv}, line 3: 'tset' in split column 'split' is not a split "
          "(train, valid or test; or is_valid's true/false, 1/0, yes/no)"),
    _case(["file,label,is_valid", "a/0.png,a,False", "b/0.png,b,False", "b/1.png,c,True"],
          "data.csv: {csv}, line 4: class 'c' is in the valid split but has no train rows"),
    _case(["file,species", "a/0.png,a", "a/1.png,a"],
          "data.label_col: column 'species' of {csv} has only one class ('a' in train); a classifier needs at least 2"),
    _case(["file,label,split", "a/0.png,a,valid", "b/0.png,b,test"],
          "data.csv: {csv} has no train rows (its split column marks every row valid or test)"),
]


@pytest.mark.parametrize("lines, settings, expect", BAD)
def test_bad_csv_is_one_line_naming_the_field_line_or_column(tmp_path, lines, settings, expect):
    root = _images(tmp_path)
    csv_file = root / "labels.csv"
    csv_file.write_text("".join(f"{line}\n" for line in lines))
    cfg = csv_cfg(csv_file, **settings)
    assert message(cfg, tmp_path / "ws") == expect.format(csv=csv_file, root=root)
    assert not (tmp_path / "ws").exists()   # refused before anything is written


def test_unreadable_csv_files_name_the_file(tmp_path):
    root = _images(tmp_path)
    missing = root / "nope.csv"
    assert message(csv_cfg(missing), tmp_path / "ws") == f"data.csv: {missing} does not exist"
    assert message(csv_cfg(root), tmp_path / "ws") == f"data.csv: {root} is a directory, not a CSV file"
    binary = root / "a" / "0.png"
    assert message(csv_cfg(binary), tmp_path / "ws") == f"data.csv: {binary} is not a CSV file (not UTF-8 text)"
    huge = write_csv(root / "huge.csv", ["file,label", "a/0.png," + "a" * 200_000])
    assert message(csv_cfg(huge), tmp_path / "ws") == \
        f"data.csv: {huge} is not a valid CSV (line 2: field larger than field limit (131072))"


def test_corrupt_image_names_data_csv_and_the_file(tmp_path):
    root = _images(tmp_path)
    (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    csv_file = write_csv(root / "labels.csv", GOOD)
    assert message(csv_cfg(csv_file), tmp_path / "ws").startswith(f"data.csv: cannot read image {root}/b/1.png: ")


def test_harness_train_on_a_bad_csv_exits_2_with_one_line_and_writes_nothing(tmp_path):
    root = _images(tmp_path)
    csv_file = write_csv(root / "labels.csv", [*GOOD, "b/9.png,b"])
    recipe = full_recipe(root)
    recipe["data"] = {**recipe["data"], "dataset": "csv", "root": None, "csv": str(csv_file)}
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    before = listing(tmp_path)
    result = CliRunner().invoke(main, ["train", str(recipe_file), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.splitlines() == [f"error: data.csv: {csv_file}, line 6: image {root}/b/9.png does not exist"]
    assert_no_store_written(before, listing(tmp_path), "ws")


# ---------------------------------------------------------------- the decoded-data cache

def test_cache_reused_and_invalidated_when_the_csv_or_an_image_changes(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    make_folder(root, per_class=3)
    csv_file = write_csv(root / "labels.csv", ["file,label", *folder_rows(root, per_class=3)])
    cfg = csv_cfg(csv_file, val_fraction=0.0)
    first = load(cfg, tmp_path / "ws")
    assert len(list((tmp_path / "ws" / "cache").glob("csv-8px-*.npy"))) == 1

    real_decode, calls = folders.decode_imagefolder, []
    monkeypatch.setattr(folders, "decode_imagefolder", lambda *args: calls.append(1) or real_decode(*args))
    monkeypatch.setattr(cache, "_MEMORY_CACHE", {})
    assert_same_dataset(load(cfg, tmp_path / "ws"), first)
    assert calls == []   # from the disk cache

    text = csv_file.read_text()
    csv_file.write_text(text.replace("cat/0.png,cat", "cat/0.png,dog"))   # one image relabelled
    relabelled = load(cfg, tmp_path / "ws")
    assert calls == [1]
    assert relabelled.train.y.bincount().tolist() == [2, 4, 3]
    save_image(root / "dog" / "1.png", (250, 250, 250))   # an image rewritten, the CSV unchanged
    assert not torch.equal(load(cfg, tmp_path / "ws").train.x, relabelled.train.x)
    assert calls == [1, 1]


# ---------------------------------------------------------------- a sweep's validation split

def test_a_sweep_with_val_fraction_0_needs_valid_rows_in_the_csv(tmp_path):
    from harness.sweep.study import load_study
    root = _images(tmp_path)
    study = {"name": "csv", "recipe": {"data": {"dataset": "csv", "csv": str(root / "labels.csv"), "val_fraction": 0}},
             "budget": {"epochs": 2}, "strategies": {"naive": None}}
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(study))
    write_csv(root / "labels.csv", ["file,label,is_valid", "a/0.png,a,0", "a/1.png,a,1", "b/0.png,b,0", "b/1.png,b,1"])
    assert load_study(study_file).base["data"]["val_fraction"] == 0   # the valid rows are the val split
    write_csv(root / "labels.csv", GOOD)
    with pytest.raises(HarnessError, match="recipe.data.val_fraction: a sweep needs a validation split"):
        load_study(study_file)
