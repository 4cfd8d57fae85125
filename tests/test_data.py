"""Tests of `jaxal.data`: the embedded digits, tensorflow-datasets sources under `tfds.testing.mock_data`
(offline, no TensorFlow), and validation of user .npz files. Images are stored as they come (uint8
pixels); `Normalization` turns them into model inputs on the device, checked here against NumPy."""

import numpy as np
import pytest
try:
    import tensorflow_datasets as tfds
except ImportError:  # jaxal imports it only for a tfds dataset; its tests skip where it is absent
    tfds = None
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow-datasets is not installed")

from jaxal import data
from jaxal.data import load_dataset

# Published channel statistics, written out here independently of the module's table.
PUBLISHED = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's ImageNet transforms
}


def mock_tfds(num_examples=12):
    # USE_CODE: random examples from the builder's feature spec; no metadata files, network or TF.
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def normalised(ds, x):
    """The model inputs of stored values `x`, computed here in NumPy float64."""
    norm = ds.normalization
    return (x.astype(np.float64) * norm.scale - np.array(norm.mean)) / np.array(norm.std)


def check_arrays(ds, n_train, n_test, shape, num_classes, dtype=np.uint8):
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.image_shape == shape
    assert ds.x_train.dtype == ds.x_test.dtype == dtype
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.num_classes == num_classes
    for y in (ds.y_train, ds.y_test):
        assert 0 <= y.min() and y.max() < num_classes


# --- digits --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_metadata(digits):
    check_arrays(digits, 1347, 450, (8, 8, 1), 10)
    assert digits.name == "digits"
    assert (digits.augmentation, digits.crop_padding, digits.default_model) == ("none", 0, "cnn")
    assert set(np.unique(digits.y_train)) == set(range(10))


def test_digits_normalised_by_train_statistics(digits):
    inputs = normalised(digits, digits.x_train)
    np.testing.assert_allclose(inputs.mean(), 0.0, atol=1e-9)
    np.testing.assert_allclose(inputs.std(), 1.0, atol=1e-9)
    assert digits.normalization.scale == 1 / 16 and digits.x_train.max() == 16
    # The on-device normalisation (float32) computes the same inputs.
    np.testing.assert_allclose(np.asarray(digits.normalization(digits.x_train)), inputs, rtol=1e-5, atol=1e-5)


def test_digits_split_is_a_fixed_stratified_partition(digits):
    from sklearn.datasets import load_digits

    again = load_dataset("digits")
    np.testing.assert_array_equal(digits.x_train, again.x_train)
    np.testing.assert_array_equal(digits.y_test, again.y_test)
    # A partition of the 1797 images: compare the multiset of (image, label) rows with the original data.
    raw = load_digits()
    pixels = np.concatenate([digits.x_train, digits.x_test]).reshape(1797, 64).astype(int)
    labels = np.concatenate([digits.y_train, digits.y_test])
    rows = lambda x, y: sorted(map(tuple, np.column_stack([x, y])))
    assert rows(pixels, labels) == rows(raw.data.astype(int), raw.target)
    # Stratified: the class proportions of train and test agree to within one example per class.
    train_freq, test_freq = np.bincount(digits.y_train) / 1347, np.bincount(digits.y_test) / 450
    np.testing.assert_allclose(test_freq, train_freq, atol=0.01)


# --- tensorflow-datasets (mocked) ----------------------------------------------------------------


@needs_tfds
@pytest.mark.parametrize(
    "name, shape, num_classes, augmentation, padding, model",
    [
        ("cifar10", (32, 32, 3), 10, "crop_flip", 4, "resnet18"),
        ("mnist", (28, 28, 1), 10, "none", 0, "cnn"),
    ],
)
def test_tfds_source_is_stacked_and_normalised(name, shape, num_classes, augmentation, padding, model):
    with mock_tfds(12):
        ds = load_dataset(name, data_dir="/nonexistent/tfds")
        raw = tfds.data_source(name, split="train")
        raw_images = np.stack([raw[i]["image"] for i in range(len(raw))])
        raw_labels = np.array([raw[i]["label"] for i in range(len(raw))])
    check_arrays(ds, 12, 12, shape, num_classes)
    metadata = (ds.name, ds.augmentation, ds.crop_padding, ds.default_model)
    assert metadata == (name, augmentation, padding, model)
    np.testing.assert_array_equal(ds.x_train, raw_images)  # the stored pixels, untouched
    mean, std = (np.array(v) for v in PUBLISHED[name])
    np.testing.assert_allclose(normalised(ds, ds.x_train), (raw_images / 255.0 - mean) / std, rtol=1e-12)
    np.testing.assert_array_equal(ds.y_train, raw_labels)
    assert len(ds.class_names) == num_classes


