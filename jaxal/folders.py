"""Image datasets on disk -- a folder, or a .tar / .tar.gz / .tgz archive of one -- as uint8 arrays.

Layouts:

  classification  `train/<class>/<image>` and `test/<class>/<image>` -> `load_classification`.
                  Labels are int32 indices into the sorted class names; names that are all numbers
                  (0, 1, ..., 10) sort numerically. Files may sit deeper inside a class folder.
  segmentation    `train/`, `trainannot/`, `test/`, `testannot/`, optionally `val/` + `valannot/`
                  (SegNet's CamVid layout) -> `load_segmentation`. An image and its mask share their name
                  (the extension may differ: x.jpg and x.png). Masks are single-channel label images:
                  mode L or P give their values (P: the palette indices), 1-bit gives 0/1, 16-bit gives
                  int32; a colour (RGB) mask is an error.
  a pool          image files, flat or nested, named by their POSIX path relative to the root
                  -> `list_images`, `read_images`, `source_fingerprint`.

Both datasets may sit under wrapping folders (an archive of `cifar10/train/airplane/0001.jpg`): single
folders are entered until the layout's folders appear. Images are the files whose extension is in
IMAGE_EXTENSIONS; other files (README.txt, .DS_Store) and hidden files and folders (a name starting with
"." or "__MACOSX") are ignored.

Channels: C = 3 when any image of the dataset has colour (RGB, RGBA, palette, CMYK, ...: converted to RGB,
alpha dropped), else C = 1 (grey: 8-bit, 1-bit, grey + alpha, 16-bit scaled to 8 bits); in a colour
dataset the grey images are repeated over the 3 channels -- the richest mode wins. All images must have
one size unless `image_size` is given: then every image is resized to image_size x image_size (PIL
bilinear, antialiased when shrinking, uint8 -> uint8) and every mask with nearest neighbour, so no label
value is invented. The aspect ratio is not kept.

Files are decoded once: the arrays are cached as an .npz in `cache_dir`, else $JAXAL_CACHE_DIR, else
~/.cache/jaxal, keyed by the absolute path, `source_fingerprint` (an archive's size and mtime; a folder's
image file names, sizes and mtimes), `image_size` and FORMAT_VERSION; written to a temporary file and
renamed, so a killed run never leaves half a cache; an unreadable cache file is rebuilt. A changed source
gets a new entry (old ones are not deleted). An archive is read in one streaming pass, never extracted to
disk; the bytes of its image files (compressed, as stored) are held in memory while they are decoded.

Bad input raises ValueError naming the file or folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Collection, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "ARCHIVE_SUFFIXES",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "ClassificationImages",
    "SegmentationImages",
    "SegmentationSplit",
    "is_image_source",
    "list_images",
    "load_classification",
    "load_segmentation",
    "read_images",
    "source_fingerprint",
]

FORMAT_VERSION = 1  # bump when the cached arrays change meaning; old cache entries are then ignored
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CLASSIFICATION_LAYOUT = "train/<class>/<image files> and test/<class>/<image files>"
SEGMENTATION_LAYOUT = (
    "train/, trainannot/, test/, testannot/ (val/, valannot/ optional): images and their "
    "single-channel masks under the same file names"
)
SEGMENTATION_SPLITS = ("train", "val", "test")

_DECODE_CHUNK = 256  # files per thread-pool task: amortises the task overhead over many small images
_WORKERS = min(8, os.cpu_count() or 1)


# --- results ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationImages:
    x_train: np.ndarray  # (N, H, W, C) uint8
    y_train: np.ndarray  # (N,) int32, indices into class_names
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    train_files: tuple[str, ...]  # "train/<class>/<file>", relative to the dataset root, in x_train's order
    test_files: tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentationSplit:
    images: np.ndarray  # (N, H, W, C) uint8
    masks: np.ndarray  # (N, H, W) uint8 (int32 when a mask is 16-bit)
    names: tuple[str, ...]  # image files relative to the split's folder, in the order of images


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentationImages:
    train: SegmentationSplit
    val: SegmentationSplit | None  # None without val/ and valannot/
    test: SegmentationSplit
    mask_values: tuple[int, ...]  # the distinct mask values of all splits, sorted (classes and void)


# --- public functions ------------------------------------------------------------------------------


def is_image_source(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder or a file named like a tar archive: what this module reads."""
    return os.path.isdir(path) or _is_archive_name(os.fspath(path))


