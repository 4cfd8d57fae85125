"""Object-detection datasets: images with boxes, at a fixed canvas, streamed from disk per batch.

Sources (`load_boxes(source)`):

  PASCAL VOC  a folder (or a .tar / .tar.gz archive of one, extracted once into the cache folder) with
              `Annotations/<id>.xml`, `JPEGImages/<id>.jpg` and `ImageSets/Main/<split>.txt`, possibly
              under wrapping folders (`VOCdevkit/VOC2012/...`, `bccd/...`). Default splits: train, val
              (None when there is no val.txt), test.
  COCO        a folder with `annotations/instances_<split>.json` and the images in `<split>/` (the JSON's
              `file_name`s are relative to it). Default splits: train2017, no val, val2017 as the test.
  tfds        "voc/2007", "voc/2012", "coco/2017", read with `tfds.data_source` (no TensorFlow). Their boxes
              are normalised [ymin, xmin, ymax, xmax]; their test splits have no boxes, so the defaults are
              train and validation (as the test split).

Coordinates: float32 x1, y1, x2, y2 in pixels of the CANVAS image, continuous (a box covering pixel
columns 0..9 is x1 = 0, x2 = 10). VOC's 1-based inclusive xmin..xmax becomes x1 = xmin - 1, x2 = xmax
(y alike) in the original image, then everything is multiplied by the image's `scale`. COCO's [x, y, w, h]
becomes x, y, x + w, y + h; tfds' normalised boxes are multiplied by the image's width and height.

Canvas: each image is resized keeping its aspect ratio (PIL bilinear) and padded with zeros at the bottom
and right. Landscape (w >= h) and portrait images get two canvases (buckets), so a portrait image is not
padded to a square. `canvas=(H, W)` (H <= W) bounds a landscape image by H x W and a portrait one by W x H
(mmdetection's img_scale=(1333, 800) is canvas=(800, 1333)); `canvas=L` scales the longer side to L and
makes each bucket as tall (wide) as its tallest (widest) scaled image. Canvas sides are rounded up to a
multiple of `size_divisor` (mmdetection's Pad(size_divisor=32)).

Boxes: each image's boxes are padded to `max_boxes` (None: the largest count of the dataset); class -1
marks padding. VOC's `difficult` flag is kept (evaluation ignores those boxes). An image without boxes is
a valid negative. COCO's crowd boxes (iscrowd=1) are not training labels, as in COCO: they are kept
apart (`BoxSplit.crowd`) for the evaluator, where pycocotools ignores the detections they cover. `BoxSplit.areas`
holds each box's area in original pixels for COCO's size ranges: COCO's annotated (mask) area where the
source gives one, else the box's. A box
with zero area as written (VOC xmax <= xmin or ymax <= ymin -- VOC's inclusive convention would read
xmin == xmax as one pixel, but such boxes are clicks, not objects; COCO w or h <= 0) or reaching outside
the image (VOC xmin < 1 or xmax > width; COCO beyond the image by more than one pixel, clipped when less)
is invalid: `on_invalid="drop"` drops it and counts it in `BoxSplit.dropped`, "error" refuses the dataset.

Images are not held in memory: `BoxSplit.read_images` decodes, resizes and pads on demand, and `batches`
does so in worker threads (grain), a few batches ahead. A dataset whose canvas images (all splits) fit in
`cache_bytes` keeps each image once decoded (uint8 at its canvas), so epochs after the first decode nothing.

Bad input raises ValueError naming the file: an XML that does not parse, an unknown class name, a missing
image file, an empty split, a box count over `max_boxes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import threading
import warnings
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from jaxal import folders

__all__ = [
    "TFDS_SOURCES",
    "BoxDataset",
    "BoxSplit",
    "batches",
    "load_boxes",
]

ON_INVALID = ("drop", "error")
# tfds name -> (train, val, test) splits read by default: their test splits have no boxes.
TFDS_SOURCES = {
    "voc/2007": ("train", "validation", "test"),
    "voc/2012": ("train", None, "validation"),
    "coco/2017": ("train", None, "validation"),
}
_VOC_DEFAULT_SPLITS = ("train", "val", "test")
_COCO_DEFAULT_SPLITS = ("train2017", None, "val2017")
_DEFAULT_CACHE_BYTES = 1 << 30
_WORKERS = min(8, os.cpu_count() or 1)
_COCO_CLIP_TOLERANCE = 1.0  # pixels: COCO's float boxes overshoot the border by rounding


# --- results ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Annotation:
    """One image as its source describes it, boxes in ORIGINAL pixels."""

    image_id: str
    height: int
    width: int
    boxes: np.ndarray  # float64 (M, 4) x1, y1, x2, y2
    classes: np.ndarray  # int32 (M,)
    difficult: np.ndarray  # bool (M,)
    crowd: np.ndarray  # float32 (K, 5): x1, y1, x2, y2, class of COCO's crowd regions
    dropped: int  # invalid boxes left out
    areas: np.ndarray | None = None  # float64 (M,): COCO's annotated (mask) areas; None: box areas


class _ImageReader:
    """Decodes a split's images at their canvas; keeps them when the split is cached."""

    def __init__(self, decode: Callable[[int], np.ndarray], cache: bool):
        self.decode = decode  # index -> uint8 (h, w, 3) original image
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.lock = threading.Lock()


