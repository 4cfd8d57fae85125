"""Tests of `jaxal.data.boxes`: small VOC and COCO folders written here (landscape, portrait and grey
images, a negative image, difficult, crowd and invalid boxes), tfds voc/2012 under `tfds.testing.mock_data`,
the canvas and flip arithmetic recomputed here by hand, bad input refused naming the file, and BCCD."""

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxal.data import boxes as B

from conftest import shared_archive  # tests/conftest.py

try:
    import tensorflow_datasets as tfds
except ImportError:
    tfds = None

# the small VOC folder has invalid boxes on purpose; the tests that are about the warning catch it
pytestmark = pytest.mark.filterwarnings("ignore:.*dropped .* invalid box")


def write_image(path: Path, height: int, width: int, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)  # PNG: lossless, so the test knows every pixel
    return pixels


def voc_xml(name: str, height: int, width: int, objects) -> str:
    parts = [f"<annotation><filename>{name}</filename><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for cls, difficult, (xmin, ymin, xmax, ymax) in objects:
        parts.append(f"<object><name>{cls}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin>"
                     f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


# id -> (height, width, mode, objects as written: class, difficult, (xmin, ymin, xmax, ymax) 1-based inclusive)
VOC_IMAGES = {
    "land": (40, 60, "RGB", [("dog", False, (1, 1, 60, 40)), ("cat", True, (11, 5, 30, 20)),
                              ("cat", False, (7, 7, 7, 7)),  # zero area as written
                              ("dog", False, (50, 30, 61, 40))]),  # xmax > width
    "tall": (60, 40, "L", [("cat", False, (3, 4, 20, 50))]),  # grey, portrait
    "empty": (30, 50, "RGB", []),  # a negative
    "val1": (40, 60, "RGB", [("dog", False, (2, 3, 40, 30))]),
}


def make_voc(root: Path, images=VOC_IMAGES, splits=None) -> dict:
    pixels = {}
    for seed, (image_id, (h, w, mode, objects)) in enumerate(images.items()):
        pixels[image_id] = write_image(root / "JPEGImages" / f"{image_id}.png", h, w, mode, seed)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.png", h, w, objects))
    splits = splits or {"train": ["land", "tall", "empty"], "val": ["val1"], "test": ["val1", "empty"]}
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return pixels


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"  # a wrapping folder, entered
    return root, make_voc(root)


def canvas_of(pixels: np.ndarray, scale: float, canvas_hw) -> tuple[np.ndarray, tuple[int, int]]:
    """The canvas image, recomputed here: RGB, resized to int(side * scale + 0.5), padded with zeros."""
    h, w = pixels.shape[:2]
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    image = Image.fromarray(pixels).convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR)
    out = np.zeros((*canvas_hw, 3), np.uint8)
    out[: size[0], : size[1]] = np.asarray(image)
    return out, size


def test_voc_boxes_canvas_buckets_and_images(voc):
    root, pixels = voc
    with pytest.warns(UserWarning, match="dropped 2 invalid box.* images land;"):
        ds = B.load_boxes(root.parent.parent, canvas=30, size_divisor=8, cache_bytes=0)
    assert ds.class_names == ("cat", "dog")  # the train split's names, sorted
    assert ds.train.num_classes == ds.test.num_classes == 2
    assert ds.describe() == (f"{root.parent.parent}: 2 classes; train 3 images / 3 boxes, val 1 images / 1 boxes, "
                             "test 2 images / 1 boxes; canvas 24x32 and 32x24 (HxW); 2 invalid boxes dropped; "
                             "images streamed from disk")
    # landscape: 30/60 -> 20x30 and 15x25 (the tallest is 20) -> (24, 32); portrait 60x40 -> 30x20 -> (32, 24)
    assert ds.canvases == ((24, 32), (32, 24))
    train = ds.train
    assert train.image_ids == ("land", "tall", "empty") and train.buckets.tolist() == [0, 1, 0]
    assert train.boxes.shape == (3, 2, 4)  # max_boxes: the largest count kept (land: 2 of 4 valid)
    assert train.dropped == 2 and ds.val.dropped == 0 and ds.dropped == 2
    np.testing.assert_array_equal(train.original_sizes, [[40, 60], [60, 40], [30, 50]])
    np.testing.assert_allclose(train.scales, [0.5, 0.5, 0.6], rtol=1e-7)
    # VOC (xmin, ymin, xmax, ymax) -> (xmin - 1, ymin - 1, xmax, ymax) * scale
    np.testing.assert_allclose(train.boxes[0], [[0, 0, 30, 20], [5, 2, 15, 10]], rtol=1e-6)
    np.testing.assert_array_equal(train.classes, [[1, 0], [0, -1], [-1, -1]])
    np.testing.assert_array_equal(train.difficult, [[False, True], [False, False], [False, False]])
    np.testing.assert_allclose(train.boxes[1, 0], np.array([2, 3, 20, 50]) * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(train.num_boxes(), [2, 1, 0])
    np.testing.assert_allclose(train.areas[0], [60 * 40, 20 * 16])  # VOC: box areas, original pixels
    np.testing.assert_array_equal(train.boxes[2], 0)  # the negative: padding only
    for rows in ([0, 2], [1]):
        images = train.read_images(rows)
        for k, i in enumerate(rows):
            image_id = train.image_ids[i]
            expected, size = canvas_of(pixels[image_id], float(train.scales[i]), ds.canvases[train.buckets[i]])
            np.testing.assert_array_equal(images[k], expected)
            assert tuple(train.resized_sizes[i]) == size
    grey = train.read_images([1])[0]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()  # grey -> RGB
    with pytest.raises(ValueError, match="one bucket"):
        train.read_images([0, 1])


def test_voc_fixed_canvas_and_archive(voc, tmp_path):
    root, _ = voc
    fixed = B.load_boxes(root, canvas=(20, 40))  # landscape within 20x40, portrait within 40x20
    assert fixed.canvases == ((32, 64), (64, 32))  # rounded up to 32
    scales = [min(20 / 40, 40 / 60), min(40 / 60, 20 / 40), min(20 / 30, 40 / 50)]
    np.testing.assert_allclose(fixed.train.scales, scales, rtol=1e-6)
    archive = tmp_path / "voc.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root.parent.parent, arcname="VOCdevkit")
    from_archive = B.load_boxes(archive, canvas=(20, 40), cache_dir=tmp_path / "cache")
    for split in ("train", "val", "test"):
        a, b = getattr(fixed, split), getattr(from_archive, split)
        assert a.image_ids == b.image_ids
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.read_images([0]), b.read_images([0]))
    (extracted,) = (tmp_path / "cache").iterdir()  # one tree, no partial leftovers
    stamp = extracted.stat().st_mtime_ns
    again = B.load_boxes(archive, canvas=(20, 40), cache_dir=tmp_path / "cache")  # extracted once, reused
    assert list((tmp_path / "cache").iterdir()) == [extracted] and extracted.stat().st_mtime_ns == stamp
    assert again.train.image_ids == fixed.train.image_ids


def test_on_invalid_error_names_the_file(voc):
    root, _ = voc
    with pytest.raises(ValueError, match=r"land\.xml: the cat box .*zero area"):
        B.load_boxes(root, canvas=30, on_invalid="error")


def _break(root: Path, what: str) -> str:
    if what == "xml":
        (root / "Annotations" / "tall.xml").write_text("<annotation><object>")
        return "tall.xml"
    if what == "class":
        return "land.xml"  # with class_names=("dog",): cat is unknown
    if what == "image":
        (root / "JPEGImages" / "tall.png").unlink()
        return "tall"
    if what == "split":
        (root / "ImageSets" / "Main" / "train.txt").write_text("\n")
        return "train.txt"
    if what == "max_boxes":
        return "land"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["xml", "class", "image", "split", "max_boxes"])