def load_classification(
    path: str | os.PathLike, *, image_size: int | None = None, cache_dir: str | os.PathLike | None = None
) -> ClassificationImages:
    """Reads `train/<class>/` and `test/<class>/` image files (see the module docstring)."""
    root = _existing_source(path)
    _check_image_size(image_size)
    build = functools.partial(_build_classification, root, image_size)
    arrays = _cached("classification", root, {"image_size": image_size}, build, cache_dir)
    return ClassificationImages(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
        _strings(arrays["class_names"]), _strings(arrays["train_files"]), _strings(arrays["test_files"]),
    )  # fmt: skip


def load_segmentation(
    path: str | os.PathLike, *, image_size: int | None = None, cache_dir: str | os.PathLike | None = None
) -> SegmentationImages:
    """Reads images and masks in the SegNet CamVid layout (see the module docstring)."""
    root = _existing_source(path)
    _check_image_size(image_size)
    build = functools.partial(_build_segmentation, root, image_size)
    arrays = _cached("segmentation", root, {"image_size": image_size}, build, cache_dir)
    splits = {
        split: SegmentationSplit(
            arrays[f"{split}_images"], arrays[f"{split}_masks"], _strings(arrays[f"{split}_names"])
        )
        for split in _strings(arrays["splits"])
    }
    mask_values = tuple(int(v) for v in arrays["mask_values"])
    return SegmentationImages(splits["train"], splits.get("val"), splits["test"], mask_values)


def list_images(root: str | os.PathLike) -> list[str]:
    """The image files under `root` (a folder or an archive), as sorted POSIX paths relative to it."""
    source = _existing_source(root)
    files = list(_scan(source, with_data=False).files)
    if not files:
        raise ValueError(f"{root} holds no image files (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def read_images(
    root: str | os.PathLike,
    relative_paths: Sequence[str],
    image_size: int | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """The images at `relative_paths` (as `list_images` names them) under `root`, in that order, as one
    uint8 array (N, H, W, C)."""
    source = _existing_source(root)
    _check_image_size(image_size)
    paths = [Path(p).as_posix() for p in relative_paths]
    if not paths:
        raise ValueError(f"no image paths given to read from {root}")
    params = {"image_size": image_size, "paths": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
    build = functools.partial(_build_pool, source, paths, image_size)
    return _cached("pool", source, params, build, cache_dir)["images"]


def decode_image(data: bytes, name: str, image_size: int | None = None) -> np.ndarray:
    """The image file in `data` as (H, W, 1) or (H, W, 3) uint8, resized to image_size when given;
    ValueError names `name` when it cannot be read."""
    _check_image_size(image_size)
    return _pixels(_open_image(data, name), name, image_size)


def stack_images(arrays: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """`decode_image` outputs as one (N, H, W, C) array (grey ones widened to RGB when some are in
    colour); ValueError when they differ in size, naming two."""
    stack = _Stack(len(arrays))
    for i, (array, name) in enumerate(zip(arrays, names)):
        stack.put(i, array, name)
    return stack.array


def source_fingerprint(path: str | os.PathLike) -> str:
    """A hex digest that changes when the source changes: of an archive's size and mtime, or of a
    folder's image file names, sizes and mtimes (a stat per file, no reading)."""
    root = _existing_source(path)
    if root.is_dir():
        files = _walk_folder(root)[0]
        entries = [(rel, *_size_and_mtime(os.path.join(root, rel))) for rel in files]
    else:
        entries = [(root.name, *_size_and_mtime(root))]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# --- sources: a folder or an archive seen as a tree of image files ---------------------------------


@dataclasses.dataclass(frozen=True)
class _Tree:
    """The image files and the folders of a source, as POSIX paths relative to its root."""

    files: tuple[str, ...]  # sorted
    dirs: frozenset[str]
    read: Callable[[str], bytes]
    describe: Callable[[str], str]  # a relative path as the user finds it, for messages

    def sub(self, folder: str) -> _Tree:
        prefix = folder + "/"
        n = len(prefix)
        return _Tree(
            tuple(f[n:] for f in self.files if f.startswith(prefix)),
            frozenset(d[n:] for d in self.dirs if d.startswith(prefix)),
            lambda rel: self.read(prefix + rel),
            lambda rel: self.describe(prefix + rel if rel else folder),
        )


def _existing_source(path: str | os.PathLike) -> Path:
    source = Path(path).expanduser()
    if not source.exists():
        raise ValueError(f"{path} does not exist")
    if not (source.is_dir() or _is_archive_name(source.name)):
        raise ValueError(f"{path} is neither a folder nor a {', '.join(ARCHIVE_SUFFIXES)} archive of one")
    return source.resolve()


def _is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _size_and_mtime(path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _scan(source: Path, *, with_data: bool = True) -> _Tree:
    return _scan_folder(source) if source.is_dir() else _scan_archive(source, with_data)


def _walk_folder(root: Path) -> tuple[list[str], set[str]]:
    """Sorted image files and all folders under `root`, hidden ones left out."""
    files, dirs = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not _is_hidden(d)]
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirs.update(prefix + d for d in subfolders)
        files.extend(prefix + f for f in names if not _is_hidden(f) and _is_image_name(f))
    return sorted(files), dirs


def _scan_folder(root: Path) -> _Tree:
    files, dirs = _walk_folder(root)
    return _Tree(
        tuple(files), frozenset(dirs), lambda rel: (root / rel).read_bytes(), lambda rel: str(root / rel)
    )


def _scan_archive(archive: Path, with_data: bool) -> _Tree:
    """One streaming pass over the archive (random access into a .tar.gz would decompress again and
    again), keeping the bytes of its image files."""
    data: dict[str, bytes | None] = {}
    dirs = set()
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = posixpath.normpath(member.name).lstrip("/")  # "./train/x.png" -> "train/x.png"
                if any(_is_hidden(part) for part in name.split("/")):
                    continue
                if member.isdir():
                    dirs.add(name)
                elif member.isfile() and _is_image_name(name):
                    data[name] = tar.extractfile(member).read() if with_data else None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"cannot read the archive {archive}: {e}") from e
    for name in data:  # archives need not list a file's folders as members
        parts = name.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))

    def describe(rel: str) -> str:
        return f"{rel} in {archive}" if rel else str(archive)

    return _Tree(tuple(sorted(data)), frozenset(dirs), data.__getitem__, describe)


