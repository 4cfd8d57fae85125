"""Datasets as in-memory NumPy arrays: train/test images NHWC float32 (normalised per channel) and
int32 labels.

Three sources, chosen by `name`:
  - "digits": scikit-learn's 8x8 digits, embedded in scikit-learn, so nothing is downloaded; the
    default for offline runs and tests. A fixed stratified 1347/450 split.
  - a tensorflow-datasets name (cifar10, cifar100, svhn_cropped, caltech101, mnist, fashion_mnist),
    read with `tfds.data_source`: random access to ArrayRecord files, no TensorFlow needed.
    Normalised with the published channel means/stds (ImageNet's for caltech101).
  - a path to an `.npz` file with arrays x_train, y_train, x_test, y_test: images (N, H, W, C) or
    (N, H, W) (one channel added), or feature vectors (N, D), stored as (N, 1, 1, D). Labels are class
    indices in [0, C); C = 1 + the largest label of either split. Normalised by the train split's
    per-channel mean/std.

`image_size` resizes every image to image_size x image_size (bilinear, aspect ratio not kept) before
normalisation; caltech101 defaults to 64 because its images vary in size.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

DATASETS: tuple[str, ...] = (
    "digits",
    "cifar10",
    "cifar100",
    "svhn_cropped",
    "caltech101",
    "mnist",
    "fashion_mnist",
)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
AUGMENTATIONS = ("none", "crop", "crop_flip")

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    mean: tuple[float, ...]  # of pixel values scaled to [0, 1]
    std: tuple[float, ...]
    augmentation: str
    default_model: str
    image_size: int | None = None  # default resize; None keeps the native size


# Flips are off for SVHN (a mirrored digit is a different glyph); MNIST-like data is not augmented.
_TFDS = {
    "cifar10": _TfdsSpec((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip", "resnet18"),
    "cifar100": _TfdsSpec((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip", "resnet18"),
    "svhn_cropped": _TfdsSpec((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "crop", "resnet18"),
    "caltech101": _TfdsSpec(*_IMAGENET, "crop_flip", "resnet18", image_size=64),
    "mnist": _TfdsSpec((0.1307,), (0.3081,), "none", "cnn"),
    "fashion_mnist": _TfdsSpec((0.2860,), (0.3530,), "none", "cnn"),
}


# eq=False: field-wise == on arrays is ambiguous (and would make the class unhashable).
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    x_train: np.ndarray  # (N, H, W, C) float32, normalised
    y_train: np.ndarray  # (N,) int32 in [0, num_classes)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augmentation: str  # "none", "crop" (random crop with padding) or "crop_flip" (+ horizontal flip)
    crop_padding: int  # pixels of padding for the random crop; 0 when augmentation is "none"
    default_model: str  # a key of `jaxal.models.MODELS`

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def load_dataset(
    name: str, *, data_dir: str | None = None, image_size: int | None = None, download: bool = True
) -> Dataset:
    """Loads `name` (see the module docstring) into memory.

    `data_dir` and `download` apply to tensorflow-datasets sources only (tfds's defaults:
    ~/tensorflow_datasets, download and prepare when missing).
    """
    if image_size is not None and not (isinstance(image_size, (int, np.integer)) and image_size > 0):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if name == "digits":
        x_train, y_train, x_test, y_test = _load_digits()
        x_train, x_test = _maybe_resize(x_train, image_size), _maybe_resize(x_test, image_size)
        mean, std = _channel_stats(x_train)
        return _make(name, x_train, y_train, x_test, y_test, 10, mean, std, "none", "cnn")
    if name in _TFDS:
        return _load_tfds(name, data_dir, image_size, download)
    if name.endswith(".npz") or os.path.exists(name):
        x_train, y_train, x_test, y_test = _check_arrays(_read_npz(name))
        x_train, x_test = _maybe_resize(x_train, image_size), _maybe_resize(x_test, image_size)
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        mean, std = _channel_stats(x_train)
        model = "mlp" if x_train.shape[1:3] == (1, 1) else "cnn"
        return _make(name, x_train, y_train, x_test, y_test, num_classes, mean, std, "none", model)
    raise ValueError(
        f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))} "
        f"or a path to an .npz file with {', '.join(NPZ_KEYS)}"
    )


def _make(name, x_train, y_train, x_test, y_test, num_classes, mean, std, augmentation, model) -> Dataset:
    """Normalises (in place, float32) and fills in the crop padding: 4 pixels at 32x32, scaled with size."""
    for x in (x_train, x_test):
        x -= np.asarray(mean, np.float32)
        x /= np.asarray(std, np.float32)
    padding = 0 if augmentation == "none" else max(1, x_train.shape[1] // 8)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, augmentation, padding, model)


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of NHWC images; a constant channel gets std 1, not a division by 0."""
    mean = x.mean(axis=(0, 1, 2), dtype=np.float64)
    std = x.std(axis=(0, 1, 2), dtype=np.float64)
    return mean, np.where(std > 0, std, 1.0)