@needs_tfds
def test_caltech101_images_of_varying_size_are_resized():
    with mock_tfds(6):
        raw = tfds.data_source("caltech101", split="train")
        assert len({raw[i]["image"].shape for i in range(len(raw))}) > 1  # the mock varies sizes too
        ds = load_dataset("caltech101")
        small = load_dataset("caltech101", image_size=16)
    check_arrays(ds, 6, 6, (64, 64, 3), 102)
    assert (ds.augmentation, ds.crop_padding, ds.default_model) == ("crop_flip", 8, "resnet18")
    assert small.image_shape == (16, 16, 3) and small.crop_padding == 2
    # The model inputs are those of torchvision's ImageNet normalisation of the resized pixels.
    mean, std = (np.array(v) for v in PUBLISHED["imagenet"])
    np.testing.assert_allclose(normalised(ds, ds.x_train), (ds.x_train / 255.0 - mean) / std, rtol=1e-12)


def test_resize_keeps_constants_and_is_identity_at_native_size():
    rng = np.random.default_rng(0)
    constant = np.full((9, 13, 2), 7.5, np.float32)
    np.testing.assert_allclose(data._resize([constant], 4), np.full((1, 4, 4, 2), 7.5), rtol=1e-6)
    image = rng.random((5, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(data._resize([image], 5)[0], image, atol=1e-6)
    pixels = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)  # uint8 pixels stay uint8
    resized = data._resize([pixels, np.full((7, 3, 3), 200, np.uint8)], 5)
    assert resized.dtype == np.uint8
    np.testing.assert_array_equal(resized[0], pixels)
    np.testing.assert_array_equal(resized[1], 200)


@needs_tfds
def test_pytorch_cifar_normalization_and_augmentation_override():
    with mock_tfds(4):
        ds = load_dataset("cifar10", normalization="pytorch_cifar", augmentation="crop")
    # The reference codes' transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)) of
    # ToTensor's x / 255 (kuangliu/pytorch-cifar main.py); test_folders checks the constants against the
    # real CIFAR-10's statistics.
    torch_mean, torch_std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2023, 0.1994, 0.2010])
    np.testing.assert_allclose(normalised(ds, ds.x_train), (ds.x_train / 255.0 - torch_mean) / torch_std,
                               rtol=1e-12)
    assert (ds.augmentation, ds.crop_padding) == ("crop", 4)
    with pytest.raises(ValueError, match="'pytorch_cifar' is for RGB images; digits has 1 channel"):
        load_dataset("digits", normalization="pytorch_cifar")
    with pytest.raises(ValueError, match="unknown normalization 'zscore'"):
        load_dataset("digits", normalization="zscore")
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        load_dataset("digits", augmentation="mixup")


@needs_tfds
def test_missing_tfds_data_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)'mnist' is not available in .*--data-dir"):
        load_dataset("mnist", data_dir=str(tmp_path), download=False)


# --- user .npz files -----------------------------------------------------------------------------


def valid_arrays(rng=np.random.default_rng(0)):
    return {
        "x_train": rng.normal(3.0, 2.0, (20, 6, 5, 2)).astype(np.float32),
        "y_train": rng.integers(0, 3, 20),
        "x_test": rng.normal(3.0, 2.0, (7, 6, 5, 2)).astype(np.float32),
        "y_test": np.array([0, 1, 2, 2, 0, 1, 2]),
    }