def _top_level(tree: _Tree) -> tuple[set[str], list[str]]:
    """The folders and the image files directly at the tree's root."""
    folders = {d.split("/", 1)[0] for d in tree.dirs}
    folders.update(f.split("/", 1)[0] for f in tree.files if "/" in f)
    return folders, [f for f in tree.files if "/" not in f]


def _enter_wrapping_folders(tree: _Tree, expected: Collection[str]) -> _Tree:
    """Enters single folders (an archive of cifar10/ holds cifar10/train/...) until one of the layout's
    `expected` folders, or anything besides one folder, is at the top."""
    while True:
        folders, files = _top_level(tree)
        if files or len(folders) != 1 or folders & set(expected):
            return tree
        tree = tree.sub(folders.pop())


def _require_folder(tree: _Tree, folder: str, layout: str) -> None:
    folders, _ = _top_level(tree)
    if folder not in folders:
        found = ", ".join(f + "/" for f in sorted(folders)[:10]) or "no folders"
        raise ValueError(f"{tree.describe('')} has no {folder}/ folder (it has {found}); expected {layout}")


# --- decoding --------------------------------------------------------------------------------------


def _read(tree: _Tree, rel: str) -> bytes:
    try:
        return tree.read(rel)
    except OSError as e:
        raise ValueError(f"cannot read {tree.describe(rel)}: {e}") from e


def _open_image(data: bytes, name: str) -> Image.Image:
    """The decoded image in `data`; the one place a file is decoded."""
    stream = io.BytesIO(data)
    try:
        image = Image.open(stream)
        image.load()
    except Exception as e:  # PIL's plugins raise many types (OSError, SyntaxError, struct.error, ...)
        # PIL names the stream it read (`<_io.BytesIO object at 0x...>`), which tells nobody anything.
        detail = str(e).replace(f" {stream!r}", "").replace(repr(stream), "the file")
        raise ValueError(f"cannot read the image {name}: {type(e).__name__}: {detail}") from e
    return image