def _resize(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of HWC images, possibly of different sizes, to (N, size, size, C)
    float32. PIL's float mode "F" works one channel at a time, on uint8 and float inputs alike."""
    out = np.empty((len(images), size, size, images[0].shape[-1]), np.float32)
    for i, image in enumerate(images):
        for c in range(image.shape[-1]):
            channel = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
            out[i, ..., c] = np.asarray(channel.resize((size, size), Image.Resampling.BILINEAR))
    return out


def _maybe_resize(x: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or x.shape[1:3] == (size, size):
        return x
    if x.shape[1:3] == (1, 1):
        raise ValueError("image_size cannot be used with feature vectors (arrays of shape (N, D))")
    return _resize(x, size)


# --- scikit-learn digits -------------------------------------------------------------------------


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
    y = digits.target.astype(np.int32)
    # Fixed seed and stratification: every run and every strategy sees the same split.
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=450, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


# --- tensorflow-datasets --------------------------------------------------------------------------


def _load_tfds(name: str, data_dir: str | None, image_size: int | None, download: bool) -> Dataset:
    spec = _TFDS[name]
    try:
        train, test = tfds.data_source(name, split=("train", "test"), data_dir=data_dir, download=download)
    except Exception as e:  # tfds's own errors here (e.g. about TFRECORD files) do not say "missing"
        where = data_dir or "the default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        raise RuntimeError(
            f"dataset {name!r} is not available in {where} and could not be "
            f"{'downloaded and prepared' if download else 'loaded (download=False)'} "
            f"(tfds raised {type(e).__name__}, shown above).\nOn a machine with internet access run\n"
            f"  python -c \"import tensorflow_datasets as tfds; tfds.data_source('{name}', data_dir='DIR')\"\n"
            "(preparing some datasets needs TensorFlow), copy DIR here and pass data_dir='DIR'"
            " (--data-dir DIR)."
        ) from e
    size = image_size or spec.image_size
    x_train, y_train = _read_split(train, size)
    x_test, y_test = _read_split(test, size)
    for x in (x_train, x_test):
        x /= 255.0  # the published means/stds are of pixels in [0, 1]
    num_classes = train.dataset_info.features["label"].num_classes
    return _make(
        name, x_train, y_train, x_test, y_test, num_classes,
        spec.mean, spec.std, spec.augmentation, spec.default_model,
    )  # fmt: skip


def _read_split(source, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Stacks a data source's uint8 `image`s (resized when `size` is set) and `label`s."""
    images, labels = [], np.empty(len(source), np.int32)
    for i in range(len(source)):  # source[i]: the mock of __getitems__ in tfds 4.9.10 is broken
        example = source[i]
        images.append(example["image"])
        labels[i] = example["label"]
    x = _resize(images, size) if size else np.stack(images).astype(np.float32)
    return x, labels


# --- user .npz files ------------------------------------------------------------------------------


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise ValueError(f"dataset file {path!r} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)  # never unpickle: a data file must not run code
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r} is not a valid .npz file ({type(e).__name__}: {e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} holds a single array, not an .npz archive with {', '.join(NPZ_KEYS)}")
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            have = ", ".join(archive.files) or "nothing"
            raise ValueError(f"{path!r} lacks the array(s) {', '.join(missing)} (it has: {have})")
        try:
            return {key: archive[key] for key in NPZ_KEYS}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path!r} is not a valid .npz file ({type(e).__name__}: {e})") from e


def _check_arrays(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validates user arrays; returns NHWC float32 images and int32 labels for train and test."""
    out = []
    for split in ("train", "test"):
        x = _as_images(arrays[f"x_{split}"], f"x_{split}")
        y = _as_labels(arrays[f"y_{split}"], f"y_{split}")
        if len(x) != len(y):
            raise ValueError(f"x_{split} has {len(x)} examples but y_{split} has {len(y)} labels")
        out += [x, y]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise ValueError(
            f"x_train and x_test have different image shapes: {out[0].shape[1:]} and {out[2].shape[1:]}"
        )
    return tuple(out)


def _as_images(x: np.ndarray, key: str) -> np.ndarray:
    if x.dtype.kind not in "iuf":
        raise ValueError(f"{key} must hold real numbers, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[:, None, None, :]  # feature vectors: one pixel with D channels
    elif x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4:
        raise ValueError(f"{key} must have shape (N, H, W, C), (N, H, W) or (N, D), got {x.shape}")
    if len(x) == 0 or x.size == 0:
        raise ValueError(f"{key} is empty (shape {x.shape})")
    x = x.astype(np.float32)  # a copy: normalisation happens in place
    if not np.isfinite(x).all():
        raise ValueError(f"{key} contains non-finite values (NaN or inf, or too large for float32)")
    return x


def _as_labels(y: np.ndarray, key: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # (N, 1), as Keras stores labels
    if y.ndim != 1:
        raise ValueError(f"{key} must be a 1-D array of class indices (not one-hot), got shape {y.shape}")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ValueError(f"{key} has non-integer labels; labels must be class indices 0, 1, ..., C-1")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{key} must hold integer class labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{key} has negative labels (min {y.min()}); labels must be in [0, num_classes)")
    if len(y) and y.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{key} has labels too large for int32 (max {y.max()})")
    return y.astype(np.int32)