@dataclasses.dataclass(frozen=True, eq=False)
class BoxSplit:
    image_ids: tuple[str, ...]  # file stem (VOC), COCO image id or tfds index, as str
    boxes: np.ndarray  # float32 (N, B, 4) canvas pixels
    classes: np.ndarray  # int32 (N, B), -1 = padding
    difficult: np.ndarray  # bool (N, B)
    scales: np.ndarray  # float32 (N,): canvas = original * scale
    original_sizes: np.ndarray  # int32 (N, 2): (height, width) of the file
    resized_sizes: np.ndarray  # int32 (N, 2): (height, width) of the image on its canvas, before padding
    buckets: np.ndarray  # int32 (N,): index into canvases
    canvases: tuple[tuple[int, int], ...]  # (H, W) per bucket (the dataset's)
    crowd: tuple[np.ndarray, ...]  # per image float32 (K, 5) crowd regions, ORIGINAL pixels + class
    areas: np.ndarray  # float32 (N, B): ORIGINAL-pixel areas for COCO's size ranges (COCO's annotated
    # areas -- of the masks -- where the source has them, else the boxes' w x h); 0 for padding
    dropped: int  # invalid boxes dropped (on_invalid="drop")
    num_classes: int  # the dataset's (a split need not hold every class)
    reader: _ImageReader = dataclasses.field(repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def num_boxes(self, indices=None) -> np.ndarray:
        """Real (non-padding) boxes per image, int32."""
        classes = self.classes if indices is None else self.classes[np.asarray(indices)]
        return (classes >= 0).sum(axis=1).astype(np.int32)

    def read_images(self, indices) -> np.ndarray:
        """uint8 (n, H, W, 3) at the canvas of their bucket (all `indices` must share one)."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        buckets = np.unique(self.buckets[indices])
        if len(buckets) > 1:
            raise ValueError(f"read_images takes the images of one bucket; these are in buckets {buckets.tolist()}")
        canvas = self.canvases[int(buckets[0])] if len(buckets) else (0, 0)
        out = np.zeros((len(indices), *canvas, 3), np.uint8)
        for row, i in enumerate(indices):
            image = self._resized(int(i))
            out[row, : image.shape[0], : image.shape[1]] = image
        return out

    def _resized(self, i: int) -> np.ndarray:
        cache = self.reader.cache
        if cache is not None and i in cache:
            return cache[i]
        h, w = (int(s) for s in self.resized_sizes[i])
        image = self.reader.decode(i)
        if image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
        if cache is not None:
            with self.reader.lock:
                cache[i] = image
        return image


@dataclasses.dataclass(frozen=True, eq=False)
class BoxDataset:
    name: str
    class_names: tuple[str, ...]
    canvases: tuple[tuple[int, int], ...]  # (H, W) per bucket: landscape first, then portrait (when present)
    train: BoxSplit
    val: BoxSplit | None
    test: BoxSplit

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in (self.train, self.val, self.test) if s is not None)

    def describe(self) -> str:
        """One line for a run's header: classes, images and boxes per split, canvases, dropped boxes."""
        splits = [(n, s) for n, s in (("train", self.train), ("val", self.val), ("test", self.test)) if s is not None]
        counts = ", ".join(f"{n} {len(s)} images / {int(s.num_boxes().sum())} boxes" for n, s in splits)
        canvases = " and ".join(f"{h}x{w}" for h, w in self.canvases)
        held = "cached in memory once decoded" if self.train.reader.cache is not None else "streamed from disk"
        return (f"{self.name}: {self.num_classes} classes; {counts}; canvas {canvases} (HxW); "
                f"{self.dropped} invalid boxes dropped; images {held}")


# --- loading ---------------------------------------------------------------------------------------


def load_boxes(
    source: str | os.PathLike,
    *,
    canvas: int | tuple[int, int],
    max_boxes: int | None = None,
    on_invalid: str = "drop",
    train_split: str | None = None,
    val_split: str | None = "default",
    test_split: str | None = None,
    class_names: Sequence[str] | None = None,
    size_divisor: int = 32,
    cache_bytes: int = _DEFAULT_CACHE_BYTES,
    data_dir: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> BoxDataset:
    """Reads the boxes of `source` (see the module docstring); images are decoded later, per batch.

    Splits default to the source's (None for `val_split` means no validation split). `class_names`
    fixes the classes (an annotation naming another is an error); without it VOC's are the names of the
    train split's boxes, sorted, and COCO's / tfds' come from the source. `cache_bytes`: a dataset whose
    canvas images (all splits together) fit keeps them in memory once decoded (0: never). `data_dir`: tfds' data_dir.
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    _check_canvas(canvas)
    if max_boxes is not None and not (isinstance(max_boxes, (int, np.integer)) and max_boxes >= 1):
        raise ValueError(f"max_boxes must be a positive integer, got {max_boxes!r}")
    name = str(source)
    if name in TFDS_SOURCES:
        defaults, read = TFDS_SOURCES[name], _tfds_reader(name, data_dir)
    else:
        root = _local_root(source, cache_dir)
        if (root / "Annotations").is_dir():
            defaults, read = _VOC_DEFAULT_SPLITS, _voc_reader(root, class_names)
        elif (root / "annotations").is_dir():
            defaults, read = _COCO_DEFAULT_SPLITS, _coco_reader(root, class_names)
        else:
            found = ", ".join(sorted(p.name + "/" for p in root.iterdir() if p.is_dir())[:10]) or "no folders"
            raise ValueError(
                f"{root} is neither a PASCAL VOC folder (Annotations/, JPEGImages/, ImageSets/Main/) nor a "
                f"COCO folder (annotations/instances_<split>.json, <split>/); it has {found}"
            )
    splits = (
        train_split or defaults[0],
        defaults[1] if val_split == "default" else val_split,
        test_split or defaults[2],
    )
    # train first: without `class_names` it decides the classes the other splits may use
    names, read_split = read(splits, on_invalid)
    annotated = [None if split is None else read_split(split) for split in splits]
    everything = [a for split in annotated if split is not None for a in split[0]]
    canvases, bucket_of = _canvases(everything, canvas, size_divisor)
    if max_boxes is None:
        max_boxes = max([len(a.classes) for a in everything] + [1])
    canvas_bytes = sum(3 * math.prod(canvases[bucket_of(a.height, a.width)]) for a in everything)
    cache = canvas_bytes <= cache_bytes
    built = [
        None if a is None
        else _split(a[0], a[1], canvas, canvases, bucket_of, max_boxes, cache, name, len(names))
        for a in annotated
    ]
    _warn_dropped(name, everything)
    return BoxDataset(name, tuple(names), canvases, built[0], built[1], built[2])


def _warn_dropped(name: str, anns: Sequence[_Annotation]) -> None:
    where = [a.image_id for a in anns if a.dropped]
    if where:
        count = sum(a.dropped for a in anns)
        shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
        warnings.warn(f"{name}: dropped {count} invalid box(es) (zero area or outside the image) of the images "
                      f"{shown}; on_invalid='error' (--boxes.on_invalid error) refuses them", stacklevel=3)


def _check_canvas(canvas) -> None:
    ok = (isinstance(canvas, (int, np.integer)) and canvas > 0) or (
        isinstance(canvas, (tuple, list)) and len(canvas) == 2
        and all(isinstance(c, (int, np.integer)) and c > 0 for c in canvas)
    )  # fmt: skip
    if not ok:
        raise ValueError(f"canvas must be a positive integer (the longer side) or (H, W), got {canvas!r}")


def _local_root(source, cache_dir) -> Path:
    """The folder of a VOC/COCO source, an archive extracted once into the cache folder; wrapping
    single folders (VOCdevkit/VOC2012, bccd) entered."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"{source} does not exist (expected a VOC or COCO folder, an archive of one, or one "
                         f"of the tfds names {', '.join(TFDS_SOURCES)})")
    if path.is_file():
        if not path.name.lower().endswith(folders.ARCHIVE_SUFFIXES):
            raise ValueError(f"{source} is neither a folder nor a {', '.join(folders.ARCHIVE_SUFFIXES)} archive")
        path = _extracted(path.resolve(), cache_dir)
    root = path.resolve()
    while True:
        children = [p for p in root.iterdir() if not folders._is_hidden(p.name)]
        layout = {"Annotations", "annotations", "JPEGImages", "ImageSets"}
        if len(children) == 1 and children[0].is_dir() and children[0].name not in layout:
            root = children[0]
        else:
            return root


def _extracted(archive: Path, cache_dir) -> Path:
    """The archive extracted into the cache folder, keyed by its path, size and mtime; extracted into a
    temporary folder and renamed, so a killed run never leaves half a tree."""
    key = f"{archive}|{folders.source_fingerprint(archive)}"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in archive.name)
    target = folders._cache_folder(cache_dir) / f"boxes-{stem}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                tar.extractall(partial, filter="data")  # no absolute paths, links out of the tree or devices
            else:
                tar.extractall(partial, members=_safe_members(tar, archive))
        os.replace(partial, target)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"cannot read the archive {archive}: {e}") from e
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _safe_members(tar: tarfile.TarFile, archive: Path):
    for member in tar:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise ValueError(f"{archive}: the member {member.name} is not a plain file inside the archive's tree")
        yield member