def _as_8bit(image: Image.Image, name: str) -> Image.Image:
    """Mode L (grey) or RGB (anything with colour)."""
    if image.mode == "L":
        return image
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    if image.mode in ("I", "F"):
        raise ValueError(
            f"the image {name} has 32-bit pixels (mode {image.mode}), which have no one 8-bit scale; "
            "convert it to 8-bit grey or RGB"
        )
    return image.convert("RGB")


def _pixels(image: Image.Image, name: str, image_size: int | None) -> np.ndarray:
    """(H, W, 1) or (H, W, 3) uint8, resized bilinearly to image_size when given."""
    image = _as_8bit(image, name)
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def _labels(mask: Image.Image, name: str, image_size: int | None) -> np.ndarray:
    """(H, W) label values, uint8 (int32 for 16-bit masks), resized by nearest neighbour when asked."""
    if not (mask.mode in ("1", "L", "P", "I") or mask.mode.startswith("I;16")):
        raise ValueError(
            f"the mask {name} has mode {mask.mode} ({len(mask.getbands())} channels); masks must be "
            "single-channel label images (mode L or P: one class index per pixel); convert colour-coded "
            "masks to class indices first"
        )
    if image_size is not None and mask.size != (image_size, image_size):
        if mask.mode.startswith("I;16"):
            mask = mask.convert("I")
        mask = mask.resize((image_size, image_size), Image.Resampling.NEAREST)
    array = np.asarray(mask)
    return array.astype(np.uint8 if array.dtype.itemsize == 1 else np.int32)  # bool (mode 1) -> 0/1


def _size_text(image: Image.Image) -> str:
    return f"{image.height}x{image.width}"


def _decode_image_file(tree: _Tree, rel: str, image_size: int | None) -> tuple[np.ndarray]:
    name = tree.describe(rel)
    return (_pixels(_open_image(_read(tree, rel), name), name, image_size),)


