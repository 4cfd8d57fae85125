"""Small PASCAL VOC folders for the detection-loop tests, written as an annotation tool exports them."""

from pathlib import Path

import numpy as np

from test_boxes import voc_xml, write_image

CLASSES = ("cell", "dot")


def image_objects(seed: int, height: int, width: int) -> list:
    """One to three boxes (1-based inclusive VOC coordinates inside the image), classes at random."""
    rng = np.random.default_rng(seed)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        w, h = int(rng.integers(8, width // 2)), int(rng.integers(8, height // 2))
        x, y = int(rng.integers(1, width - w)), int(rng.integers(1, height - h))
        objects.append((CLASSES[int(rng.integers(0, 2))], False, (x, y, x + w, y + h)))
    return objects


def make_voc_pool(root: Path, train: int = 10, test: int = 3, empty: int = 2, size=(48, 64)) -> dict:
    """`train` images with boxes and `empty` without (a simulated pool drops those), `test` more; returns
    {image id: objects}. Every split is in ImageSets/Main."""
    height, width = size
    truth, splits = {}, {"train": [], "test": []}
    for k in range(train + empty + test):
        image_id = f"img{k:03d}"
        objects = [] if train <= k < train + empty else image_objects(k, height, width)
        write_image(root / "JPEGImages" / f"{image_id}.png", height, width, "RGB", k)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.png", height, width, objects))
        splits["test" if k >= train + empty else "train"].append(image_id)
        truth[image_id] = objects
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    splits["val"] = splits["test"][:2]  # ISAL's reference set R
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return truth


def coco_json(images: dict, classes=CLASSES) -> dict:
    """A COCO instances JSON of `images` ({file name: (height, width, objects)}, objects as `image_objects`
    gives them: VOC's 1-based inclusive corners, written here as COCO's [x, y, w, h])."""
    out = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}
    for image_id, (name, (height, width, objects)) in enumerate(images.items(), start=1):
        out["images"].append({"id": image_id, "file_name": name, "height": height, "width": width})
        for cls, _, (x1, y1, x2, y2) in objects:
            out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": image_id, "iscrowd": 0,
                                       "category_id": classes.index(cls) + 1,
                                       "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]})
    return out


def make_coco(root: Path, splits: dict, size=(48, 64)) -> None:
    """A COCO folder: annotations/instances_<split>.json and <split>/<file> for {split: number of images}
    (the first image of each split without boxes)."""
    import json

    height, width = size
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    seed = 0
    for split, count in splits.items():
        images = {}
        for k in range(count):
            name = f"{split}_{k:03d}.png"
            write_image(root / split / name, height, width, "RGB", seed)
            images[name] = (height, width, [] if k == 0 else image_objects(seed, height, width))
            seed += 1
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_json(images)))
