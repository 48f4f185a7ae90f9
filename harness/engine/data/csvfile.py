"""CSV datasets (`data.dataset: csv`): a CSV file of image paths and labels, scanned into the
same layout as an image folder (split name -> [(image file, class index)]) and decoded by
folders.py's `decode_imagefolder`, so class subsets, `train_per_class` and the seeded splits
behave exactly as they do for image folders.

The rules, each decided once here:
- the CSV has a header line; columns are picked by name or 0-based position (`data.fn_col`,
  default 0; `data.label_col`, default 1) and every value is read as text, stripped (a label
  `3` is the class "3"). Read with the standard csv module rather than pandas, so that every
  error can name the exact CSV line (line 1 is the header) and nothing is guessed (no index
  column, no NA values). Blank lines are skipped.
- image paths are relative to the CSV's folder (absolute ones are kept); every listed file
  must exist, and no path may be listed twice (however spelled: `a.png`, `./a.png`).
- class order: the train labels sorted as plain strings, as image folders sort their class
  folders by name ("10" before "2"; `data.classes` picks and orders a subset).
- the split column (`data.valid_col`; unset: a column named `is_valid` or `split`, if there is
  one) holds train / valid (or val, validation) / test, or fastai's booleans is_valid
  (true/false, 1/0, yes/no: true is valid), case-insensitive. Without one, the whole CSV is
  the train pool and is split as an image folder without val/ and test/ is; without test
  rows, test is carved off train as for an image folder without test/.
- within a split, images are ordered by class, then path (as an image folder lists them), so
  reordering the CSV's rows changes no split.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path
from typing import Any

from harness.engine.data import folders
from harness.engine.data.folders import Layout
from harness.errors import HarnessError

# a split column's values (lower-cased, stripped) -> the layout's split names
SPLIT_VALUES = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test",
                "true": "val", "false": "train", "1": "val", "0": "train", "yes": "val", "no": "train"}
AUTO_SPLIT_COLUMNS = ("is_valid", "split")   # used when data.valid_col is unset (fastai's CSVs)
_SPLIT_NAMES = {"train": "train", "val": "valid", "test": "test"}   # as a user's CSV says them

Row = tuple[int, Path, str, str, str]   # (CSV line, image file, label, split name, its absolute path)


def scan_csv(cfg: Any) -> tuple[Layout, list[str]]:
    """The CSV's images as an image folder's layout and class names (cfg: a validated
    recipe.DataConfig with dataset csv); any problem is one line naming the field, the
    CSV's line or column."""
    _refuse_unsupported(cfg)
    csv_path = Path(cfg.csv)
    header, records = _read(csv_path)
    fn = _column(header, cfg.fn_col, "data.fn_col", csv_path)
    label = _column(header, cfg.label_col, "data.label_col", csv_path)
    if fn == label:
        raise HarnessError(f"data.label_col: column {header[label]!r} is also data.fn_col (the image paths)")
    split = _split_column(header, cfg.valid_col, csv_path, (fn, label))
    if header[fn].lower().endswith(tuple(folders.IMAGE_EXTENSIONS)):
        raise HarnessError(f"data.csv: {csv_path}: line 1 looks like data ({header[fn]!r}); the CSV needs a "
                           f"header line naming its columns")
    rows = [_row(csv_path, line, fields, header, (fn, label, split)) for line, fields in records]
    _refuse_duplicates(csv_path, rows)
    return _layout(csv_path, rows, header[label])


def csv_identity(csv_file: str | Path, layout: Layout) -> str:
    """What the decoded-data cache is keyed by: the CSV's path and content hash, and the
    listed images' fingerprint (path, size, mtime): an edit to any of them decodes again."""
    path = Path(csv_file)
    return f"{path.resolve()}|{hashlib.sha256(path.read_bytes()).hexdigest()}|{folders.fingerprint(layout)}"


def decode_csv(layout: Layout, names: list[str], image_size: int, rows: Any) -> dict[str, Any]:
    """Decode as an image folder is decoded (into `rows`); an unreadable image names data.csv, not data.root."""
    try:
        return folders.decode_imagefolder(layout, names, image_size, rows)
    except HarnessError as exc:
        message = str(exc)
        if message.startswith("data.root: "):
            raise HarnessError(f"data.csv: {message.removeprefix('data.root: ')}") from None
        raise


def _refuse_unsupported(cfg: Any) -> None:
    if cfg.label_delim is not None:
        raise HarnessError("data.label_delim: multi-label CSVs are not supported yet (single-label only)")
    if cfg.root is not None:
        raise HarnessError("data.root: not used by dataset csv (image paths are relative to data.csv's "
                           "folder); remove it")