def _decode_pair(
    tree: _Tree, image_rel: str, mask_rel: str, image_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    image_name, mask_name = tree.describe(image_rel), tree.describe(mask_rel)
    image = _open_image(_read(tree, image_rel), image_name)
    mask = _open_image(_read(tree, mask_rel), mask_name)
    if image.size != mask.size:
        raise ValueError(
            f"the mask {mask_name} is {_size_text(mask)} but its image {image_name} is {_size_text(image)} "
            "(height x width); a mask must have its image's size"
        )
    return _pixels(image, image_name, image_size), _labels(mask, mask_name, image_size)


class _Stack:
    """Arrays of one height and width, placed into one (N, H, W, ...) array allocated at the first.
    A later array with more channels (RGB after grey) or a wider dtype widens the whole stack, so the
    richest mode wins without holding a list of all the images."""

    def __init__(self, n: int):
        self.n, self.array, self.first_name = n, None, None

    def put(self, i: int, array: np.ndarray, name: str) -> None:
        if self.array is None:
            self.array, self.first_name = np.empty((self.n, *array.shape), array.dtype), name
        elif array.shape[:2] != self.array.shape[1:3]:
            (h0, w0), (h, w) = self.array.shape[1:3], array.shape[:2]
            raise ValueError(
                f"images differ in size: {self.first_name} is {h0}x{w0} and {name} is {h}x{w} (height x "
                "width); pass image_size (--image_size) to resize every image to one size"
            )
        if array.ndim == 3 and array.shape[2] > self.array.shape[3]:
            self.array = np.repeat(self.array, array.shape[2], axis=3)  # grey -> RGB
        if np.result_type(self.array, array) != self.array.dtype:
            self.array = self.array.astype(np.result_type(self.array, array))
        self.array[i] = array  # a grey image in an RGB stack broadcasts over the channels


def _decode_all(
    items: Sequence[tuple], decode: Callable[..., tuple[np.ndarray, ...]], names: Sequence[str]
) -> list[np.ndarray]:
    """`decode(*item)` for every item, in a thread pool (PIL releases the GIL while it decodes), each
    output stacked over the items; `names` name the items in messages."""
    stacks = None
    chunks = [items[i : i + _DECODE_CHUNK] for i in range(0, len(items), _DECODE_CHUNK)]
    with ThreadPoolExecutor(_WORKERS) as pool:
        try:
            i = 0
            for outputs in pool.map(lambda chunk: [decode(*item) for item in chunk], chunks):
                for output in outputs:
                    stacks = stacks or [_Stack(len(items)) for _ in output]
                    for stack, array in zip(stacks, output):
                        stack.put(i, array, names[i])
                    i += 1
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return [stack.array for stack in stacks]


# --- classification --------------------------------------------------------------------------------


def _sort_class_names(names: Collection[str]) -> list[str]:
    if all(name.isdecimal() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _class_files(tree: _Tree, split: str) -> dict[str, list[str]]:
    """{class name: its image files, relative to the tree} of a split's folder."""
    _require_folder(tree, split, CLASSIFICATION_LAYOUT)
    folder = tree.sub(split)
    classes, loose = _top_level(folder)
    expected = f"{split}/<class>/<image files>"
    if loose:
        raise ValueError(f"{folder.describe(loose[0])} is not inside a class folder; expected {expected}")
    if not classes:
        raise ValueError(f"{folder.describe('')} has no class subfolders; expected {expected}")
    files = {name: [] for name in classes}
    for rel in folder.files:
        name = rel.split("/", 1)[0]
        files[name].append(f"{split}/{rel}")
    empty = sorted(name for name, members in files.items() if not members)
    if empty:
        others = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"the class folder {folder.describe(empty[0])}{others} has no image files")
    return files


def _check_same_classes(tree: _Tree, files: dict[str, dict[str, list[str]]]) -> None:
    for split, other in (("train", "test"), ("test", "train")):
        missing = _sort_class_names(set(files[split]) - set(files[other]))
        if missing:
            raise ValueError(
                f"the class(es) {', '.join(missing)} of {tree.describe(split)} are missing from "
                f"{tree.describe(other)}; both splits need the same class folders"
            )


def _build_classification(root: Path, image_size: int | None) -> dict[str, np.ndarray]:
    tree = _enter_wrapping_folders(_scan(root), ("train", "test"))
    files = {split: _class_files(tree, split) for split in ("train", "test")}
    _check_same_classes(tree, files)
    class_names = _sort_class_names(files["train"])
    arrays = {"class_names": np.array(class_names)}
    paths = []
    for split in ("train", "test"):
        split_paths = [rel for name in class_names for rel in files[split][name]]
        counts = [len(files[split][name]) for name in class_names]
        arrays[f"y_{split}"] = np.repeat(np.arange(len(class_names), dtype=np.int32), counts)
        arrays[f"{split}_files"] = np.array(split_paths)
        paths += split_paths
    names = [tree.describe(rel) for rel in paths]
    (images,) = _decode_all([(tree, rel, image_size) for rel in paths], _decode_image_file, names)
    n_train = len(arrays["y_train"])
    return arrays | {"x_train": images[:n_train], "x_test": images[n_train:]}


# --- segmentation ----------------------------------------------------------------------------------


def _files_by_stem(tree: _Tree, folder: str) -> dict[str, str]:
    """{file name without extension: file, relative to `folder`} of the image files in `folder`."""
    by_stem = {}
    for rel in tree.sub(folder).files:
        stem = os.path.splitext(rel)[0]
        if stem in by_stem:
            first, second = tree.describe(f"{folder}/{by_stem[stem]}"), tree.describe(f"{folder}/{rel}")
            raise ValueError(
                f"{first} and {second} share the name; images and masks are paired by name, so each name "
                "must be unique in a folder"
            )
        by_stem[stem] = rel
    return by_stem


def _image_mask_pairs(tree: _Tree, split: str) -> list[tuple[str, str]]:
    """(image, mask) files of a split, relative to the tree, sorted by name."""
    annot = split + "annot"
    _require_folder(tree, split, SEGMENTATION_LAYOUT)
    _require_folder(tree, annot, SEGMENTATION_LAYOUT)
    images, masks = _files_by_stem(tree, split), _files_by_stem(tree, annot)
    if not images:
        raise ValueError(f"{tree.describe(split)} has no image files")
    for stem in sorted(images.keys() - masks.keys())[:1]:
        raise ValueError(
            f"the image {tree.describe(f'{split}/{images[stem]}')} has no mask in {tree.describe(annot)} "
            f"(a file named {stem}.<extension>)"
        )
    for stem in sorted(masks.keys() - images.keys())[:1]:
        mask = tree.describe(f"{annot}/{masks[stem]}")
        raise ValueError(f"the mask {mask} has no image in {tree.describe(split)}")
    return [(f"{split}/{images[stem]}", f"{annot}/{masks[stem]}") for stem in sorted(images)]


def _mask_values(masks: np.ndarray) -> np.ndarray:
    """The distinct values of all masks, one mask at a time (a bincount of all pixels at once would
    allocate 8 bytes per pixel)."""
    if masks.dtype == np.uint8:
        seen = np.zeros(256, bool)
        for mask in masks:
            seen |= np.bincount(mask.ravel(), minlength=256) > 0
        return np.flatnonzero(seen)
    return np.unique(np.concatenate([np.unique(mask) for mask in masks]))


def _build_segmentation(root: Path, image_size: int | None) -> dict[str, np.ndarray]:
    tree = _enter_wrapping_folders(_scan(root), ("train", "trainannot", "test", "testannot"))
    folders, _ = _top_level(tree)
    splits = [s for s in SEGMENTATION_SPLITS if s != "val" or folders & {"val", "valannot"}]
    pairs = {split: _image_mask_pairs(tree, split) for split in splits}
    items = [(tree, image, mask, image_size) for split in splits for image, mask in pairs[split]]
    images, masks = _decode_all(items, _decode_pair, [tree.describe(item[1]) for item in items])
    arrays, start = {"splits": np.array(splits), "mask_values": _mask_values(masks)}, 0
    for split in splits:
        stop = start + len(pairs[split])
        arrays[f"{split}_images"], arrays[f"{split}_masks"] = images[start:stop], masks[start:stop]
        arrays[f"{split}_names"] = np.array([image.split("/", 1)[1] for image, _ in pairs[split]])
        start = stop
    return arrays


# --- a pool of images ------------------------------------------------------------------------------


def _build_pool(source: Path, paths: Sequence[str], image_size: int | None) -> dict[str, np.ndarray]:
    tree = _scan(source)
    known = set(tree.files)
    missing = [p for p in paths if p not in known]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(paths)} paths are not image files in {source}, e.g. {missing[0]!r}"
        )
    items = [(tree, rel, image_size) for rel in paths]
    (images,) = _decode_all(items, _decode_image_file, [tree.describe(rel) for rel in paths])
    return {"images": images}


