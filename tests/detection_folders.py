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
