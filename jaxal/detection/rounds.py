"""Annotation rounds with boxes: `python -m jaxal.query --task detection --pool photos/ --labels LABELS`.

LABELS is what annotation tools export: a COCO instances JSON (`images[].file_name` relative to --pool,
`annotations[].bbox` as [x, y, w, h] in pixels, `categories[].name` the classes), or a PASCAL VOC folder
(`Annotations/*.xml` whose `<filename>` names a pool image, by its path relative to --pool or, when
unique, by its file name; corners 1-based inclusive). An image the labels list without a box is a labelled
negative. Each run reads the labels, and if they changed since
the last round (or there is no round yet) trains a FRESH detector on the labelled images, scores the others
with the strategy (`jaxal.detection.strategies`) and writes `round_NNN/to_label.csv` (path, score, rank:
best first) and `round_NNN/contact_sheet.png`, the proposed images with the detector's boxes drawn (score
>= DRAW_SCORE). Label them in the tool, export again, and run the same command for the next round. A run
whose labels did not change shows the last round's proposal again, without training. `--num_devices N`
(default: every device) trains, scores and detects data parallel on a mesh of N devices, as `jaxal.run`'s
detection loop; the resolved count is part of config.json.

Bad input -- a label for an image that is not in the pool, a box outside its image (or of zero area), a
class name outside the set (--classes, or the first round's) -- ends with a message naming it and exit
status 2, and writes nothing. The workdir holds `config.json` (a later round with other settings is
refused, as `jaxal.run` refuses to resume another config) and `rounds.json`, written last, atomically: a
round killed before it is simply run again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from PIL import Image, ImageDraw

from jaxal import folders, loop, parallel, results, workdir as workdir_lock
from jaxal.config import Config
from jaxal.data import boxes as boxes_lib
from jaxal.detection import active, strategies, training

DRAW_SCORE = 0.3  # detections drawn on the contact sheet: those at least this confident
VIEW_SPLIT = "pool"  # the COCO split name of the pool in the dataset view the detector reads

# path -> list of (x1, y1, x2, y2, class name): continuous pixel corners of the ORIGINAL image
Labels = dict[str, list[tuple[float, float, float, float, str]]]


def read_labels(source: Path, ids: list[str]) -> tuple[Labels, Optional[tuple[str, ...]]]:
    """The boxes of a COCO JSON file or a VOC folder, keyed by pool path, and the classes the file declares
    (COCO's categories in id order; None for VOC, whose classes are the names its boxes use). ValueError
    names an image that is not in the pool and a file that does not parse."""
    if source.is_dir():
        return _voc_labels(source, ids), None
    try:
        data = json.loads(source.read_text(encoding="utf-8-sig"))
        images, annotations, categories = data["images"], data["annotations"], data["categories"]
        names = {int(c["id"]): str(c["name"]) for c in categories}
        files = {int(im["id"]): str(im["file_name"]) for im in images}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read {source} as COCO instances (images, annotations, categories): {error}") from None
    labels: Labels = {}
    for image_id, name in files.items():
        labels[_pool_path(name, ids, source)] = []
    path_of = {image_id: _pool_path(name, ids, source) for image_id, name in files.items()}
    for ann in annotations:
        try:
            image, category, (x, y, w, h) = int(ann["image_id"]), int(ann["category_id"]), ann["bbox"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: annotation {ann.get('id')!r} is malformed ({error})") from None
        if image not in path_of or category not in names:
            raise ValueError(f"{source}: annotation {ann.get('id')!r} refers to "
                             + (f"image_id {image}, not in its images" if image not in path_of
                                else f"category_id {category}, not in its categories"))
        if ann.get("iscrowd", 0):
            continue  # a crowd region is not a box to learn
        labels[path_of[image]].append((float(x), float(y), float(x) + float(w), float(y) + float(h), names[category]))
    return labels, tuple(names[k] for k in sorted(names))


def _voc_labels(folder: Path, ids: list[str]) -> Labels:
    annotations = folder / "Annotations" if (folder / "Annotations").is_dir() else folder
    files = sorted(annotations.glob("*.xml"))
    if not files:
        raise ValueError(f"{folder} holds no VOC annotations (Annotations/*.xml)")
    labels: Labels = {}
    for file in files:
        try:
            root = ElementTree.parse(file).getroot()
        except ElementTree.ParseError as error:
            raise ValueError(f"{file} is not a VOC annotation (ParseError: {error})") from None
        _, _, objects = boxes_lib.voc_objects((file, root))  # the dataset reader's parsing
        # VOC's 1-based inclusive pixels: columns xmin..xmax are the continuous span xmin - 1 .. xmax
        labels[_pool_path(root.findtext("filename") or "", ids, file)] = [
            (x1 - 1, y1 - 1, x2, y2, cls) for cls, _difficult, (x1, y1, x2, y2) in objects]
    return labels


def _pool_path(name: str, ids: list[str], source: Path) -> str:
    """The pool path a label file names: relative to the pool, or a file name unique in it."""
    name = name.replace("\\", "/").removeprefix("./")
    if name in ids:
        return name
    matches = [i for i in ids if i.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1]]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"{source}: the image {name!r} is not in the pool"
                     + (f" (several pool files are called {name.rsplit('/', 1)[-1]})" if matches else ""))


def check_labels(labels: Labels, sizes: dict[str, tuple[int, int]], classes: tuple[str, ...], source: Path) -> None:
    """ValueError for a box outside its image (by more than COCO's rounding, a pixel) or of zero area, and for
    a class name outside `classes`."""
    for path, boxes in labels.items():
        height, width = sizes[path]
        for x1, y1, x2, y2, cls in boxes:
            if cls not in classes:
                raise ValueError(f"{source}: {path} has a box of class {cls!r}, not one of the classes "
                                 f"{', '.join(classes)} (--classes, or those of the first round)")
            if not (x2 > x1 and y2 > y1) or x1 < -1 or y1 < -1 or x2 > width + 1 or y2 > height + 1:
                raise ValueError(f"{source}: {path} has the box x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}, which is "
                                 f"empty or outside the {width}x{height} image")


def image_sizes(root: Path, ids: list[str]) -> dict[str, tuple[int, int]]:
    """(height, width) of each pool image from its file's header."""
    sizes = {}
    for item in ids:
        try:
            with Image.open(root / item) as image:
                sizes[item] = (image.height, image.width)
        except OSError as error:
            raise ValueError(f"cannot read the image {root / item}: {error}") from None
    return sizes


def coco_view(labels: Labels, ids: list[str], sizes: dict, classes: tuple[str, ...]) -> dict:
    """The pool as one COCO split: every image (the unlabelled ones without boxes, never trained on) and the
    labelled boxes clipped into their image, so `jaxal.data.boxes` reads it as it reads any COCO folder."""
    index = {c: k + 1 for k, c in enumerate(classes)}
    out = {"images": [], "annotations": [], "categories": [{"id": k, "name": c} for c, k in index.items()]}
    for image_id, item in enumerate(ids, start=1):
        height, width = sizes[item]
        out["images"].append({"id": image_id, "file_name": item, "height": height, "width": width})
        for x1, y1, x2, y2, cls in labels.get(item, []):
            x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
            out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": image_id, "iscrowd": 0,
                                       "category_id": index[cls], "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return out


def labels_digest(labels: Labels) -> str:
    return hashlib.sha256(json.dumps(sorted(labels.items())).encode()).hexdigest()


def read_rounds(workdir: Path) -> dict:
    path = workdir / "rounds.json"
    if not path.exists():
        return {"classes": None, "rounds": []}
    return workdir_lock.read_json_object(path, "delete the workdir to start the rounds again")


def draw_detections(image: np.ndarray, found: dict, row: int, classes: tuple[str, ...]) -> np.ndarray:
    """`image` (canvas pixels) with the boxes of detection row `row` scoring >= DRAW_SCORE drawn."""
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    for box, score, cls, valid in zip(found["boxes"][row], found["scores"][row], found["classes"][row],
                                      found["valid"][row]):
        if valid and score >= DRAW_SCORE:
            draw.rectangle([float(v) for v in box], outline=(255, 0, 0), width=2)
            draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{classes[int(cls)]} {score:.2f}", fill=(255, 255, 0))
    return np.asarray(picture)


def sheet_images(split, indices: np.ndarray, found: dict, classes) -> np.ndarray:
    """The chosen images at their canvases with their detections, padded to one size for the sheet."""
    drawn = [draw_detections(split.read_images([i])[0], found, row, classes) for row, i in enumerate(indices)]
    height, width = max(d.shape[0] for d in drawn), max(d.shape[1] for d in drawn)
    out = np.full((len(drawn), height, width, 3), 255, np.uint8)
    for k, d in enumerate(drawn):
        out[k, : d.shape[0], : d.shape[1]] = d
    return out


def detection_round(config: Config, pool: str, label_source: str, classes: Optional[list[str]],
                    log: Callable[[str], None] = print) -> None:
    """One annotation round (or the last one's proposal again); see the module docstring."""
    root, source = Path(pool), Path(label_source)
    if not root.is_dir():
        raise ValueError(f"--task detection takes a folder of images as --pool; {root} is not one")
    active.check(config)
    config, mesh = active.device_mesh(config)  # --num_devices resolved (and recorded) as the simulated loop does
    ids = folders.list_images(root)
    labels, declared = read_labels(source, ids)
    workdir = Path(config.workdir or "al")
    with workdir_lock.hold(workdir):
        loop.check_run_directory(workdir, config)
        state = read_rounds(workdir)
        known = tuple(state["classes"]) if state["classes"] else None
        if classes and known and tuple(classes) != known:
            raise ValueError(f"--classes {','.join(classes)} differs from the classes of the earlier rounds "
                             f"({','.join(known)})")
        names = known or (tuple(classes) if classes else declared
                          or tuple(sorted({b[4] for bs in labels.values() for b in bs})))
        sizes = image_sizes(root, ids)
        check_labels(labels, sizes, names, source)
        labelled = sorted(path for path, boxes in labels.items())
        if not labelled or not names:
            raise ValueError(f"{source} labels no image with a box yet: draw the boxes of a first few images")
        if len(labelled) == len(ids):
            raise ValueError(f"every image of {root} is labelled: there is nothing left to propose")
        digest = labels_digest(labels)
        if state["rounds"] and state["rounds"][-1]["labels_digest"] == digest:
            last = state["rounds"][-1]
            log(f"no new labels since round {last['round']}: its proposal is "
                f"{workdir / last['folder'] / 'to_label.csv'}")
            return
        number = len(state["rounds"])
        proposal, sheet = propose(config, root, ids, labels, sizes, names, number, log, mesh)
        folder = workdir / f"round_{number:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["path", "score", "rank"])
        writer.writerows([p, "" if s is None else repr(s), r] for r, (p, s) in enumerate(proposal, start=1))
        results.write_atomic(folder / "to_label.csv", table.getvalue())
        results.write_atomic(folder / "contact_sheet.png", sheet)
        if not (workdir / "config.json").exists():
            results.write_atomic(workdir / "config.json", config.to_json())
        rounds = state["rounds"] + [{"round": number, "folder": folder.name, "labels_digest": digest,
                                     "labelled": labelled, "num_boxes": sum(len(labels[p]) for p in labelled),
                                     "proposal": [p for p, _ in proposal]}]
        results.write_atomic(workdir / "rounds.json", json.dumps({"classes": list(names), "rounds": rounds}, indent=1))
        log(f"round {number}: label the {len(proposal)} images in {folder / 'to_label.csv'} (best first; contact "
            f"sheet with the detector's boxes: {folder / 'contact_sheet.png'}), export the labels again and run "
            "this command again for the next round")


def propose(config: Config, root: Path, ids: list[str], labels: Labels, sizes: dict, classes: tuple[str, ...],
            number: int, log, mesh=None) -> tuple[list[tuple[str, Optional[float]]], bytes]:
    """Train a fresh detector on the labelled images, select `config.budget` of the others: ([(path, score)]
    best first, the contact sheet's PNG). Training, the strategy's passes and the sheet's detections run data
    parallel on `mesh` (None: one device)."""
    with tempfile.TemporaryDirectory() as view:
        view = Path(view)
        (view / "annotations").mkdir()
        (view / "annotations" / f"instances_{VIEW_SPLIT}.json").write_text(
            json.dumps(coco_view(labels, ids, sizes, classes)))
        os.symlink(root.resolve(), view / VIEW_SPLIT)
        data = boxes_lib.load_boxes(view, canvas=active.canvas_of(config), max_boxes=config.boxes.max_boxes,
                                    on_invalid="error", train_split=VIEW_SPLIT, val_split=None, test_split=VIEW_SPLIT,
                                    class_names=classes, cache_bytes=config.boxes.cache_bytes)
        split = data.train
        position = {item: k for k, item in enumerate(ids)}
        labelled = np.array(sorted(position[p] for p in labels), np.int64)
        candidates = np.setdiff1d(np.arange(len(ids)), labelled)
        rng = np.random.default_rng([config.seed, number])
        detector = active.build_detector(config, data.num_classes)
        backbone = active.backbone_weights(config)
        key = jax.random.PRNGKey(config.seed * 1000 + number)
        log(f"round {number}: training a fresh detector on {len(labelled)} labelled images "
            f"({int(split.num_boxes(labelled).sum())} boxes), {len(candidates)} to score; "
            f"{parallel.describe_mesh(mesh)}")
        variables, _, _ = active.train_fresh(detector, config, split, labelled, key, rng, backbone, mesh,
                                             loss_prediction=active.loss_prediction_for(config, config.strategy))
        task = active.detection_task(config, data.num_classes)
        k = min(config.budget, len(candidates))
        ctx = strategies.DetectionContext(detector, variables, split, candidates, labelled, task, config, rng,
                                          mesh=mesh)
        selection = strategies.select(config.strategy, ctx, k)
        chosen = candidates[selection.chosen]
        # a detection strategy scores every candidate; the proposal lists the chosen ones' scores
        scores = ([None] * k if selection.scores is None
                  else [float(s) for s in np.asarray(selection.scores)[selection.chosen]])
        found = training.detect(detector, variables, split, chosen, config.eval_batch_size, mesh=mesh)
        sheet = results.contact_sheet(sheet_images(split, chosen, found, classes),
                                      [f"{r}: {Path(ids[i]).name}" for r, i in enumerate(chosen, start=1)],
                                      columns=5, cell=256)
    return [(ids[i], s) for i, s in zip(chosen, scores)], sheet
