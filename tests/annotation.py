"""A small image pool and an annotator for the annotation-round tests (test_learner, test_query).

The pool holds real 8x8 scikit-learn digits of three classes, written as PNG files under nested
folders; the annotator labels the paths a round proposes by looking them up, and appends the rows to a
labels CSV, as a person would.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from jaxal.data import load_dataset

CLASS_NAMES = {0: "zero", 1: "one", 2: "two"}


def digit_pool(count: int = 60):
    """(ids, uint8 images (count, 8, 8, 1), class names) of digits 0, 1, 2, pixels scaled to 0..255."""
    data = load_dataset("digits")
    rows = np.flatnonzero(data.y_train < 3)[:count]
    images = (data.x_train[rows].astype(np.int32) * 255 // 16).astype(np.uint8)
    ids = [f"{'ab'[i % 2]}/img_{i:03d}.png" for i in range(count)]
    return ids, images, [CLASS_NAMES[int(y)] for y in data.y_train[rows]]


def write_pool(root: Path, count: int = 60) -> dict[str, str]:
    """Writes the pool's PNG files under `root`; returns {relative path: class name} (the truth)."""
    ids, images, names = digit_pool(count)
    for item, image in zip(ids, images):
        path = root / item
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(path)
    return dict(zip(ids, names))


def initial_labels(truth: dict[str, str], per_class: int = 4) -> list[tuple[str, str]]:
    rows, seen = [], {}
    for item, name in sorted(truth.items()):
        if seen.get(name, 0) < per_class:
            rows.append((item, name))
            seen[name] = seen.get(name, 0) + 1
    return rows


def write_labels(path: Path, rows, header: bool = True) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(["path", "label"])
        writer.writerows(rows)


def append_labels(path: Path, rows) -> None:
    with open(path, "a", newline="") as f:
        csv.writer(f).writerows(rows)


def read_to_label(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()} if directory.exists() else {}


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