def test_bad_voc_input_is_refused_naming_the_file(voc, what):
    root, _ = voc
    name = _break(root, what)
    kwargs = {"class_names": ("dog",)} if what == "class" else {"max_boxes": 1} if what == "max_boxes" else {}
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        B.load_boxes(root, canvas=30, **kwargs)


def test_unknown_class_in_val_is_refused(tmp_path):
    images = {"a": (20, 20, "RGB", [("dog", False, (1, 1, 10, 10))]),
              "b": (20, 20, "RGB", [("cow", False, (1, 1, 5, 5))])}
    make_voc(tmp_path, images, {"train": ["a"], "val": ["b"], "test": ["a"]})
    with pytest.raises(ValueError, match=r"b\.xml: unknown class name 'cow'"):
        B.load_boxes(tmp_path, canvas=20)


def make_coco(root: Path) -> None:
    images = [{"id": 7, "file_name": "a.png", "height": 40, "width": 60},
              {"id": 3, "file_name": "b.png", "height": 50, "width": 20},
              {"id": 9, "file_name": "c.png", "height": 30, "width": 30}]  # c: a negative
    for seed, im in enumerate(images):
        write_image(root / "train2017" / im["file_name"], im["height"], im["width"], "RGB", seed)
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10.5, 4, 20, 10], "iscrowd": 0, "area": 200},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 60, 40], "iscrowd": 1, "area": 2400},
        {"id": 3, "image_id": 3, "category_id": 2, "bbox": [1, 2, 18.6, 48.3], "iscrowd": 0, "area": 898},
        {"id": 4, "image_id": 3, "category_id": 5, "bbox": [1, 2, 0, 5], "iscrowd": 0, "area": 0},  # zero area
        {"id": 5, "image_id": 3, "category_id": 5, "bbox": [0, 0, 20.5, 50.4], "iscrowd": 0, "area": 1},  # clipped
    ]
    categories = [{"id": 5, "name": "zebra"}, {"id": 2, "name": "bicycle"}]
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    os.symlink(root / "train2017", root / "val2017")