def save(tmp_path, **arrays):
    path = tmp_path / "user.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_round_trip(tmp_path):
    arrays = valid_arrays()
    ds = load_dataset(save(tmp_path, **arrays))
    check_arrays(ds, 20, 7, (6, 5, 2), 3, np.float32)  # C = 1 + the largest label (every class in training)
    x_train, x_test = (arrays[k].astype(np.float64) for k in ("x_train", "x_test"))
    mean, std = x_train.mean(axis=(0, 1, 2)), x_train.std(axis=(0, 1, 2))
    np.testing.assert_allclose(normalised(ds, ds.x_train), (x_train - mean) / std, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(normalised(ds, ds.x_test), (x_test - mean) / std, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    assert (ds.augmentation, ds.crop_padding, ds.default_model) == ("none", 0, "cnn")


@pytest.mark.parametrize(
    "x_shape, image_shape, model", [((10, 6, 5), (6, 5, 1), "cnn"), ((10, 13), (1, 1, 13), "mlp")]
)
def test_npz_grayscale_and_vectors(tmp_path, x_shape, image_shape, model):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 255, x_shape).astype(np.uint8), np.arange(10) % 2
    ds = load_dataset(save(tmp_path, x_train=x, y_train=y, x_test=x[:3], y_test=y[:3].astype(np.float64)))
    check_arrays(ds, 10, 3, image_shape, 2)  # uint8 pixels stay uint8, scaled by 1/255
    assert ds.default_model == model and ds.normalization.scale == 1 / 255


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.pop("y_test"), "lacks the array.*y_test"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), "x_train has 20 examples but y_train has 19"),
        (lambda a: a.update(y_train=a["y_train"] + 0.5), "y_train has non-integer labels"),
        (lambda a: a.update(y_test=a["y_test"].astype(str)), "y_test must hold integer class labels"),
        (lambda a: a.update(y_train=a["y_train"] - 1), "y_train has negative labels"),
        (lambda a: a["x_train"].__setitem__((3, 0, 0, 0), np.nan), "x_train contains non-finite"),
        (lambda a: a["x_test"].__setitem__((0, 1, 1, 1), np.inf), "x_test contains non-finite"),
        (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]), "x_test is empty"),
        (lambda a: a.update(x_test=a["x_test"][:, :5]), "different image shapes"),
        (lambda a: a.update(y_train=np.eye(3)[a["y_train"]]), "y_train must be a 1-D array"),
        (lambda a: a.update(x_train=a["x_train"][..., None]), r"x_train must have shape \(N, H, W, C\)"),
    ],
)
def test_npz_malformed_raises_naming_the_problem(tmp_path, change, match):
    arrays = valid_arrays()
    change(arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(save(tmp_path, **arrays))


def test_npz_corrupt_or_wrong_files(tmp_path):
    corrupt = tmp_path / "x.npz"
    corrupt.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match="not a valid .npz file"):
        load_dataset(str(corrupt))
    # A truncated archive: a valid zip header, the rest cut off.
    good = save(tmp_path, **valid_arrays())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(good, "rb").read()[:300])
    with pytest.raises(ValueError, match="not a valid .npz file"):
        load_dataset(str(truncated))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="single array, not an .npz archive"):
        load_dataset(str(single))
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npz"))


def test_image_size_resizes_user_images_but_not_vectors(tmp_path):
    ds = load_dataset(save(tmp_path, **valid_arrays()), image_size=12)
    assert ds.image_shape == (12, 12, 2)
    x, y = np.ones((4, 7)), np.arange(4)
    with pytest.raises(ValueError, match="feature vectors"):
        load_dataset(save(tmp_path, x_train=x, y_train=y, x_test=x, y_test=y), image_size=8)
    with pytest.raises(ValueError, match="positive integer"):
        load_dataset("digits", image_size=0)


def test_unknown_name_lists_the_choices():
    match = "unknown dataset 'foo'; choose one of: caltech101, cifar10, .*digits.*folder.* .npz"
    with pytest.raises(ValueError, match=match):
        load_dataset("foo")
    names = {"digits", "cifar10", "cifar100", "svhn_cropped", "caltech101", "mnist", "fashion_mnist"}
    assert set(data.DATASETS) == names
