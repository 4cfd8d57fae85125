"""Volumes: real-valued 3-D densities (cryo-ET subtomograms) as datasets of shape (N, D, H, W, 1).

Sources (`load_volumes`, dispatched from `jaxal.data.load_dataset`):
  - a folder with `train/<class>/` and `test/<class>/` MRC files (.mrc, .rec, .map);
  - a CSV of `path,label` rows (a header `path,label` optional; paths relative to the CSV's folder or
    absolute), the way cryo-ET picks usually come: a fixed stratified 20% (seed 0) is held out as the test
    split, the rest is the pool; a third column `split` (train/test) chooses instead when present;
  - an `.npz` with x_train, y_train, x_test, y_test where the x arrays are 5-D (N, D, H, W, C) of reals
    (each channel of each volume normalised as below).

MRC files are read with `mrcfile` (memory-mapped, so a large tomogram is not read whole): modes 0 (int8),
1 (int16), 2 (float32), 6 (uint16) and 12 (float16), either byte order (from the header's machine stamp),
the data's [z, y, x] axis order kept as (D, H, W), the voxel size in angstrom from the header (cell size /
grid size; all files of a dataset must agree, a difference is warned about, as it usually means mixed
magnifications).

Per-volume normalisation: every volume is shifted and scaled to zero mean and unit variance (as AITom's
classifiers expect; a constant volume becomes zeros), in float64, then stored in float32 -- or float16 when
float32 would take more than `JAXAL_VOLUME_MEMORY` bytes (default 4 GiB). Volumes are written one at a time
into one array allocated once; when even the float16 array exceeds that budget it is a memory-mapped .npy
file in the cache folder ($JAXAL_CACHE_DIR or ~/.cache/jaxal), which the operating system pages in as
chunks are read (50000 volumes of 40^3 are 6.4 GB in float16): training batches and scored chunks are then
read from disk. A scored subset (--subset_size) is read into memory, so keep it to what fits.

Bad input -- a file that is not MRC (or not 3-D), volumes of different sizes, non-finite voxels, a CSV
row naming a missing file -- raises ValueError naming the file (the CLI turns it into exit status 2).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MRC_EXTENSIONS = (".mrc", ".rec", ".map")
MEMORY_ENV = "JAXAL_VOLUME_MEMORY"
DEFAULT_MEMORY = 4 * 2**30
DEFAULT_MODEL = "dsrf3d"
# Flips along the axes keep a single-axis tilt's missing wedge where real data has it (a wedge symmetric
# about the tilt axis maps to itself); arbitrary rotations would move it.
DEFAULT_AUGMENTATION = "flip"


def is_mrc_file(path) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in MRC_EXTENSIONS


def read_mrc(path, *, mmap: bool = True) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(volume [z, y, x] in the file's dtype, native byte order; voxel size (z, y, x) in angstrom) of an
    MRC file. `mmap`: map the file instead of reading it (the returned array is a copy in either case)."""
    import mrcfile

    path = os.fspath(path)
    try:
        opener = mrcfile.mmap if mmap else mrcfile.open
        with opener(path, mode="r", permissive=False) as mrc:  # not permissive: a bad header is an error
            data = np.asarray(mrc.data)
            voxel = mrc.voxel_size
            voxel_size = (float(voxel.z), float(voxel.y), float(voxel.x))
            data = data.astype(data.dtype.newbyteorder("="), copy=True)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable MRC file ({type(error).__name__}: {error})") from None
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"{path} holds an MRC array of shape {data.shape}; a volume needs 3 axes (z, y, x)")
    return data, voxel_size


