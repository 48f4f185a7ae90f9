"""Datasets as uint8 tensors (Fashion-MNIST, image folders, CSV files), seeded splits, and batches for the training loop.

One module per concern, input to batch; the public names are re-exported here
(`from harness.engine import data; data.load_dataset(...)`):

- sources.py   the recipe's input as a `Source` (what the cache keys, how to decode it, how big):
  fashion.py   Fashion-MNIST's IDX files: found (root, workspace, system copy, download), read;
  folders.py   image folders: scanned, fingerprinted, decoded once to one size; `load_folder`;
  csvfile.py   a CSV of image paths and labels: scanned into folders.py's layout, decoded alike;
  decode.py    image files to uint8 [C,S,S], in parallel over the cores, with a progress bar;
  rows.py      where decoded images go, block by block: the cache's .npy file, or memory;
- cache.py     the decoded dataset, kept in memory and in WORKSPACE/cache/ (memory-mapped .npy);
- plan.py      the memory plan: device or host residency, from the bytes needed and free;
- host_rows.py host-resident images (data.residency host): rows read per batch, one ahead;
- splits.py    `Split` / `Dataset`, the class subset, the seeded train/val split, a carved test split;
- load.py      `load_dataset`: all of the above, as a `Dataset` of CPU uint8 tensors;
- resize.py    shorter side to the size, centre crop (when decoding, and per batch on the device);
               `stored_size`: image_size / crop_pct, what evaluation resizes to before its crop;
- batches.py   on-device batches: shuffled (`train_batches`, in the order of `train_indices`)
               or in order (`eval_batches`), resized and normalised;
- augment.py   augmentation of a batch on the device, from the run's generator (flip, the
               random resized crop); fastai_aug.py and randaugment.py: `fastai`, `randaugment`.

Where the data path grows: a new kind of input is a module beside fashion.py and folders.py
plus a branch in sources.py (a list of image files decodes through `sources.layout_source`);
another decoder in decode.py; another cache format in cache.py and rows.py; a new
augmentation in augment.py (called from `train_batches`).
"""
from __future__ import annotations

from harness.engine.data.batches import (eval_batches, normalize, raw_images, steps_per_epoch, to_device,
                                         train_batches, train_indices)
from harness.engine.data.fashion import CLASS_NAMES_FASHION, SYSTEM_FASHION_DIR
from harness.engine.data.folders import IMAGE_EXTENSIONS, folder_name, load_folder
from harness.engine.data.load import class_names, load_dataset
from harness.engine.data.plan import MemoryPlan, plan_for
from harness.engine.data.splits import Dataset, Split
from harness.engine.input_stats import InputStats

__all__ = [
    "CLASS_NAMES_FASHION", "IMAGE_EXTENSIONS", "SYSTEM_FASHION_DIR", "Dataset", "InputStats", "MemoryPlan", "Split",
    "class_names", "eval_batches", "folder_name", "load_dataset", "load_folder", "normalize", "plan_for", "raw_images",
    "steps_per_epoch", "to_device", "train_batches", "train_indices",
]
