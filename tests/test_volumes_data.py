"""Volumes on the host: the MRC reader against files written byte by byte here (every mode, both byte
orders, asymmetric shapes so a swapped axis fails), voxel sizes from headers, class folders, path,label
CSVs and 5-D .npz files, per-volume normalisation, and bad input (exit 2, the file named)."""

import struct

import numpy as np
import pytest

from jaxal import run
from jaxal.data import load_dataset, volumes

# MRC modes and the dtypes of their voxels (MRC2014).
MODES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
SHAPE = (5, 6, 7)  # (z, y, x): three different sizes
VOXEL = (2.0, 3.0, 4.5)  # angstrom along z, y, x


def write_mrc(path, volume: np.ndarray, mode: int, order: str = "<", voxel=VOXEL) -> None:
    """An MRC2014 file by hand: the 1024-byte header in byte order `order`, then the voxels with x fastest
    (C order of a [z, y, x] array) -- independent of mrcfile, which only reads it."""
    nz, ny, nx = volume.shape
    data = np.ascontiguousarray(volume, dtype=np.dtype(MODES[mode]).newbyteorder(order))
    header = bytearray(1024)
    struct.pack_into(order + "10i", header, 0, nx, ny, nz, mode, 0, 0, 0, nx, ny, nz)
    struct.pack_into(order + "6f", header, 40, nx * voxel[2], ny * voxel[1], nz * voxel[0], 90.0, 90.0, 90.0)
    struct.pack_into(order + "3i", header, 64, 1, 2, 3)  # columns x, rows y, sections z
    values = volume.astype(np.float64)
    struct.pack_into(order + "3f", header, 76, values.min(), values.max(), values.mean())
    struct.pack_into(order + "2i", header, 88, 1, 0)  # ispg 1: a volume; no extended header
    struct.pack_into(order + "i", header, 108, 20140)  # nversion
    header[208:212] = b"MAP "
    header[212:216] = b"\x44\x44\x00\x00" if order == "<" else b"\x11\x11\x00\x00"
    struct.pack_into(order + "f", header, 216, values.std())
    with open(path, "wb") as f:
        f.write(bytes(header) + data.tobytes())


def asymmetric(mode: int, seed: int = 0) -> np.ndarray:
    """A (5, 6, 7) volume with every voxel distinct (within the dtype's range) and no symmetry."""
    values = np.random.default_rng(seed).permutation(np.prod(SHAPE)).reshape(SHAPE)
    if mode == 0:
        values = values - 100  # int8: -100 .. 109
    return values.astype(MODES[mode])


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_mrc_reader_reads_every_mode_and_byte_order_in_zyx_order(tmp_path, mode, order):
    volume = asymmetric(mode)
    path = tmp_path / f"v{mode}.mrc"
    write_mrc(path, volume, mode, order)
    data, voxel = volumes.read_mrc(path)
    assert data.shape == SHAPE  # (z, y, x): a transposed reader fails here or below
    np.testing.assert_array_equal(data.astype(np.float64), volume.astype(np.float64))
    assert data[1, 2, 3] == volume[1, 2, 3] and data[4, 0, 6] == volume[4, 0, 6]
    np.testing.assert_allclose(voxel, VOXEL, rtol=1e-6)


def test_non_mrc_file_and_a_2d_mrc_are_refused_with_their_name(tmp_path):
    bad = tmp_path / "notes.mrc"
    bad.write_bytes(b"this is not an MRC file" * 60)
    with pytest.raises(ValueError, match="notes.mrc is not a readable MRC file"):
        volumes.read_mrc(bad)
    flat = tmp_path / "flat.mrc"
    write_mrc(flat, np.zeros((1, 4, 4), np.float32), 2)
    np.testing.assert_array_equal(volumes.read_mrc(flat)[0].shape, (1, 4, 4))  # one section is still z, y, x