def test_coco_crowd_apart_ids_mapped_invalid_dropped(tmp_path):
    make_coco(tmp_path)
    ds = B.load_boxes(tmp_path, canvas=30, size_divisor=1)
    assert ds.class_names == ("bicycle", "zebra")  # by category id: 2, 5
    assert ds.val is None and ds.test.image_ids == ("3", "7", "9")
    train = ds.train
    assert train.image_ids == ("3", "7", "9") and train.dropped == 1
    # landscape 40x60 -> 20x30 and the square 30x30 -> 30x30: (30, 30); portrait 50x20 -> 30x12
    assert ds.canvases == ((30, 30), (30, 12))
    np.testing.assert_allclose(train.scales, [0.6, 0.5, 1.0], rtol=1e-7)
    # COCO [x, y, w, h] -> (x, y, x + w, y + h) * scale, clipped to the 50x20 image when over by <= 1 px
    np.testing.assert_allclose(train.boxes[0], np.array([[1, 2, 19.6, 50], [0, 0, 20, 50]]) * 0.6, rtol=1e-6)
    np.testing.assert_allclose(train.boxes[1, 0], np.array([10.5, 4, 30.5, 14]) * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(train.classes, [[0, 1], [1, -1], [-1, -1]])
    # the crowd region is no training label; it is kept, in original pixels, for the evaluator
    assert [c.tolist() for c in train.crowd] == [[], [[0, 0, 60, 40, 0]], []]
    np.testing.assert_array_equal(train.areas, [[898, 1], [200, 0], [0, 0]])  # COCO's annotated areas
    assert not train.difficult.any()


def test_coco_bad_input(tmp_path):
    make_coco(tmp_path)
    with pytest.raises(ValueError, match=r"instances_train2017\.json: the box \[1, 2, 0, 5\].*zero area"):
        B.load_boxes(tmp_path, canvas=30, on_invalid="error")
    with pytest.raises(ValueError, match=r"instances_test2017\.json does not exist.*instances_train2017\.json"):
        B.load_boxes(tmp_path, canvas=30, test_split="test2017")
    (tmp_path / "train2017" / "c.png").unlink()
    with pytest.raises(ValueError, match=r"c\.png of .*instances_train2017\.json .*does not exist"):
        B.load_boxes(tmp_path, canvas=30)
    (tmp_path / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match=r"instances_train2017\.json has no images"):
        B.load_boxes(tmp_path, canvas=30)
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{")
    with pytest.raises(ValueError, match=r"cannot parse .*instances_train2017\.json"):
        B.load_boxes(tmp_path, canvas=30)


def test_batches_cover_each_index_once_one_bucket_each_and_flip(voc):
    root, _ = voc
    ds = B.load_boxes(root, canvas=30, size_divisor=8)
    train = ds.train
    seen = []
    rng = np.random.default_rng(0)
    for batch in B.batches(train, [0, 1, 2], 2, rng=rng, flip=True, workers=2):
        idx = batch["indices"]
        assert len(set(train.buckets[idx].tolist())) == 1
        assert batch["images"].shape[1:3] == ds.canvases[train.buckets[idx[0]]]
        seen.extend(idx.tolist())
    assert sorted(seen) == [0, 1, 2]
    # flip recomputed here: mirror the first `w` columns (the image, not its padding), x -> w - x
    flips = 0
    for seed in range(6):
        for batch in B.batches(train, [0], 1, rng=np.random.default_rng(seed), flip=True, workers=0):
            plain = train.read_images([0])[0]
            w = int(train.resized_sizes[0, 1])
            if (batch["images"][0] == plain).all():
                np.testing.assert_array_equal(batch["boxes"][0], train.boxes[0])
                continue
            flips += 1
            expected = plain.copy()
            expected[:, :w] = plain[:, :w][:, ::-1]
            np.testing.assert_array_equal(batch["images"][0], expected)
            real = train.boxes[0][train.classes[0] >= 0]
            np.testing.assert_allclose(batch["boxes"][0][:2], np.stack([w - real[:, 2], real[:, 1], w - real[:, 0],
                                                                        real[:, 3]], axis=1))
    assert 0 < flips < 6
    ordered = [b["indices"].tolist() for b in B.batches(ds.test, [0, 1], 1)]  # no rng: in order
    assert ordered == [[0], [1]]


def test_small_split_is_cached_once_decoded(voc):
    root, _ = voc
    ds = B.load_boxes(root, canvas=30, size_divisor=8)
    first = ds.train.read_images([0, 2])
    assert set(ds.train.reader.cache) == {0, 2}
    ds.train.reader.decode = None  # a second read must not decode
    np.testing.assert_array_equal(ds.train.read_images([0, 2]), first)
    assert B.load_boxes(root, canvas=30, cache_bytes=0).train.reader.cache is None


def voc_tfds_examples():
    """Examples as tfds' voc builder yields them (image bytes as with SkipDecoding)."""
    import io

    def png(h, w, seed):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    return [
        {"image": png(40, 50, 0), "image/filename": b"2008_000001.jpg",
         "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.3, 0.9]], np.float32),
                     "label": np.array([14, 2]), "is_difficult": np.array([True, False])}},
        {"image": png(30, 20, 1), "image/filename": b"2008_000002.jpg",
         "objects": {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros(0, np.int64),
                     "is_difficult": np.zeros(0, bool)}},
    ]


@pytest.mark.skipif(tfds is None, reason="tensorflow-datasets is not installed")
def test_tfds_voc2012_under_mock_data():
    examples = voc_tfds_examples()

    def as_data_source(self, split, **kwargs):
        assert "image" in kwargs["decoders"]  # read skipping the image decoding
        return examples

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source):
        ds = B.load_boxes("voc/2012", canvas=25, size_divisor=1)
    assert len(ds.class_names) == 20 and ds.class_names[14] == "person" and ds.val is None
    train = ds.train
    assert train.image_ids == ("2008_000001", "2008_000002") and train.dropped == 1  # the zero-height box
    # normalised [ymin, xmin, ymax, xmax] of a 40x50 image -> pixels x1, y1, x2, y2, times 25/50
    np.testing.assert_allclose(train.boxes[0, 0], np.array([0.2 * 50, 0.1 * 40, 0.6 * 50, 0.5 * 40]) * 0.5, rtol=1e-6)
    assert train.classes.tolist() == [[14], [-1]] and train.difficult.tolist() == [[True], [False]]
    assert ds.canvases == ((20, 25), (25, 17))
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source):
        image = train.read_images([1])[0]
    expected, _ = canvas_of(np.asarray(Image.open(__import__("io").BytesIO(examples[1]["image"]))), 25 / 30, (25, 17))
    np.testing.assert_array_equal(image, expected)