def normalize_volume(volume: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (float64 arithmetic, float32 result); a constant volume becomes zeros."""
    v = np.asarray(volume, np.float64)
    std = v.std()
    return ((v - v.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def _memory_budget() -> int:
    text = os.environ.get(MEMORY_ENV)
    return int(float(text)) if text else DEFAULT_MEMORY


def _allocate(n: int, shape: tuple[int, ...], cache_dir=None, channels: int = 1) -> np.ndarray:
    """(n, *shape, channels): float32 in memory, float16 in memory, or a float16 memory-mapped .npy file,
    the first that fits the memory budget."""
    full = (n, *shape, channels)
    budget = _memory_budget()
    count = int(np.prod(full))
    if count * 4 <= budget:
        return np.empty(full, np.float32)
    if count * 2 <= budget:
        return np.empty(full, np.float16)
    folder = Path(cache_dir or os.environ.get("JAXAL_CACHE_DIR") or Path.home() / ".cache" / "jaxal")
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix="volumes-", suffix=".npy")
    os.close(fd)
    warnings.warn(f"{n} volumes of {'x'.join(map(str, shape))} take {count * 2 / 2**30:.3g} GiB in float16, more "
                  f"than ${MEMORY_ENV} ({budget / 2**30:.3g} GiB): they are memory-mapped from {name}", stacklevel=3)
    return np.lib.format.open_memmap(name, mode="w+", dtype=np.float16, shape=full)


def read_volumes(paths: Sequence, *, cache_dir=None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The MRC files at `paths`, normalised per volume, as one array (N, D, H, W, 1) (see the module
    docstring for its dtype and memory); and their voxel size. ValueError names the first bad file."""
    if not paths:
        raise ValueError("no MRC files to read")
    out, first_voxel = None, None
    for i, path in enumerate(paths):
        volume, voxel = read_mrc(path)
        if not np.all(np.isfinite(volume)):
            raise ValueError(f"{path} has {int(np.sum(~np.isfinite(volume)))} non-finite voxels (NaN or inf)")
        if out is None:
            out, first_voxel = _allocate(len(paths), volume.shape, cache_dir), voxel
        elif volume.shape != out.shape[1:4]:
            raise ValueError(f"{path} is a volume of {'x'.join(map(str, volume.shape))} (z x y x x) voxels but "
                             f"{paths[0]} is {'x'.join(map(str, out.shape[1:4]))}: all volumes must have one size "
                             "(crop or resample them first)")
        elif not np.allclose(voxel, first_voxel, rtol=1e-3):
            warnings.warn(f"{path} has voxel size {voxel} A but {paths[0]} has {first_voxel} A", stacklevel=2)
        out[i, ..., 0] = normalize_volume(volume)
    return out, first_voxel


def list_volumes(root) -> list[str]:
    """The MRC files under the folder `root`, as sorted POSIX paths relative to it (hidden files and
    folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder, f).relative_to(root).as_posix() for f in files
                  if is_mrc_file(f) and not f.startswith(".")]
    return sorted(found)


def is_volume_folder(path) -> bool:
    """A folder whose train/ split holds MRC files (the class-folder layout for volumes)."""
    train = Path(path) / "train"
    return train.is_dir() and any(is_mrc_file(f) for _, _, files in os.walk(train) for f in files)


def is_volume_source(name: str) -> bool:
    return (name.lower().endswith(".csv") and os.path.isfile(name)) or (os.path.isdir(name) and is_volume_folder(name))


def _folder_split(root: Path, split: str, classes: Optional[list[str]]) -> tuple[list[Path], list[str]]:
    folder = root / split
    if not folder.is_dir():
        raise ValueError(f"{root} has no {split}/ folder; the layout is train/<class>/*.mrc and test/<class>/*.mrc")
    paths, labels = [], []
    for item in list_volumes(folder):
        parts = item.split("/")
        if len(parts) != 2:
            raise ValueError(f"{folder / item} is not inside a class folder ({split}/<class>/<file>)")
        paths.append(folder / item)
        labels.append(parts[0])
    if not paths:
        raise ValueError(f"{folder} holds no MRC files ({', '.join(MRC_EXTENSIONS)})")
    return paths, labels


def read_label_csv(path) -> list[tuple[str, str, Optional[str]]]:
    """(path, label, split or None) rows of a `path,label[,split]` CSV (header optional)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise ValueError(f"{path}, row {number}: expected path,label[,split], got {','.join(row)!r}")
        if number == 1 and [c.lower() for c in cells[:2]] == ["path", "label"]:
            continue
        split = cells[2].lower() if len(cells) > 2 and cells[2] else None
        if split not in (None, "train", "test"):
            raise ValueError(f"{path}, row {number}: the split must be train or test, got {cells[2]!r}")
        rows.append((cells[0], cells[1], split))
    if not rows:
        raise ValueError(f"{path} has no path,label rows")
    return rows


def _csv_splits(csv_path: Path) -> tuple[list[Path], list[str], list[Path], list[str]]:
    rows = read_label_csv(csv_path)
    base = csv_path.parent
    paths = [Path(p) if Path(p).is_absolute() else base / p for p, _, _ in rows]
    for path, (given, _, _) in zip(paths, rows):
        if not path.is_file():
            raise ValueError(f"{csv_path} lists {given}, which is not a file ({path})")
    labels = [label for _, label, _ in rows]
    splits = [split for _, _, split in rows]
    if any(s is not None for s in splits):
        if any(s is None for s in splits):
            raise ValueError(f"{csv_path}: give a split (train/test) on every row or on none")
        test = np.array([s == "test" for s in splits])
    else:
        from sklearn.model_selection import train_test_split

        index = np.arange(len(rows))
        counts = np.unique(labels, return_counts=True)[1]
        stratify = labels if counts.min() >= 2 else None
        _, test_index = train_test_split(index, test_size=0.2, random_state=0, stratify=stratify)
        test = np.isin(index, test_index)
    pick = lambda values, mask: [v for v, m in zip(values, mask) if m]  # noqa: E731
    return pick(paths, ~test), pick(labels, ~test), pick(paths, test), pick(labels, test)


def volume_dataset(name: str, x_train, y_train, x_test, y_test, class_names: Sequence[str] = (),
                   num_classes: Optional[int] = None):
    """A `jaxal.data.Dataset` of volumes with their defaults: AITom's DSRF3D-v2, flips along the axes, no
    further normalisation on the device (the volumes are normalised one by one already)."""
    from jaxal.data import Dataset, Normalization

    for key, x in (("x_train", x_train), ("x_test", x_test)):
        if x.ndim != 5:
            raise ValueError(f"{key} of {name} must be volumes (N, D, H, W, C), got shape {x.shape}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name}: train volumes are {x_train.shape[1:]} but test volumes {x_test.shape[1:]}")
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(name, x_train, np.asarray(y_train, np.int32), x_test, np.asarray(y_test, np.int32), num_classes,
                   DEFAULT_AUGMENTATION, 0, DEFAULT_MODEL, Normalization(), tuple(class_names))


def _labeled(paths, labels, classes, cache_dir):
    x, _ = read_volumes(paths, cache_dir=cache_dir)
    index = {c: i for i, c in enumerate(classes)}
    return x, np.array([index[label] for label in labels], np.int32)


def load_volumes(name: str, *, cache_dir=None):
    """The volume dataset at `name`: a class-folder layout of MRC files or a path,label CSV (see the
    module docstring)."""
    source = Path(name)
    if source.is_dir():
        train_paths, train_labels = _folder_split(source, "train", None)
        test_paths, test_labels = _folder_split(source, "test", None)
        unknown = sorted(set(test_labels) - set(train_labels))
        if unknown:
            raise ValueError(f"{source}/test has classes with no train/ folder: {', '.join(unknown)}")
    else:
        train_paths, train_labels, test_paths, test_labels = _csv_splits(source)
        if not test_paths:
            raise ValueError(f"{source}: no row is in the test split")
    classes = sorted(set(train_labels) | set(test_labels))
    if len(classes) < 2:
        raise ValueError(f"{source} has {len(classes)} class(es); classification needs at least 2")
    x_train, y_train = _labeled(train_paths, train_labels, classes, cache_dir)
    x_test, y_test = _labeled(test_paths, test_labels, classes, cache_dir)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{test_paths[0]} is a volume of {x_test.shape[1:4]} voxels but {train_paths[0]} is "
                         f"{x_train.shape[1:4]}: all volumes must have one size")
    return volume_dataset(str(name), x_train, y_train, x_test, y_test, classes, len(classes))