# --- PASCAL VOC ------------------------------------------------------------------------------------


def _voc_reader(root: Path, class_names):
    def read(splits, on_invalid):
        names = list(class_names) if class_names is not None else None
        if names is None:  # the train split's classes, sorted
            ids = _voc_ids(root, splits[0])
            found = set()
            for image_id in ids:
                found.update(obj[0] for obj in voc_objects(_voc_xml(root, image_id))[2])
            names = sorted(found)
            if not names:
                raise ValueError(f"the train split {root / 'ImageSets/Main' / (splits[0] + '.txt')} has no boxes, "
                                 "so it names no classes; pass class_names (--boxes.classes)")
            declared = False
        else:
            declared = True
        index = {n: i for i, n in enumerate(names)}

        def read_split(split):
            ids = _voc_ids(root, split)
            with ThreadPoolExecutor(_WORKERS) as pool:
                anns = list(pool.map(lambda i: _voc_annotation(root, i, index, on_invalid, declared), ids))
            files = [_voc_image_file(root, i) for i in ids]
            return anns, lambda i: _decode_file(files[i])

        return names, read_split

    return read


def _voc_ids(root: Path, split: str) -> list[str]:
    file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not file.is_file():
        there = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise ValueError(f"{file} does not exist: no split {split!r} (the splits here: {', '.join(there) or 'none'})")
    ids = [line.split()[0] for line in file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"the split {file} is empty")
    return ids