# --- the cache -------------------------------------------------------------------------------------


def _check_image_size(image_size) -> None:
    if image_size is not None and not (isinstance(image_size, (int, np.integer)) and image_size > 0):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def _strings(array: np.ndarray) -> tuple[str, ...]:
    return tuple(str(s) for s in array.tolist())


def _cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("JAXAL_CACHE_DIR") or Path.home() / ".cache" / "jaxal").expanduser()


def _cached(
    kind: str, source: Path, params: dict, build: Callable[[], dict[str, np.ndarray]], cache_dir
) -> dict[str, np.ndarray]:
    """`build()`'s arrays, read from the cache when an entry for this source as it is now exists."""
    key = json.dumps(
        {"kind": kind, "path": str(source), "source": source_fingerprint(source), "params": params,
         "version": FORMAT_VERSION},
        sort_keys=True,
    )  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name)
    file = _cache_folder(cache_dir) / f"{kind}-{stem}-{digest}.npz"
    arrays = _read_cache(file, key)
    if arrays is None:
        arrays = build()
        _write_cache(file, key, arrays)
    return arrays


def _read_cache(file: Path, key: str) -> dict[str, np.ndarray] | None:
    if not file.exists():
        return None
    try:
        with open(file, "rb") as f, np.load(f, allow_pickle=False) as npz:  # our handle: closed on errors too
            arrays = {name: npz[name] for name in npz.files}  # reads every member: CRCs are checked
        if arrays.pop("_key").item() == key:
            return arrays
        reason = "it belongs to another source"
    except Exception as e:  # any damage (truncation, bad CRC, not a zip): decode again
        reason = f"{type(e).__name__}: {e}"
    warnings.warn(f"ignoring the cache file {file} ({reason}); decoding the images again", stacklevel=4)
    return None


def _write_cache(file: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes to a temporary file and renames it: readers see the whole file or none. A cache that
    cannot be written costs a warning, not the load."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, _key=np.array(key), **arrays)
            os.replace(tmp, file)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"cannot write the image cache {file} ({e}); the next load decodes again", stacklevel=4)
