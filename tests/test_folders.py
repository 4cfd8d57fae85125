"""jaxal.folders: image folders and archives read into uint8 arrays, against the arrays the tests wrote
(PNG and BMP are lossless, so equality is exact), a NumPy reference of PIL's antialiased bilinear
filter, and NumPy's nearest-neighbour indexing for masks."""

import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxal import data as data_module
from jaxal import folders

from conftest import shared_archive  # tests/conftest.py

RNG = np.random.default_rng(0)

# --- writing small datasets ----------------------------------------------------------------------


def random_image(channels: int, size=(8, 8)) -> np.ndarray:
    shape = size if channels == 1 else (*size, channels)
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def write(path: Path, array: np.ndarray, mode: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode)
    if mode == "P":  # a full colour palette, as label PNGs have (PNG keeps only as many bits as it needs)
        image.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tolist())
    image.save(path)
    return array


def write_classification(root: Path, classes=("cat", "dog", "emu"), counts=(3, 2), channels=3) -> dict:
    """{split: {class: [(file name, array)]}}; counts are images per class for train and test."""
    written = {}
    for split, count in zip(("train", "test"), counts):
        written[split] = {
            name: [
                (f"{i:04d}.png", write(root / split / name / f"{i:04d}.png", random_image(channels)))
                for i in range(count)
            ]
            for name in classes
        }
    return written


def expected_arrays(written: dict, split: str, class_names) -> tuple[np.ndarray, np.ndarray]:
    images = [array for name in class_names for _, array in written[split][name]]
    labels = [label for label, name in enumerate(class_names) for _ in written[split][name]]
    x = np.stack(images)
    return (x[..., None] if x.ndim == 3 else x), np.array(labels, np.int32)


def make_tar(folder: Path, archive: Path, arcname: str | None) -> Path:
    with tarfile.open(archive, "w:gz" if archive.name.endswith(("gz", "tgz")) else "w") as tar:
        if arcname is None:
            for child in sorted(folder.iterdir()):
                tar.add(child, arcname=child.name)
        else:
            tar.add(folder, arcname=arcname)
    return archive


@pytest.fixture
def decodes(monkeypatch):
    """The names of the files decoded (every decode goes through folders._open_image)."""
    names, real = [], folders._open_image
    monkeypatch.setattr(folders, "_open_image", lambda data, name: names.append(name) or real(data, name))
    return names


def assert_classification_equal(a, b):
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.class_names, a.train_files, a.test_files) == (b.class_names, b.train_files, b.test_files)


# --- classification ------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_classification_reads_the_images_and_labels_written(tmp_path, channels):
    root = tmp_path / "data"
    written = write_classification(root, classes=("emu", "cat", "dog"), channels=channels)
    (root / "README.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1garbage")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"garbage, but hidden")
    (root / "test" / "dog" / "notes.txt").write_text("ignored")

    data = folders.load_classification(root, cache_dir=tmp_path / "cache")

    assert data.class_names == ("cat", "dog", "emu")
    for split in ("train", "test"):
        x, y = expected_arrays(written, split, data.class_names)
        np.testing.assert_array_equal(getattr(data, f"x_{split}"), x)
        np.testing.assert_array_equal(getattr(data, f"y_{split}"), y)
        assert getattr(data, f"x_{split}").dtype == np.uint8 and getattr(data, f"y_{split}").dtype == np.int32
    assert data.x_train.shape == (9, 8, 8, channels)
    assert data.train_files[:4] == (
        "train/cat/0000.png", "train/cat/0001.png", "train/cat/0002.png", "train/dog/0000.png"
    )  # fmt: skip
    assert len(data.test_files) == 6