def _voc_xml(root: Path, image_id: str) -> tuple[Path, ElementTree.Element]:
    file = root / "Annotations" / f"{image_id}.xml"
    try:
        return file, ElementTree.parse(file).getroot()
    except FileNotFoundError:
        raise ValueError(f"{file} does not exist (the image {image_id!r} is listed in a split)") from None
    except (ElementTree.ParseError, OSError) as e:
        raise ValueError(f"cannot parse {file}: {e}") from e


def _voc_image_file(root: Path, image_id: str) -> Path:
    file = root / "JPEGImages" / f"{image_id}.jpg"
    if file.is_file():
        return file
    others = sorted((root / "JPEGImages").glob(f"{image_id}.*"))
    if others:
        return others[0]
    raise ValueError(f"the image file {file} of {root / 'Annotations' / (image_id + '.xml')} does not exist")


def voc_objects(parsed) -> tuple[Path, ElementTree.Element, list]:
    """(name, difficult, (xmin, ymin, xmax, ymax)) of each <object>, as written."""
    file, xml = parsed
    objects = []
    for obj in xml.iter("object"):
        try:
            name = obj.findtext("name").strip()
            bndbox = obj.find("bndbox")
            coords = tuple(float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int(obj.findtext("difficult") or 0) == 1
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{file}: an <object> lacks a <name> or a numeric <bndbox> "
                             f"(xmin, ymin, xmax, ymax): {e}") from e
        objects.append((name, difficult, coords))
    return file, xml, objects


