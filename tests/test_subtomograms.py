"""The simulated subtomograms: SNR measured against its setting, the missing wedge checked in Fourier
space after the rotation (in the microscope's frame, whatever the particle's orientation), equal mass and
radius of gyration across classes, determinism from the seed, and bad options refused."""

import math

import numpy as np
import pytest

from jaxal.data import load_dataset
from jaxal.data import subtomograms as sim


def settings(**overrides):
    return sim.parse_name("subtomograms_simulated:" + ",".join(f"{k}={v}" for k, v in overrides.items()))


@pytest.mark.parametrize("snr", [0.1, 0.5])
def test_measured_snr_is_the_setting(snr):
    s = settings(size=12, snr=snr, classes=3)
    labels = np.arange(24) % 3
    clean = list(sim.simulate(s, labels, np.random.default_rng(5), with_noise=False))
    noisy = list(sim.simulate(s, labels, np.random.default_rng(5)))
    measured = [c.var() / (n - c).var() for c, n in zip(clean, noisy)]  # the noise as the difference
    assert abs(np.mean(measured) / snr - 1) < 0.03  # 24 volumes of 1728 voxels: ~0.7% standard error
    assert min(c.var() for c in clean) > 0


def _wedge_fraction(volume, margin_degrees=1.0):
    """Share of the volume's Fourier energy in the missing wedge of a +-60 degree tilt about y (beam along z),
    the wedge written here as an angle: atan2(|k_z|, |k_x|) > 60 degrees (+ a margin), origin excluded."""
    energy = np.abs(np.fft.fftn(volume)) ** 2
    k = np.fft.fftfreq(volume.shape[0])
    kz, _, kx = np.meshgrid(k, k, k, indexing="ij")
    angle = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    missing = (angle > 60 + margin_degrees) & ((kz != 0) | (kx != 0))
    return energy[missing].sum() / energy.sum()


def test_the_missing_wedge_is_empty_in_the_microscope_frame_after_any_rotation():
    s = settings(size=16, snr="none", classes=2)
    rng = np.random.default_rng(3)
    rotations = sim.random_rotations(rng, 4)
    structures = sim.class_structures(s)
    transfer = sim.wedge_mask(s.size, s.tilt) * sim.ctf(s.size, s.voxel_size, s.defocus, s.voltage, s.cs)
    for rotation in rotations:
        rotated = sim.render(structures[1] @ rotation.T, s.size, s.blob_sigma * s.size)
        assert _wedge_fraction(rotated) > 0.05  # the particle has energy there before the microscope
        assert _wedge_fraction(sim.microscope(rotated, transfer)) < 1e-20
    # The volumes the simulator returns: the same, for its own random rotations.
    for volume in sim.simulate(s, np.array([0, 1, 0]), np.random.default_rng(4)):
        assert _wedge_fraction(volume) < 1e-20
    # The wedge is the tilt range's: at +-60 degrees the sampled region reaches 60 degrees from k_x.
    mask = sim.wedge_mask(16, 60.0)
    k = np.fft.fftfreq(16)
    kz, _, kx = np.meshgrid(k, k, k, indexing="ij")
    angle = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    assert mask[angle < 59].all() and not mask[(angle > 61)].any()


def test_classes_have_equal_mass_and_radius_of_gyration_but_differ():
    s = settings(size=24, classes=4)
    structures = sim.class_structures(s)
    gyration = np.sqrt(np.mean(np.sum(structures**2, -1), 1))
    np.testing.assert_allclose(gyration, s.radius_of_gyration * s.size, rtol=1e-12)
    np.testing.assert_allclose(structures.mean(1), 0, atol=1e-12)
    masses = [sim.render(c, s.size, s.blob_sigma * s.size).sum() for c in structures]
    np.testing.assert_allclose(masses, s.blobs * (2 * math.pi) ** 1.5 * (s.blob_sigma * s.size) ** 3, rtol=1e-3)
    distances = [np.sort(np.linalg.norm(c[:, None] - c[None], axis=-1).ravel()) for c in structures]
    assert min(np.abs(a - b).max() for i, a in enumerate(distances) for b in distances[i + 1:]) > 0.5