def test_numeric_class_names_sort_numerically(tmp_path):
    written = write_classification(tmp_path / "d", classes=("10", "2", "0", "1"), counts=(2, 1))
    data = folders.load_classification(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert data.class_names == ("0", "1", "2", "10")
    x, y = expected_arrays(written, "train", ("0", "1", "2", "10"))
    np.testing.assert_array_equal(data.x_train, x)
    np.testing.assert_array_equal(data.y_train, [0, 0, 1, 1, 2, 2, 3, 3])


def test_mixed_modes_become_rgb(tmp_path):
    """One colour image makes the dataset RGB: grey repeated, alpha dropped, palette looked up."""
    root = tmp_path / "d"
    grey = write(root / "train" / "a" / "grey.png", random_image(1))
    rgba = write(root / "train" / "a" / "rgba.png", random_image(4), "RGBA")
    indices = write(root / "train" / "a" / "palette.png", random_image(1), "P")
    with Image.open(root / "train" / "a" / "palette.png") as image:
        palette = np.array(image.getpalette(), np.uint8).reshape(-1, 3)
    one_bit = random_image(1) > 127
    write(root / "test" / "a" / "bits.png", one_bit)

    data = folders.load_classification(root, cache_dir=tmp_path / "cache")

    assert data.x_train.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(data.x_train[0], np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(data.x_train[1], palette[indices])
    np.testing.assert_array_equal(data.x_train[2], rgba[..., :3])
    np.testing.assert_array_equal(data.x_test[0], np.repeat(one_bit[..., None] * np.uint8(255), 3, axis=-1))


def test_all_grey_modes_stay_one_channel(tmp_path):
    root = tmp_path / "d"
    grey = write(root / "train" / "a" / "grey.png", random_image(1))
    grey16 = RNG.integers(0, 2**16, (8, 8), dtype=np.uint16)
    write(root / "test" / "a" / "grey16.png", grey16)
    data = folders.load_classification(root, cache_dir=tmp_path / "cache")
    assert data.x_train.shape == (1, 8, 8, 1)
    np.testing.assert_array_equal(data.x_train[0, ..., 0], grey)
    np.testing.assert_array_equal(data.x_test[0, ..., 0], (grey16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("name,arcname", [("d.tar.gz", "cifar"), ("d.tgz", None), ("d.tar", "cifar")])
def test_archive_equals_folder(tmp_path, name, arcname):
    folder = tmp_path / "d"
    write_classification(folder, channels=3)
    (folder / "LICENSE").write_text("ignored")
    archive = make_tar(folder, tmp_path / name, arcname)
    from_folder = folders.load_classification(folder, cache_dir=tmp_path / "cache")
    from_archive = folders.load_classification(archive, cache_dir=tmp_path / "cache")
    assert_classification_equal(from_archive, from_folder)


def test_wrapping_folders_are_entered(tmp_path):
    written = write_classification(tmp_path / "outer" / "inner", counts=(1, 1))
    data = folders.load_classification(tmp_path / "outer", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.x_test, expected_arrays(written, "test", data.class_names)[0])


def test_resize_is_bilinear_antialiased(tmp_path):
    """Against a NumPy separable triangle filter with PIL's support (widened by the scale when
    shrinking); PIL rounds to uint8 between its two passes, hence the tolerance of 1."""
    root = tmp_path / "d"
    big = write(root / "train" / "a" / "big.png", random_image(3, (12, 8)))
    small = write(root / "test" / "a" / "small.png", random_image(3, (2, 3)))
    data = folders.load_classification(root, image_size=4, cache_dir=tmp_path / "cache")
    assert data.x_train.shape == data.x_test.shape == (1, 4, 4, 3)
    for got, image in ((data.x_train[0], big), (data.x_test[0], small)):
        rows, cols = bilinear_weights(image.shape[0], 4), bilinear_weights(image.shape[1], 4)
        reference = np.einsum("ij,kl,jlc->ikc", rows, cols, image.astype(np.float64))
        assert np.abs(got.astype(np.float64) - reference).max() <= 1.0


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out)[:, None] + 0.5) * scale
    weights = np.maximum(0.0, 1.0 - np.abs((np.arange(n_in)[None, :] + 0.5 - centers) / support))
    return weights / weights.sum(axis=1, keepdims=True)


# --- the cache -----------------------------------------------------------------------------------


def test_second_load_reads_the_cache_without_decoding(tmp_path, decodes, monkeypatch):
    write_classification(tmp_path / "d")
    cache = tmp_path / "cache"
    first = folders.load_classification(tmp_path / "d", cache_dir=cache)
    assert len(decodes) == 15 and len(list(cache.glob("*.npz"))) == 1

    monkeypatch.setattr(folders, "_open_image", lambda data, name: pytest.fail(f"decoded {name} again"))
    assert_classification_equal(folders.load_classification(tmp_path / "d", cache_dir=cache), first)
    assert not list(cache.glob("*.tmp"))


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    write_classification(tmp_path / "d", counts=(1, 1))
    monkeypatch.setenv("JAXAL_CACHE_DIR", str(tmp_path / "env_cache"))
    folders.load_classification(tmp_path / "d")
    assert len(list((tmp_path / "env_cache").glob("classification-d-*.npz"))) == 1


def test_a_changed_source_or_size_is_decoded_again(tmp_path, decodes):
    root, cache = tmp_path / "d", tmp_path / "cache"
    write_classification(root, counts=(1, 1))
    folders.load_classification(root, cache_dir=cache)
    decodes.clear()
    folders.load_classification(root, image_size=4, cache_dir=cache)
    assert len(decodes) == 6

    replacement = write(root / "train" / "cat" / "0000.png", random_image(3))
    os.utime(root / "train" / "cat" / "0000.png", ns=(1, 1))  # a new mtime even on coarse clocks
    decodes.clear()
    data = folders.load_classification(root, cache_dir=cache)
    assert len(decodes) == 6
    np.testing.assert_array_equal(data.x_train[0], replacement)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_cache_is_rebuilt(tmp_path, decodes, damage):
    root, cache = tmp_path / "d", tmp_path / "cache"
    write_classification(root)
    first = folders.load_classification(root, cache_dir=cache)
    (file,) = cache.glob("*.npz")
    content = bytearray(file.read_bytes())
    if damage == "truncate":
        content = content[: len(content) // 2]
    elif damage == "flip":
        middle = content.index(first.x_train.tobytes()[:64]) + 32  # inside x_train's stored bytes
        content[middle] ^= 0xFF
    else:
        content = bytearray(b"not a zip file")
    file.write_bytes(bytes(content))
    decodes.clear()

    with pytest.warns(UserWarning, match="ignoring the cache file"):
        again = folders.load_classification(root, cache_dir=cache)
    assert len(decodes) == 15
    assert_classification_equal(again, first)
    decodes.clear()
    folders.load_classification(root, cache_dir=cache)
    assert decodes == []  # the rebuilt file is good


def test_an_unwritable_cache_costs_a_warning_not_the_load(tmp_path):
    write_classification(tmp_path / "d", counts=(1, 1))
    (tmp_path / "file").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="cannot write the image cache"):
        data = folders.load_classification(tmp_path / "d", cache_dir=tmp_path / "file" / "cache")
    assert data.x_train.shape == (3, 8, 8, 3)


# --- bad input -----------------------------------------------------------------------------------


def _no_test(root):
    write(root / "train" / "a" / "x.png", random_image(3))


def _no_classes(root):
    (root / "train").mkdir(parents=True)
    (root / "train" / "README.txt").write_text("")
    write(root / "test" / "a" / "x.png", random_image(3))


def _loose_image(root):
    write_classification(root, counts=(1, 1))
    write(root / "train" / "loose.png", random_image(3))


def _empty_class(root):
    write_classification(root, counts=(1, 1))
    (root / "train" / "fox").mkdir()
    (root / "train" / "fox" / "README.txt").write_text("")
    (root / "test" / "fox").mkdir()


def _class_missing_from_test(root):
    write_classification(root, counts=(1, 1))
    write(root / "train" / "fox" / "x.png", random_image(3))


def _class_missing_from_train(root):
    write_classification(root, counts=(1, 1))
    write(root / "test" / "fox" / "x.png", random_image(3))


def _corrupt_image(root):
    write_classification(root, counts=(1, 1))
    (root / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")


def _mixed_sizes(root):
    write_classification(root, counts=(1, 1))
    write(root / "test" / "emu" / "wide.png", random_image(3, (8, 12)))


BAD_CLASSIFICATION = [
    (_no_test, r"d has no test/ folder \(it has train/\); expected train/<class>/<image files> and test/"),
    (_no_classes, r"d/train has no class subfolders; expected train/<class>/<image files>"),
    (_loose_image, r"d/train/loose.png is not inside a class folder"),
    (_empty_class, r"the class folder .*d/train/fox has no image files"),
    (_class_missing_from_test, r"the class\(es\) fox of .*d/train are missing from .*d/test"),
    (_class_missing_from_train, r"the class\(es\) fox of .*d/test are missing from .*d/train"),
    (_corrupt_image, r"cannot read the image .*d/train/dog/bad.png"),
    (
        _mixed_sizes,
        r"images differ in size: .*d/train/cat/0000.png is 8x8 and .*d/test/emu/wide.png is 8x12 \(height x "
        r"width\); pass image_size \(--image_size\)",
    ),
]


def named_cases(cases):
    return [pytest.param(make, message, id=make.__name__.lstrip("_")) for make, message in cases]


@pytest.mark.parametrize("make,message", named_cases(BAD_CLASSIFICATION))
def test_bad_classification_folders_name_the_culprit(tmp_path, make, message):
    make(tmp_path / "d")
    with pytest.raises(ValueError, match=message):
        folders.load_classification(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing written


def test_bad_archive_messages_name_the_member(tmp_path):
    _corrupt_image(tmp_path / "d")
    archive = make_tar(tmp_path / "d", tmp_path / "d.tar.gz", "top")
    with pytest.raises(ValueError, match=r"cannot read the image top/train/dog/bad.png in .*d.tar.gz"):
        folders.load_classification(archive, cache_dir=tmp_path / "cache")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(ValueError, match=r"cannot read the archive .*broken.tar.gz"):
        folders.load_classification(tmp_path / "broken.tar.gz", cache_dir=tmp_path / "cache")


def test_bad_paths_and_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere does not exist"):
        folders.load_classification(tmp_path / "nowhere")
    (tmp_path / "data.zip").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data.zip is neither a folder nor a .tar"):
        folders.load_classification(tmp_path / "data.zip")
    write_classification(tmp_path / "d", counts=(1, 1))
    for size in (0, -3, 2.5, "8"):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            folders.load_classification(tmp_path / "d", image_size=size, cache_dir=tmp_path / "cache")


def test_mixed_sizes_load_with_image_size(tmp_path):
    _mixed_sizes(tmp_path / "d")
    data = folders.load_classification(tmp_path / "d", image_size=6, cache_dir=tmp_path / "cache")
    assert data.x_train.shape == (3, 6, 6, 3) and data.x_test.shape == (4, 6, 6, 3)


# --- segmentation --------------------------------------------------------------------------------


MASK_VALUES = np.array([0, 3, 7, 11], np.uint8)


def write_segmentation(root: Path, counts: dict, size=(8, 8)) -> dict:
    """{split: [(name, image, mask)]}: RGB .bmp images (lossless, a different extension than the
    masks) and .png masks, P-mode in train, L-mode elsewhere."""
    written = {}
    for split, count in counts.items():
        written[split] = []
        for i in range(count):
            name = f"scene_{i:03d}"
            image = write(root / split / f"{name}.bmp", random_image(3, size))
            mask = MASK_VALUES[RNG.integers(0, len(MASK_VALUES), size)]
            write(root / f"{split}annot" / f"{name}.png", mask, "P" if split == "train" else "L")
            written[split].append((f"{name}.bmp", image, mask))
    return written


@pytest.mark.parametrize(
    "counts", [{"train": 3, "test": 2}, {"train": 3, "val": 1, "test": 2}], ids=["no_val", "with_val"]
)
def test_segmentation_reads_images_and_masks(tmp_path, counts):
    written = write_segmentation(tmp_path / "camvid", counts)
    (tmp_path / "camvid" / "README.md").write_text("ignored")
    data = folders.load_segmentation(tmp_path / "camvid", cache_dir=tmp_path / "cache")
    for split in ("train", "val", "test"):
        got = getattr(data, split)
        if split not in counts:
            assert got is None
            continue
        assert got.names == tuple(name for name, _, _ in written[split])
        np.testing.assert_array_equal(got.images, np.stack([image for _, image, _ in written[split]]))
        np.testing.assert_array_equal(got.masks, np.stack([mask for _, _, mask in written[split]]))
        assert got.images.dtype == np.uint8 and got.masks.dtype == np.uint8
    every_mask = np.concatenate([mask.ravel() for split in written for _, _, mask in written[split]])
    assert data.mask_values == tuple(np.unique(every_mask).tolist())


def test_segmentation_archive_equals_folder(tmp_path):
    write_segmentation(tmp_path / "camvid", {"train": 2, "val": 1, "test": 1})
    archive = make_tar(tmp_path / "camvid", tmp_path / "camvid.tar.gz", "camvid")
    a = folders.load_segmentation(tmp_path / "camvid", cache_dir=tmp_path / "cache")
    b = folders.load_segmentation(archive, cache_dir=tmp_path / "cache")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, split).images, getattr(b, split).images)
        np.testing.assert_array_equal(getattr(a, split).masks, getattr(b, split).masks)
        assert getattr(a, split).names == getattr(b, split).names
    assert a.mask_values == b.mask_values


NEAREST_INDEX = {  # the source pixel of each target pixel: the one under its centre
    4: np.s_[1::2, 1::2],
    16: np.s_[np.arange(16)[:, None] // 2, np.arange(16) // 2],
}


@pytest.mark.parametrize("image_size,index", list(NEAREST_INDEX.items()))
def test_masks_resize_by_nearest_neighbour(tmp_path, image_size, index):
    written = write_segmentation(tmp_path / "camvid", {"train": 2, "test": 1})
    data = folders.load_segmentation(tmp_path / "camvid", image_size=image_size, cache_dir=tmp_path / "cache")
    assert data.train.images.shape == (2, image_size, image_size, 3)
    for got, (_, _, mask) in zip(data.train.masks, written["train"]):
        assert set(np.unique(got)) <= set(MASK_VALUES.tolist())
        np.testing.assert_array_equal(got, mask[index])
    np.testing.assert_array_equal(data.test.masks[0], written["test"][0][2][index])


def test_sixteen_bit_masks_give_int32(tmp_path):
    write_segmentation(tmp_path / "s", {"train": 1, "test": 1})
    mask = np.array([[0, 300], [70000 % 65536, 65535]], np.uint16).repeat(4, 0).repeat(4, 1)
    write(tmp_path / "s" / "testannot" / "scene_000.png", mask)
    data = folders.load_segmentation(tmp_path / "s", cache_dir=tmp_path / "cache")
    assert data.test.masks.dtype == np.int32 and data.train.masks.dtype == np.int32
    np.testing.assert_array_equal(data.test.masks[0], mask.astype(np.int32))
    assert {300, 65535} <= set(data.mask_values)


def _no_annot(root):
    write_segmentation(root, {"train": 1, "test": 1})
    for file in (root / "trainannot").iterdir():
        file.unlink()
    (root / "trainannot").rmdir()


def _image_without_mask(root):
    write_segmentation(root, {"train": 2, "test": 1})
    (root / "trainannot" / "scene_001.png").unlink()


def _mask_without_image(root):
    write_segmentation(root, {"train": 2, "test": 2})
    (root / "test" / "scene_000.bmp").unlink()


def _rgb_mask(root):
    write_segmentation(root, {"train": 2, "test": 1})
    write(root / "trainannot" / "scene_001.png", random_image(3))


def _mask_of_another_size(root):
    write_segmentation(root, {"train": 2, "test": 1})
    write(root / "testannot" / "scene_000.png", np.zeros((4, 8), np.uint8))


def _val_without_annot(root):
    write_segmentation(root, {"train": 1, "test": 1})
    write(root / "val" / "x.png", random_image(3))


def _duplicate_name(root):
    write_segmentation(root, {"train": 1, "test": 1})
    write(root / "train" / "scene_000.png", random_image(3))


BAD_SEGMENTATION = [
    (_no_annot, r"s has no trainannot/ folder \(it has test/, testannot/, train/\); expected train/, "),
    (_image_without_mask, r"the image .*s/train/scene_001.bmp has no mask in .*s/trainannot \(a file named "),
    (_mask_without_image, r"the mask .*s/testannot/scene_000.png has no image in .*s/test"),
    (_rgb_mask, r"the mask .*s/trainannot/scene_001.png has mode RGB \(3 channels\); masks must be single-"),
    (_mask_of_another_size, r"the mask .*s/testannot/scene_000.png is 4x8 but its image .*/scene_000.bmp is"),
    (_val_without_annot, r"s has no valannot/ folder"),
    (_duplicate_name, r"s/train/scene_000.bmp and .*s/train/scene_000.png share the name"),
]


@pytest.mark.parametrize("make,message", named_cases(BAD_SEGMENTATION))
def test_bad_segmentation_folders_name_the_culprit(tmp_path, make, message):
    make(tmp_path / "s")
    with pytest.raises(ValueError, match=message):
        folders.load_segmentation(tmp_path / "s", image_size=4, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --- a pool of unlabelled images -----------------------------------------------------------------


def write_pool(root: Path) -> dict[str, np.ndarray]:
    written = {
        rel: write(root / rel, random_image(3))
        for rel in ("b.png", "a.png", "sub/c.png", "sub/deeper/d.bmp", "other/e.png")
    }
    (root / ".hidden").mkdir()
    write(root / ".hidden" / "f.png", random_image(3))
    (root / "notes.txt").write_text("ignored")
    return written


def test_pool_lists_and_reads_by_relative_path(tmp_path, decodes):
    written = write_pool(tmp_path / "pool")
    assert folders.list_images(tmp_path / "pool") == sorted(written)
    chosen = ["sub/deeper/d.bmp", "a.png", "other/e.png"]
    images = folders.read_images(tmp_path / "pool", chosen, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(images, np.stack([written[rel] for rel in chosen]))
    decodes.clear()
    again = folders.read_images(tmp_path / "pool", chosen, cache_dir=tmp_path / "cache")
    assert decodes == []
    np.testing.assert_array_equal(again, images)
    resized = folders.read_images(tmp_path / "pool", chosen, 4, cache_dir=tmp_path / "cache")
    assert resized.shape == (3, 4, 4, 3)


def test_pool_archive_names_files_inside_it(tmp_path):
    written = write_pool(tmp_path / "pool")
    archive = make_tar(tmp_path / "pool", tmp_path / "photos.tgz", "photos")
    names = folders.list_images(archive)
    assert names == sorted(f"photos/{rel}" for rel in written)
    images = folders.read_images(archive, names, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(images, np.stack([written[name[len("photos/") :]] for name in names]))


def test_pool_fingerprint_follows_the_listing(tmp_path):
    write_pool(tmp_path / "pool")
    before = folders.source_fingerprint(tmp_path / "pool")
    assert folders.source_fingerprint(tmp_path / "pool") == before
    (tmp_path / "pool" / "more notes.txt").write_text("not an image: not part of the pool")
    assert folders.source_fingerprint(tmp_path / "pool") == before
    write(tmp_path / "pool" / "new.png", random_image(3))
    added = folders.source_fingerprint(tmp_path / "pool")
    assert added != before
    (tmp_path / "pool" / "new.png").rename(tmp_path / "pool" / "renamed.png")
    assert folders.source_fingerprint(tmp_path / "pool") not in (before, added)
    os.utime(tmp_path / "pool" / "a.png", ns=(5, 5))
    touched = folders.source_fingerprint(tmp_path / "pool")
    os.utime(tmp_path / "pool" / "a.png", ns=(6, 6))
    assert folders.source_fingerprint(tmp_path / "pool") != touched


def test_bad_pools(tmp_path):
    write_pool(tmp_path / "pool")
    with pytest.raises(ValueError, match=r"1 of the 2 paths are not image files in .*pool, e.g. 'notes.txt'"):
        folders.read_images(tmp_path / "pool", ["a.png", "notes.txt"], cache_dir=tmp_path / "cache")
    write(tmp_path / "pool" / "big.png", random_image(3, (9, 8)))
    with pytest.raises(ValueError, match=r"pool/a.png is 8x8 and .*pool/big.png is 9x8"):
        folders.read_images(tmp_path / "pool", ["a.png", "big.png"], cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no image files"):
        folders.list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no image paths given"):
        folders.read_images(tmp_path / "pool", [], cache_dir=tmp_path / "cache")


def test_is_image_source(tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(b"")
    (tmp_path / "a.npz").write_bytes(b"")
    assert folders.is_image_source(tmp_path) and folders.is_image_source(tmp_path / "a.tar.gz")
    assert not folders.is_image_source(tmp_path / "a.npz")


# --- the shared real datasets --------------------------------------------------------------------


SHARED = {
    # archive: (loader, check)
    "fashion-mnist-png.tar.gz": "classification",
    "cifar10-jpeg.tar.gz": "classification",
    "camvid-segnet-180x240.tar.gz": "segmentation",
}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


@pytest.mark.parametrize("archive", list(SHARED))
def test_shared_archives(tmp_path, archive, decodes):
    path = shared_archive(archive)
    load = folders.load_classification if SHARED[archive] == "classification" else folders.load_segmentation
    data, first = timed(load, path, cache_dir=tmp_path)
    n_decoded = len(decodes)
    again, cached = timed(load, path, cache_dir=tmp_path)
    print(f"\n{archive}: first load {first:.1f} s ({n_decoded} files decoded), cached load {cached:.2f} s")
    assert len(decodes) == n_decoded  # the second load decoded nothing

    if archive.startswith("camvid"):
        assert [len(s.names) for s in (data.train, data.val, data.test)] == [367, 101, 233]
        assert data.train.images.shape[1:] == (180, 240, 3) and data.test.masks.shape[1:] == (180, 240)
        assert data.mask_values == tuple(range(12))  # 11 classes and the void label 11
        np.testing.assert_array_equal(again.val.masks, data.val.masks)
        return
    x_train, y_train = data.x_train, data.y_train
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    np.testing.assert_array_equal(again.x_test, data.x_test)
    if archive.startswith("fashion"):
        assert x_train.shape == (60000, 28, 28, 1) and data.class_names == tuple(str(i) for i in range(10))
        assert np.bincount(y_train).tolist() == [6000] * 10
        assert abs(x_train.mean() / 255 - 0.2860) < 1e-4  # the published mean of Fashion-MNIST's train set
    else:
        assert x_train.shape == (50000, 32, 32, 3) and data.class_names[:2] == ("airplane", "automobile")
        assert np.bincount(y_train).tolist() == [5000] * 10
        # The official set's channel means; the archive's README promises JPEG is within 0.1 of them.
        means = x_train.reshape(-1, 3).mean(axis=0, dtype=np.float64)
        np.testing.assert_allclose(means, [125.307, 122.950, 113.865], atol=0.1)
        # The named normalisations against these images' own statistics: pycls's constants are CIFAR-10's
        # means and standard deviations; the kuangliu/pytorch-cifar ones its means, with standard
        # deviations that are not its own (about 0.2 where the data's are about 0.25).
        squares = sum(np.square(x_train[i:i + 5000].reshape(-1, 3).astype(np.float64)).sum(0)
                      for i in range(0, len(x_train), 5000))  # a slice at a time: no 1 GB float copy
        stds = np.sqrt(squares / (x_train.size // 3) - means**2) / 255
        np.testing.assert_allclose(data_module.PYCLS_CIFAR[0], means / 255, atol=5e-4)
        np.testing.assert_allclose(data_module.PYCLS_CIFAR[1], stds, atol=2e-3)
        np.testing.assert_allclose(data_module.PYTORCH_CIFAR[0], means / 255, atol=5e-4)
        assert np.all(np.asarray(data_module.PYTORCH_CIFAR[1]) < stds - 0.04)