def _voc_annotation(root: Path, image_id: str, index: dict, on_invalid: str, declared: bool) -> _Annotation:
    file, _, objects = voc_objects(_voc_xml(root, image_id))
    height, width = _image_size(_voc_image_file(root, image_id))
    boxes, classes, difficult, dropped = [], [], [], 0
    for name, diff, (xmin, ymin, xmax, ymax) in objects:
        if name not in index:
            where = "class_names" if declared else "the train split's classes"
            raise ValueError(f"{file}: unknown class name {name!r}, not in {where} ({', '.join(index)})")
        problem = None
        if xmax <= xmin or ymax <= ymin:
            problem = "has zero area"
        elif xmin < 1 or ymin < 1 or xmax > width or ymax > height:
            problem = f"reaches outside the {height}x{width} image (VOC coordinates are 1..width, 1..height)"
        if problem:
            if on_invalid == "error":
                raise ValueError(f"{file}: the {name} box (xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, "
                                 f"ymax {ymax:g}) {problem}; pass on_invalid='drop' (--boxes.on_invalid drop) "
                                 "to leave such boxes out")
            dropped += 1
            continue
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))  # 1-based inclusive -> continuous
        classes.append(index[name])
        difficult.append(diff)
    return _Annotation(image_id, height, width, np.asarray(boxes, np.float64).reshape(-1, 4),
                       np.asarray(classes, np.int32), np.asarray(difficult, bool), np.zeros((0, 5), np.float32),
                       dropped)


# --- COCO ------------------------------------------------------------------------------------------


def _coco_reader(root: Path, class_names):
    def read(splits, on_invalid):
        cache: dict[str, dict] = {}

        def load(split):
            if split not in cache:
                cache[split] = _coco_json(root, split)
            return cache[split]

        categories = load(splits[0]).get("categories") or []
        ids = sorted(int(c["id"]) for c in categories)
        by_id = {int(c["id"]): c["name"] for c in categories}
        names = [by_id[i] for i in ids]
        if class_names is not None:
            missing = sorted(set(names) - set(class_names))
            if missing:
                raise ValueError(f"{_coco_file(root, splits[0])}: unknown class names {missing}, not in class_names")
            names = list(class_names)
        index = {cid: names.index(by_id[cid]) for cid in ids}

        def read_split(split):
            data = load(split)
            file = _coco_file(root, split)
            anns, files = _coco_annotations(file, data, index, on_invalid, root / split)
            return anns, lambda i: _decode_file(files[i])

        return names, read_split

    return read