def volumes_from_npz(name: str, arrays: dict):
    """A volume dataset from an .npz's x_train, y_train, x_test, y_test (x: (N, D, H, W, C) reals)."""
    from jaxal.data import _as_labels

    xs = {}
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.dtype.kind not in "iuf":
            raise ValueError(f"{name}: {key} must hold real numbers, got dtype {x.dtype}")
        if x.ndim != 5 or 0 in x.shape:
            raise ValueError(f"{name}: {key} must be volumes (N, D, H, W, C) like x_train, got {x.shape}")
        out = _allocate(len(x), x.shape[1:-1], channels=x.shape[-1])
        for i, volume in enumerate(x):
            if not np.all(np.isfinite(volume)):
                raise ValueError(f"{name}: {key}[{i}] holds non-finite values (NaN or inf)")
            for c in range(x.shape[-1]):
                out[i, ..., c] = normalize_volume(volume[..., c])
        xs[key] = out
    y_train, y_test = _as_labels(arrays["y_train"], "y_train"), _as_labels(arrays["y_test"], "y_test")
    for split, x, y in (("train", xs["x_train"], y_train), ("test", xs["x_test"], y_test)):
        if len(x) != len(y):
            raise ValueError(f"{name}: x_{split} has {len(x)} volumes but y_{split} has {len(y)} labels")
    return volume_dataset(name, xs["x_train"], y_train, xs["x_test"], y_test)


def central_slices(volumes: np.ndarray) -> np.ndarray:
    """(N, D, H, W, C) volumes -> (N, S, 3 * S + 2, 1) images: the central xy, xz and yz slices of each
    (the first channel), each zero-padded to S = max(D, H, W) and scaled to the volume's own range, side by
    side with a 1-pixel gap: what a contact sheet shows of a volume."""
    volumes = np.asarray(volumes, np.float32)[..., 0]
    n, d, h, w = volumes.shape
    side = max(d, h, w)
    out = np.zeros((n, side, 3 * side + 2, 1), np.float32)
    for i, v in enumerate(volumes):
        low, high = float(v.min()), float(v.max())
        v = (v - low) / max(high - low, 1e-12)
        for j, plane in enumerate((v[d // 2], v[:, h // 2], v[:, :, w // 2])):  # xy, xz, yz
            out[i, :plane.shape[0], j * (side + 1):j * (side + 1) + plane.shape[1], 0] = plane
    return out