def test_tfds_coco_example_keeps_crowd_apart():
    # tfds' coco builder imports TensorFlow, so coco/2017 is checked here at the example level
    example = {"image": np.zeros((10, 20, 3), np.uint8), "image/id": 42,
               "objects": {"bbox": np.array([[0, 0, 0.5, 0.5], [0.2, 0.1, 1, 1]], np.float32),
                           "label": np.array([3, 7]), "is_crowd": np.array([False, True])}}
    ann = B._tfds_annotation("coco/2017", "train", 0, example, "drop")
    assert ann.image_id == "42" and (ann.height, ann.width) == (10, 20)
    np.testing.assert_allclose(ann.boxes, [[0, 0, 10, 5]])
    np.testing.assert_allclose(ann.crowd, [[2, 2, 20, 10, 7]])


def test_bccd(tmp_path):
    BCCD = shared_archive("bccd-voc.tar.gz")  # the suite's one lookup: skips on a user's machine, fails in CI
    dropped = "dropped 2 invalid box.* images BloodImage_003(43, BloodImage_00338|38, BloodImage_00343);"
    with pytest.warns(UserWarning, match=dropped):
        ds = B.load_boxes(BCCD, canvas=320, cache_dir=tmp_path)
    assert ds.class_names == ("Platelets", "RBC", "WBC") and ds.canvases == ((256, 320),)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (205, 87, 72)
    total = sum(int(s.num_boxes().sum()) for s in (ds.train, ds.val, ds.test))
    assert total == 4155 + 372 + 361 - 2 and ds.dropped == 2  # the README's counts, less the 2 zero-area boxes
    per_class = sum(np.bincount(s.classes[s.classes >= 0], minlength=3) for s in (ds.train, ds.val, ds.test))
    assert per_class.tolist() == [361, 4155 - 2, 372]
    # the first train image's boxes, read here from its XML with a regex: (xmin - 1, ymin - 1, xmax, ymax) / 2
    import re

    first = ds.train.image_ids[0]
    with tarfile.open(BCCD) as tar:
        xml = tar.extractfile(f"bccd/Annotations/{first}.xml").read().decode()
    found = [(name, *map(float, coords)) for name, *coords in re.findall(
        r"<name>(\w+)</name>.*?<xmin>(\d+)</xmin>\s*<ymin>(\d+)</ymin>\s*<xmax>(\d+)</xmax>\s*<ymax>(\d+)</ymax>",
        xml, re.S)]
    m = int(ds.train.num_boxes([0])[0])
    assert m == len(found) > 0
    np.testing.assert_allclose(ds.train.boxes[0, :m], [[(x1 - 1) / 2, (y1 - 1) / 2, x2 / 2, y2 / 2]
                                                       for _, x1, y1, x2, y2 in found])
    assert [ds.class_names[c] for c in ds.train.classes[0, :m]] == [f[0] for f in found]
    with pytest.raises(ValueError, match=r"BloodImage_003(38|43)\.xml.*zero area"):
        B.load_boxes(BCCD, canvas=320, cache_dir=tmp_path, on_invalid="error")


def test_archive_members_outside_the_tree_are_refused(tmp_path, monkeypatch):
    import io

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    for without_filter in (False, True):  # Python < 3.11.4 has no extraction filters: the own check
        if without_filter:
            monkeypatch.delattr(tarfile, "data_filter")
        with pytest.raises(ValueError, match=r"evil\.tar\.gz"):
            B.load_boxes(archive, canvas=30, cache_dir=tmp_path / "cache")
        assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "cache" / "outside.txt").exists()


def test_cache_is_decided_for_the_whole_dataset(voc):
    root, _ = voc
    # canvas 30, divisor 8: 6 images over the splits (5 landscape at 24x32, 1 portrait at 32x24), 2304 bytes each
    total = 6 * 24 * 32 * 3
    fits = B.load_boxes(root, canvas=30, size_divisor=8, cache_bytes=total)
    assert all(s.reader.cache is not None for s in (fits.train, fits.val, fits.test))
    over = B.load_boxes(root, canvas=30, size_divisor=8, cache_bytes=total - 1)
    assert all(s.reader.cache is None for s in (over.train, over.val, over.test))