def _coco_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def _coco_json(root: Path, split: str) -> dict:
    file = _coco_file(root, split)
    if not file.is_file():
        there = sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
        found = ", ".join(there) or "no instances_*.json"
        raise ValueError(f"{file} does not exist: no split {split!r} (found {found})")
    try:
        data = json.loads(file.read_text())
        _ = data["images"], data["annotations"], data["categories"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot parse {file} as COCO instances (images, annotations, categories): {e}") from e
    return data


def _coco_annotations(file: Path, data: dict, index: dict, on_invalid: str, image_folder: Path):
    images = sorted(data["images"], key=lambda im: int(im["id"]))
    if not images:
        raise ValueError(f"the split {file} has no images")
    per_image: dict[int, list] = {int(im["id"]): [] for im in images}
    for ann in data["annotations"]:
        if int(ann["image_id"]) not in per_image:
            raise ValueError(f"{file}: annotation {ann.get('id')} refers to image_id {ann['image_id']}, not in images")
        per_image[int(ann["image_id"])].append(ann)
    anns, files = [], []
    for im in images:
        path = image_folder / im["file_name"]
        if not path.is_file():
            raise ValueError(f"the image file {path} of {file} (image id {im['id']}) does not exist")
        height, width = int(im["height"]), int(im["width"])
        boxes, classes, areas, crowd, dropped = [], [], [], [], 0
        for ann in per_image[int(im["id"])]:
            if int(ann["category_id"]) not in index:
                raise ValueError(f"{file}: annotation {ann.get('id')} has the unknown category_id {ann['category_id']}")
            x, y, w, h = (float(v) for v in ann["bbox"])
            x1, y1, x2, y2 = x, y, x + w, y + h
            tol = _COCO_CLIP_TOLERANCE
            problem = None
            if w <= 0 or h <= 0:
                problem = "has zero area"
            elif x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
                problem = f"reaches outside the {height}x{width} image"
            if problem:
                if on_invalid == "error":
                    raise ValueError(f"{file}: the box {ann['bbox']} of annotation {ann.get('id')} (image "
                                     f"{im['file_name']}) {problem}; pass on_invalid='drop' (--boxes.on_invalid drop)")
                dropped += 1
                continue
            box = (max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height))
            if ann.get("iscrowd", 0):
                crowd.append((*box, index[int(ann["category_id"])]))
            else:
                boxes.append(box)
                classes.append(index[int(ann["category_id"])])
                areas.append(float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
        anns.append(_Annotation(str(im["id"]), height, width, np.asarray(boxes, np.float64).reshape(-1, 4),
                                np.asarray(classes, np.int32), np.zeros(len(classes), bool),
                                np.asarray(crowd, np.float32).reshape(-1, 5), dropped, np.asarray(areas, np.float64)))
        files.append(path)
    return anns, files


# --- tensorflow-datasets ---------------------------------------------------------------------------


def _tfds_class_names(name: str, data_dir) -> list[str]:
    import tensorflow_datasets as tfds

    return list(tfds.builder(name, data_dir=data_dir).info.features["objects"]["label"].names)


def _tfds_reader(name: str, data_dir):
    def read(splits, on_invalid):
        try:
            import tensorflow_datasets as tfds  # only here: every other source works without it
        except ImportError:
            raise ValueError(f"{name} is read with tensorflow-datasets, which is not installed here: "
                             "pip install tensorflow-datasets (or pass a VOC or COCO folder)") from None
        try:
            names = _tfds_class_names(name, data_dir)
        except Exception as e:  # tfds raises many types; coco's builder imports TensorFlow
            raise RuntimeError(f"cannot open the tfds dataset {name} ({type(e).__name__}: {e}); "
                               f"{_TFDS_HINT.format(name=name)}") from e

        def read_split(split):
            try:  # SkipDecoding: the image bytes; their header gives the size without decoding the pixels
                source = tfds.data_source(name, split=split, data_dir=data_dir,
                                          decoders={"image": tfds.decode.SkipDecoding()})
            except Exception as e:
                raise RuntimeError(f"the split {split!r} of {name} is not available ({type(e).__name__}: {e}); "
                                   f"{_TFDS_HINT.format(name=name)}") from e
            if len(source) == 0:
                raise ValueError(f"the split {split!r} of {name} is empty")
            anns = [_tfds_annotation(name, split, i, source[i], on_invalid) for i in range(len(source))]
            return anns, lambda i: _tfds_pixels(source[i]["image"], f"{name} {split}[{i}]")

        return names, read_split

    return read


_TFDS_HINT = ("on a machine with internet access and TensorFlow run python -c \"import tensorflow_datasets as "
              "tfds; tfds.data_source('{name}', data_dir='DIR')\", copy DIR here and pass data_dir")


def _tfds_image(image, where: str) -> Image.Image | np.ndarray:
    """The encoded image opened (header read, pixels decoded later), or an already decoded array."""
    if isinstance(image, np.ndarray) and image.dtype.kind in "OS" and image.ndim == 0:
        image = image.item()  # SkipDecoding may hand the bytes over as a 0-d array
    if isinstance(image, (bytes, np.bytes_)):
        try:
            return Image.open(io.BytesIO(bytes(image)))
        except Exception as e:  # PIL raises many types for bytes it cannot identify
            raise ValueError(f"cannot read the image {where}: {type(e).__name__}: {e}") from e
    return np.asarray(image, np.uint8)


def _tfds_pixels(image, where: str) -> np.ndarray:
    opened = _tfds_image(image, where)
    if isinstance(opened, Image.Image):
        try:
            opened.load()
        except Exception as e:
            raise ValueError(f"cannot read the image {where}: {type(e).__name__}: {e}") from e
        return as_rgb(opened, where)
    return np.repeat(opened, 3, axis=2) if opened.ndim == 3 and opened.shape[2] == 1 else opened


def _tfds_annotation(name: str, split: str, i: int, example: dict, on_invalid: str) -> _Annotation:
    """voc/*: image/filename, objects {bbox, label, is_difficult}; coco/*: image/id, objects {bbox, label,
    is_crowd}. bbox: normalised [ymin, xmin, ymax, xmax]."""
    where = f"{name} {split}[{i}]"
    image = _tfds_image(example["image"], where)
    height, width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
    objects = example["objects"]
    bbox = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
    labels = np.asarray(objects["label"], np.int32).reshape(-1)
    difficult = np.asarray(objects.get("is_difficult", np.zeros(len(labels), bool)), bool).reshape(-1)
    crowd = np.asarray(objects.get("is_crowd", np.zeros(len(labels), bool)), bool).reshape(-1)
    if not len(bbox) == len(labels) == len(difficult) == len(crowd):
        raise ValueError(f"{where}: objects have {len(bbox)} boxes but {len(labels)} labels")
    boxes = bbox[:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float64)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    valid &= (bbox >= 0).all(axis=1) & (bbox <= 1).all(axis=1)
    if on_invalid == "error" and not valid.all():
        k = int(np.flatnonzero(~valid)[0])
        raise ValueError(f"{where}: the box {bbox[k].tolist()} (normalised ymin, xmin, ymax, xmax) has zero area "
                         "or reaches outside the image; pass on_invalid='drop' (--boxes.on_invalid drop)")
    keep, crowd_keep = valid & ~crowd, valid & crowd
    areas = np.asarray(objects["area"], np.float64).reshape(-1)[keep] if "area" in objects else None
    image_id = example.get("image/filename", example.get("image/id", i))
    image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
    return _Annotation(
        os.path.splitext(image_id)[0], int(height), int(width), boxes[keep], labels[keep], difficult[keep],
        np.concatenate([boxes[crowd_keep], labels[crowd_keep, None]], axis=1).astype(np.float32),
        int((~valid).sum()), areas,
    )


# --- images ----------------------------------------------------------------------------------------


def _image_size(file: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding its pixels."""
    try:
        with Image.open(file) as image:
            return image.height, image.width
    except FileNotFoundError:
        raise ValueError(f"the image file {file} does not exist") from None
    except Exception as e:  # PIL raises many types for a file it cannot identify
        raise ValueError(f"cannot read the image {file}: {type(e).__name__}: {e}") from e


def _decode_file(file: Path) -> np.ndarray:
    """uint8 (h, w, 3): grey, palette, 16-bit and RGBA images become RGB."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e}") from e
    return as_rgb(folders._open_image(data, str(file)), str(file))


def as_rgb(image: Image.Image, name: str) -> np.ndarray:
    return np.asarray(folders._as_8bit(image, name).convert("RGB"))


# --- canvas ----------------------------------------------------------------------------------------


def _round_up(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def _scale(height: int, width: int, canvas) -> float:
    if isinstance(canvas, (tuple, list)):
        short, long = sorted(canvas)
        bound = (short, long) if width >= height else (long, short)  # (H, W) of its bucket
        return min(bound[0] / height, bound[1] / width)
    return canvas / max(height, width)


def _resized_size(height: int, width: int, scale: float) -> tuple[int, int]:
    # mmcv's rescale_size: int(x * scale + 0.5)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _canvases(anns: Sequence[_Annotation], canvas, size_divisor: int):
    """The canvases of the buckets that occur (landscape first) and a function (h, w) -> bucket."""
    kinds = sorted({a.width < a.height for a in anns})  # False: landscape (or square), True: portrait
    shapes = []
    for portrait in kinds:
        if isinstance(canvas, (tuple, list)):
            short, long = sorted(canvas)
            h, w = (long, short) if portrait else (short, long)
        else:
            sizes = [_resized_size(a.height, a.width, _scale(a.height, a.width, canvas))
                     for a in anns if (a.width < a.height) == portrait]
            h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        shapes.append((_round_up(h, size_divisor), _round_up(w, size_divisor)))
    index = {portrait: b for b, portrait in enumerate(kinds)}
    return tuple(shapes), lambda height, width: index[width < height]


def _split(anns, decode, canvas, canvases, bucket_of, max_boxes, cache: bool, name, num_classes) -> BoxSplit:
    n = len(anns)
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    classes = np.full((n, max_boxes), -1, np.int32)
    difficult = np.zeros((n, max_boxes), bool)
    scales = np.empty(n, np.float32)
    original = np.empty((n, 2), np.int32)
    resized = np.empty((n, 2), np.int32)
    buckets = np.empty(n, np.int32)
    areas = np.zeros((n, max_boxes), np.float32)
    for i, a in enumerate(anns):
        m = len(a.classes)
        if m > max_boxes:
            raise ValueError(f"image {a.image_id} of {name} has {m} boxes, more than max_boxes={max_boxes} "
                             "(--boxes.max_boxes)")
        scale = _scale(a.height, a.width, canvas)
        scales[i], original[i] = scale, (a.height, a.width)
        resized[i] = _resized_size(a.height, a.width, scale)
        buckets[i] = bucket_of(a.height, a.width)
        boxes[i, :m] = a.boxes * np.float32(scale)
        classes[i, :m], difficult[i, :m] = a.classes, a.difficult
        box_areas = (a.boxes[:, 2] - a.boxes[:, 0]) * (a.boxes[:, 3] - a.boxes[:, 1])
        areas[i, :m] = box_areas if a.areas is None else a.areas
    reader = _ImageReader(decode, cache)
    return BoxSplit(tuple(a.image_id for a in anns), boxes, classes, difficult, scales, original, resized,
                    buckets, canvases, tuple(a.crowd for a in anns), areas, sum(a.dropped for a in anns),
                    num_classes, reader)


# --- batches ---------------------------------------------------------------------------------------


def batch_plan(
    split: BoxSplit, indices, batch_size: int, *, rng=None, drop_remainder: bool = False
) -> list[np.ndarray]:
    """`indices` in batches of one bucket each: in the given order without `rng`; else shuffled within
    each bucket and the batches in a random order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    indices = np.asarray(indices, np.int64).reshape(-1)
    plan = []
    for bucket in np.unique(split.buckets[indices]) if len(indices) else []:
        members = indices[split.buckets[indices] == bucket]
        if rng is not None:
            members = rng.permutation(members)
        stop = len(members) - len(members) % batch_size if drop_remainder else len(members)
        plan.extend(members[s : s + batch_size] for s in range(0, stop, batch_size))
    if rng is not None:
        plan = [plan[k] for k in rng.permutation(len(plan))]
    return plan


def batches(
    split: BoxSplit,
    indices,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    flip: bool = False,
    drop_remainder: bool = False,
    prefetch: int = 2,
    workers: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `indices` (one bucket each, see `batch_plan`): {"images" uint8 (n, H, W, 3), "boxes",
    "classes", "difficult", "indices"}. A batch is decoded, resized and padded by one of `workers` threads
    (0: in the caller's thread); max(prefetch, workers) batches are decoding or ready at a time, which
    bounds the loader's memory (grain's buffer holds both: a smaller one would idle threads).

    `flip` (needs `rng`) mirrors each image with probability 1/2 within its own resized width (the padding
    stays at the right) and its boxes with it: x1' = w - x2, x2' = w - x1."""
    if flip and rng is None:
        raise ValueError("flip needs an rng")
    plan = batch_plan(split, indices, batch_size, rng=rng, drop_remainder=drop_remainder)
    flips = [rng.random(len(b)) < 0.5 if flip else np.zeros(len(b), bool) for b in plan]
    if not plan:
        return iter(())
    import grain

    def load(k: int) -> dict[str, np.ndarray]:
        return _load_batch(split, plan[k], flips[k])

    workers = _WORKERS if workers is None else workers
    dataset = grain.MapDataset.range(len(plan)).map(load)
    if workers == 0:
        return iter(dataset)
    options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(prefetch, workers, 1))
    return iter(dataset.to_iter_dataset(options))


def _load_batch(split: BoxSplit, indices: np.ndarray, flips: np.ndarray) -> dict[str, np.ndarray]:
    images = split.read_images(indices)
    boxes = split.boxes[indices].copy()
    classes = split.classes[indices]
    for row in np.flatnonzero(flips):
        width = split.resized_sizes[indices[row], 1]
        images[row, :, :width] = images[row, :, :width][:, ::-1]
        real = classes[row] >= 0
        x1, x2 = boxes[row, real, 0].copy(), boxes[row, real, 2].copy()
        boxes[row, real, 0], boxes[row, real, 2] = width - x2, width - x1
    return {"images": images, "boxes": boxes, "classes": classes, "difficult": split.difficult[indices],
            "indices": indices}