def test_deterministic_from_the_seed_and_normalised():
    name = "subtomograms_simulated:size=8,train=6,test=3,classes=3"
    a, b = load_dataset(name), load_dataset(name)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    other = load_dataset(name + ",seed=1")
    assert not np.array_equal(a.x_train, other.x_train)
    assert a.x_train.shape == (6, 8, 8, 8, 1) and np.bincount(a.y_train).tolist() == [2, 2, 2]
    np.testing.assert_allclose(a.x_train.mean(axis=(1, 2, 3, 4)), 0, atol=1e-5)
    np.testing.assert_allclose(a.x_train.std(axis=(1, 2, 3, 4)), 1, atol=1e-4)


@pytest.mark.parametrize("name, message", [
    ("subtomograms_simulated:bogus=1", "unknown option"),
    ("subtomograms_simulated:snr=-1", "snr must be positive"),
    ("subtomograms_simulated:size=4", "size >= 8"),
    ("subtomograms_simulated:size=ten", "is not a number"),
])
def test_bad_options_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(name)


def _reference_ctf(k, defocus_um, voltage_kv, cs_mm, amplitude_contrast):
    """The phase-contrast CTF written from physical constants in SI units, as -sin(chi + phi) with the
    amplitude contrast as a phase shift phi = asin(A) (the simulator writes it as a sum of sin and cos);
    k in 1/m."""
    from scipy import constants as c

    volts = voltage_kv * 1e3
    wavelength = c.h / math.sqrt(2 * c.m_e * c.e * volts * (1 + c.e * volts / (2 * c.m_e * c.c**2)))
    chi = math.pi * wavelength * defocus_um * 1e-6 * k**2 - math.pi / 2 * cs_mm * 1e-3 * wavelength**3 * k**4
    return -np.sin(chi + math.asin(amplitude_contrast)), wavelength


@pytest.mark.parametrize("defocus, voltage, cs, voxel", [(5.0, 300.0, 2.0, 1.0), (2.0, 200.0, 2.7, 0.4)])
def test_ctf_against_the_formula_from_physical_constants_and_its_zero_crossings(defocus, voltage, cs, voxel):
    size = 64
    got = sim.ctf(size, voxel, defocus, voltage, cs)
    kz, ky, kx = sim.frequencies(size, voxel)  # 1/nm
    k = np.sqrt(kz**2 + ky**2 + kx**2) * 1e9  # 1/m
    expected, wavelength = _reference_ctf(k, defocus, voltage, cs, sim.AMPLITUDE_CONTRAST)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert abs(wavelength - {300.0: 1.96875e-12, 200.0: 2.50793e-12}[voltage]) < 1e-17  # published values
    # A function of |k| only, -A at k = 0, and its zeros where chi(k) + asin(A) = n pi (n = 1, 2, ...) --
    # the roots of a quadratic in k^2 -- each bracketed by a sign change along k_x, and no other.
    assert got[0, 0, 0] == pytest.approx(-sim.AMPLITUDE_CONTRAST, abs=1e-12)
    np.testing.assert_allclose(got[0, 0, 5], got[0, 5, 0], atol=1e-12)
    np.testing.assert_allclose(got[0, 0, 5], got[5, 0, 0], atol=1e-12)
    axis = np.fft.fftfreq(size, voxel)[: size // 2]  # 0 .. Nyquist, 1/nm
    line = got[0, 0, : size // 2]
    crossings = np.flatnonzero(np.sign(line[:-1]) != np.sign(line[1:]))
    a, b = math.pi / 2 * cs * 1e6 * (wavelength * 1e9) ** 3, math.pi * wavelength * 1e9 * defocus * 1e3  # nm units
    zeros = []
    for n in range(1, 200):  # chi = b k^2 - a k^4 = n pi - asin(A): the smaller root of a k^4 - b k^2 + c = 0
        c = n * math.pi - math.asin(sim.AMPLITUDE_CONTRAST)
        if b * b < 4 * a * c:
            break
        k2 = (b - math.sqrt(b * b - 4 * a * c)) / (2 * a)
        if math.sqrt(k2) >= axis[-1]:
            break
        zeros.append(math.sqrt(k2))
    assert len(zeros) >= 2 and len(crossings) == len(zeros)
    for i, zero in zip(crossings, zeros):
        assert axis[i] < zero < axis[i + 1]