def _class_folder(root, sizes=None, nan_in=None, shape=(8, 9, 10)):
    """train/<a|b>/ and test/<a|b>/ with 3 + 2 volumes per class; returns {relative path: raw volume}."""
    rng = np.random.default_rng(1)
    written = {}
    for split, count in (("train", 3), ("test", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                name = f"{split}/{label}/p{i}.mrc"
                v = (rng.normal(size=(sizes or {}).get(name, shape)) * 3 + 7).astype(np.float32)
                if name == nan_in:
                    v[0, 0, 0] = np.nan
                write_mrc(root / name, v, 2, "<" if i % 2 else ">")
                written[name] = v
    return written


def test_class_folders_load_normalised_per_volume(tmp_path):
    written = _class_folder(tmp_path)
    data = load_dataset(str(tmp_path))
    assert data.x_train.shape == (6, 8, 9, 10, 1) and data.x_test.shape == (4, 8, 9, 10, 1)
    assert data.class_names == ("a", "b") and data.num_classes == 2
    assert (data.default_model, data.augmentation, data.crop_padding) == ("dsrf3d", "flip", 0)
    order = [f"train/{c}/p{i}.mrc" for c in "ab" for i in range(3)]
    for row, name in enumerate(order):
        raw = written[name].astype(np.float64)
        expected = (raw - raw.mean()) / raw.std()
        np.testing.assert_allclose(data.x_train[row, ..., 0], expected, atol=1e-5)
    np.testing.assert_array_equal(data.y_train, [0, 0, 0, 1, 1, 1])


def test_csv_pool_with_and_without_splits(tmp_path):
    written = _class_folder(tmp_path)
    rows = [f"{name},{name.split('/')[1]}" for name in written]
    (tmp_path / "picks.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    data = load_dataset(str(tmp_path / "picks.csv"))
    assert len(data.x_train) + len(data.x_test) == 10 and len(data.x_test) == 2  # 20% held out, stratified
    assert sorted(np.bincount(data.y_test).tolist()) == [1, 1]
    split_rows = [f"{name},{name.split('/')[1]},{name.split('/')[0]}" for name in written]
    (tmp_path / "split.csv").write_text("\n".join(split_rows))
    data = load_dataset(str(tmp_path / "split.csv"))
    assert (len(data.x_train), len(data.x_test)) == (6, 4)


def test_npz_with_5d_arrays_is_a_volume_dataset(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(6, 4, 5, 6, 1)).astype(np.float16), y_train=np.arange(6) % 3,
                  x_test=rng.normal(size=(3, 4, 5, 6, 1)), y_test=np.arange(3))
    np.savez(tmp_path / "v.npz", **arrays)
    data = load_dataset(str(tmp_path / "v.npz"))
    assert data.image_shape == (4, 5, 6, 1) and data.num_classes == 3 and data.x_train.dtype == np.float32
    raw = arrays["x_test"][1, ..., 0]
    np.testing.assert_allclose(data.x_test[1, ..., 0], (raw - raw.mean()) / raw.std(), atol=1e-5)  # per volume


TINY = ["--strategy", "random", "--initial_size", "3", "--val_size", "0", "--budget", "1", "--cycles", "1",
        "--epochs", "1", "--model", "dsrf3d_half"]


@pytest.mark.parametrize("problem, message", [
    ("size", "train/b/p1.mrc is a volume of 8x8x8"),
    ("nan", "train/a/p2.mrc has 1 non-finite voxels"),
    ("not_mrc", "test/b/p0.mrc is not a readable MRC file"),
])
def test_bad_volumes_exit_2_naming_the_file(tmp_path, capsys, problem, message):
    root = tmp_path / "data"
    _class_folder(root, sizes={"train/b/p1.mrc": (8, 8, 8)} if problem == "size" else None,
                  nan_in="train/a/p2.mrc" if problem == "nan" else None)
    if problem == "not_mrc":
        (root / "test/b/p0.mrc").write_bytes(b"\x00" * 2000)
    assert run.main(["--dataset", str(root), "--workdir", str(tmp_path / "run"), *TINY]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_large_sets_go_to_float16_then_to_a_memory_map(tmp_path, monkeypatch):
    _class_folder(tmp_path / "data")
    paths = sorted((tmp_path / "data" / "train").rglob("*.mrc"))
    full = 6 * 8 * 9 * 10
    monkeypatch.setenv(volumes.MEMORY_ENV, str(full * 2))  # float16 fits, float32 does not
    x, voxel = volumes.read_volumes(paths)
    assert x.dtype == np.float16 and type(x) is np.ndarray
    np.testing.assert_allclose(voxel, VOXEL, rtol=1e-6)
    monkeypatch.setenv(volumes.MEMORY_ENV, str(full))
    with pytest.warns(UserWarning, match="memory-mapped"):
        mapped, _ = volumes.read_volumes(paths, cache_dir=tmp_path / "cache")
    assert isinstance(mapped, np.memmap) and str(tmp_path / "cache") in mapped.filename
    np.testing.assert_array_equal(mapped, x)


def test_central_slices_show_xy_xz_yz():
    v = np.zeros((1, 4, 5, 6, 1), np.float32)
    v[0, 2, :, :, 0] = 1.0  # the central xy plane (z = 4 // 2) lit: xy all 1, xz and yz one row of 1
    sheet = volumes.central_slices(v)[0, ..., 0]
    assert sheet.shape == (6, 20)
    np.testing.assert_array_equal(sheet[:5, :6], 1.0)  # xy: H x W = 5 x 6
    np.testing.assert_array_equal(sheet[:4, 7:13], np.repeat((np.arange(4) == 2)[:, None], 6, 1))  # xz: D x W
    np.testing.assert_array_equal(sheet[:4, 14:19], np.repeat((np.arange(4) == 2)[:, None], 5, 1))  # yz: D x H


def test_query_on_an_mrc_pool_with_a_csv_proposes_volumes_with_slice_contact_sheets(tmp_path):
    from PIL import Image

    from jaxal import query

    pool = tmp_path / "picks"
    (pool / "tomo1").mkdir(parents=True)
    rng = np.random.default_rng(2)
    names = [f"tomo1/p{i:02d}.mrc" for i in range(12)]
    for i, name in enumerate(names):
        write_mrc(pool / name, rng.normal(size=(8, 8, 8)).astype(np.float32) + (i % 2), 2, "<>"[i % 2])
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{n},{'ab'[i % 2]}\n" for i, n in
                                                                  enumerate(names[:6])))
    workdir = tmp_path / "al"
    assert query.main(["--pool", str(pool), "--labels", str(tmp_path / "labels.csv"), "--strategy", "entropy",
                       "--budget", "3", "--workdir", str(workdir), "--model", "dsrf3d_half", "--epochs", "1",
                       "--batch_size", "4", "--progress", "false"]) == 0
    rows = (workdir / "round_000" / "to_label.csv").read_text().splitlines()
    proposed = [row.split(",")[0] for row in rows[1:]]
    assert len(proposed) == 3 and set(proposed) <= set(names[6:])
    sheet = Image.open(workdir / "round_000" / "contact_sheet.png")
    # 3 tiles of the central xy|xz|yz slices (8 x 26 pixels, zoomed 3x) with their captions under them.
    assert sheet.size == (3 * (26 * 3 + 4) + 4, 8 * 3 + 12 + 4 + 4 + 4)