def _read(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header names, [(line number, fields)] of the non-blank data lines); a file that is not
    a readable CSV is one line naming it."""
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise HarnessError(f"data.csv: {csv_path} does not exist") from None
    except IsADirectoryError:
        raise HarnessError(f"data.csv: {csv_path} is a directory, not a CSV file") from None
    except OSError as exc:
        raise HarnessError(f"data.csv: cannot read {csv_path} ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise HarnessError(f"data.csv: {csv_path} is not a CSV file (not UTF-8 text)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue   # a blank line
            if header is None:
                header = [f.strip() for f in fields]
                continue
            if len(fields) != len(header):
                raise HarnessError(f"data.csv: {csv_path}, line {reader.line_num}: {len(fields)} field"
                                   f"{'s' if len(fields) > 1 else ''}, the header has {len(header)}")
            records.append((reader.line_num, [f.strip() for f in fields]))
    except csv.Error as exc:
        raise HarnessError(f"data.csv: {csv_path} is not a valid CSV (line {reader.line_num}: {exc})") from None
    if header is None:
        raise HarnessError(f"data.csv: {csv_path} is empty (expected a header line, then a line per image)")
    if not records:
        raise HarnessError(f"data.csv: {csv_path} has a header but no rows")
    return header, records


def _column(header: list[str], wanted: int | str, field: str, csv_path: Path) -> int:
    """The position of a column given by name or 0-based position."""
    listed = ", ".join(repr(h) for h in header)
    if isinstance(wanted, int):
        if not 0 <= wanted < len(header):
            raise HarnessError(f"{field}: column {wanted} is out of range: {csv_path} has {len(header)} "
                               f"columns (0..{len(header) - 1}: {listed})")
        return wanted
    found = [i for i, name in enumerate(header) if name == wanted.strip()]
    if not found:
        raise HarnessError(f"{field}: no column {wanted!r} in {csv_path} (its columns: {listed})")
    if len(found) > 1:
        raise HarnessError(f"{field}: {csv_path} has {len(found)} columns named {wanted!r}; give its position")
    return found[0]


def _split_column(header: list[str], valid_col: str | None, csv_path: Path, taken: tuple[int, int]) -> int | None:
    """data.valid_col's position; unset, the column named is_valid or split if there is one."""
    if valid_col is not None:
        position = _column(header, valid_col, "data.valid_col", csv_path)
        if position in taken:
            raise HarnessError(f"data.valid_col: column {valid_col!r} is also data.fn_col or data.label_col")
        return position
    found = [i for i, name in enumerate(header) if name in AUTO_SPLIT_COLUMNS and i not in taken]
    if len(found) > 1:
        raise HarnessError(f"data.valid_col: {csv_path} has both an 'is_valid' and a 'split' column; "
                           f"set data.valid_col to the one to use")
    return found[0] if found else None


def _row(csv_path: Path, line: int, fields: list[str], header: list[str], columns: tuple) -> Row:
    """One data line as a `Row`; its problems name the line."""
    fn, label, split = columns
    where = f"data.csv: {csv_path}, line {line}"
    if not fields[fn]:
        raise HarnessError(f"{where}: empty image path (column {header[fn]!r})")
    if not fields[label]:
        raise HarnessError(f"{where}: empty label (column {header[label]!r})")
    image = csv_path.parent / fields[fn]   # an absolute path stays as it is
    if not image.is_file():
        raise HarnessError(f"{where}: image {image} {'is not a file' if image.exists() else 'does not exist'}")
    part = "train"
    if split is not None:
        value = fields[split]
        part = SPLIT_VALUES.get(value.lower(), "")
        if not part:
            raise HarnessError(f"{where}: {value!r} in split column {header[split]!r} is not a split "
                               f"(train, valid or test; or is_valid's true/false, 1/0, yes/no)")
    return line, image, fields[label], part, os.path.abspath(image)   # '..' folded, no link followed


def _refuse_duplicates(csv_path: Path, rows: list[Row]) -> None:
    """An image listed twice would be counted twice, maybe in two splits: refused."""
    first_line: dict[str, int] = {}
    for line, image, _, _, absolute in rows:
        if absolute in first_line:
            raise HarnessError(f"data.csv: {csv_path}, lines {first_line[absolute]} and {line} both list {image}")
        first_line[absolute] = line


def _layout(csv_path: Path, rows: list[Row], label_column: str) -> tuple[Layout, list[str]]:
    """The rows as an image folder's layout: the classes are the train labels, sorted."""
    names = sorted({label for _, _, label, part, _ in rows if part == "train"})
    if not names:
        raise HarnessError(f"data.csv: {csv_path} has no train rows (its split column marks every row "
                           f"valid or test)")
    if len(names) == 1:
        raise HarnessError(f"data.label_col: column {label_column!r} of {csv_path} has only one class "
                           f"({names[0]!r} in train); a classifier needs at least 2")
    index = {name: i for i, name in enumerate(names)}
    keyed: dict[str, list[tuple[tuple, Path, int]]] = {}
    for line, image, label, part, absolute in rows:
        if label not in index:
            raise HarnessError(f"data.csv: {csv_path}, line {line}: class {label!r} is in the "
                               f"{_SPLIT_NAMES[part]} split but has no train rows")
        # class, then path part by part (however the CSV spells it), as an image folder lists
        # its files: the CSV's row order changes nothing
        keyed.setdefault(part, []).append(((index[label], absolute.split(os.sep)), image, index[label]))
    return {part: [(image, label) for _, image, label in sorted(keyed[part], key=lambda item: item[0])]
            for part in ("train", "val", "test") if part in keyed}, names
