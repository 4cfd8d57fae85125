"""`subtomograms_simulated`: a SIMULATED cryo-ET subtomogram classification set, deterministic from a seed.

No real subtomogram set can be downloaded here (AITom's are hosted elsewhere), so this one is simulated,
and says so. What it models, in this order, per volume:
  1. K classes of macromolecule-like densities: each class a fixed 3-D arrangement of `blobs` isotropic
     Gaussian blobs of equal weight (drawn once from `structure_seed`), centred on their centre of mass and
     scaled so that every class has the SAME mass and the SAME radius of gyration -- size and brightness
     alone do not separate the classes, only the arrangement does;
  2. a uniformly random 3-D rotation of the particle (the density is rendered analytically at the rotated
     blob centres: no interpolation);
  3. in the microscope's frame (after the rotation, so the particle's own orientation decides what is
     lost): the missing wedge of a single-axis tilt series about y with the beam along z, tilts of
     +-`tilt` degrees (60 by default): Fourier components with |k_z| > tan(tilt) |k_x| are set to 0;
  4. a contrast transfer function with `defocus` (micrometres, underfocus), `voltage` (kV), spherical
     aberration `cs` (mm), amplitude contrast 0.07, at `voxel_size` (nm), applied as a function of the
     3-D spatial frequency |k| (the usual subtomogram approximation, as in AITom's simulations: no
     defocus gradient across the tilt series, no envelope);
  5. white Gaussian noise at a signal-to-noise ratio SNR = var(signal) / var(noise) (AITom's definition),
     the variance of each volume's signal after steps 1-4 setting its noise's: 0.1 (AITom's demo) by default.
What it does not model: real structures (PDB maps), ice and its thickness, crowding and neighbouring
particles, the noise's path through the reconstruction (here the noise is white, not wedge-filtered),
beam damage, alignment and localisation errors, the CTF's per-tilt defocus. Accuracies on it are about
this simulation, not about any cryo-ET data set.

The dataset name takes options after a colon: `subtomograms_simulated:size=40,snr=0.5,classes=5,
train=2000,test=500,seed=0` (defaults in `SimulationSettings`). The box is 40 nm whatever `size` is
(voxel_size = 40 nm / size), so a smaller size samples the same particles more coarsely.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

NAME = "subtomograms_simulated"
BOX_NM = 40.0
AMPLITUDE_CONTRAST = 0.07


@dataclasses.dataclass(frozen=True)
class SimulationSettings:
    size: int = 40  # voxels along each axis
    classes: int = 5
    train: int = 2000
    test: int = 500
    snr: Optional[float] = 0.1  # var(signal) / var(noise); None: no noise
    tilt: float = 60.0  # degrees: the tilt range is +-tilt about the y axis
    defocus: float = 5.0  # micrometres of underfocus
    voltage: float = 300.0  # kV
    cs: float = 2.0  # mm
    blobs: int = 8  # Gaussian blobs per particle
    radius_of_gyration: float = 0.17  # of the blob centres, as a fraction of the box
    blob_sigma: float = 0.06  # fraction of the box
    seed: int = 0  # rotations and noise
    structure_seed: int = 0  # the classes' arrangements

    @property
    def voxel_size(self) -> float:
        """nm per voxel."""
        return BOX_NM / self.size


def parse_name(name: str) -> SimulationSettings:
    """`subtomograms_simulated[:key=value,...]` -> its settings; ValueError names an unknown or bad key."""
    base, _, options = name.partition(":")
    if base != NAME:
        raise ValueError(f"{name!r} is not {NAME}[:key=value,...]")
    fields = {f.name: f for f in dataclasses.fields(SimulationSettings)}
    values = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, _, text = item.partition("=")
        if key not in fields or not text:
            raise ValueError(f"{NAME}: unknown option {item!r}; options are {', '.join(fields)} (key=value)")
        kind = int if fields[key].type in ("int",) else float
        try:
            values[key] = None if key == "snr" and text.lower() in ("none", "inf") else kind(text)
        except ValueError:
            raise ValueError(f"{NAME}: {key}={text!r} is not a number") from None
    settings = SimulationSettings(**values)
    if settings.size < 8 or settings.classes < 2 or settings.train < 1 or settings.test < 1:
        raise ValueError(f"{NAME}: needs size >= 8, classes >= 2 and train, test >= 1; got {settings}")
    if settings.snr is not None and not settings.snr > 0:
        raise ValueError(f"{NAME}: snr must be positive (or none), got {settings.snr}")
    return settings


def class_structures(settings: SimulationSettings) -> np.ndarray:
    """(K, blobs, 3) blob centres (x, y, z) in voxels about the box centre: centre of mass at 0 and radius
    of gyration exactly `radius_of_gyration * size` for every class (equal weights: equal mass)."""
    rng = np.random.default_rng([settings.structure_seed, 7919])
    points = rng.uniform(-1.0, 1.0, (settings.classes, settings.blobs, 3))
    points -= points.mean(axis=1, keepdims=True)
    gyration = np.sqrt(np.mean(np.sum(points**2, axis=-1), axis=1))
    return points / gyration[:, None, None] * settings.radius_of_gyration * settings.size


def render(centres: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """A [z, y, x] volume: the sum of unit-height Gaussian blobs at `centres` (x, y, z, about the centre)."""
    axis = np.arange(size) - (size - 1) / 2
    density = np.zeros((size, size, size))
    for x, y, z in centres:
        gz, gy, gx = (np.exp(-((axis - c) ** 2) / (2 * sigma**2)) for c in (z, y, x))
        density += gz[:, None, None] * gy[None, :, None] * gx[None, None, :]  # separable: exact and cheap
    return density


def frequencies(size: int, voxel_size: float = 1.0):
    """(k_z, k_y, k_x) grids of numpy's FFT layout, in cycles per unit of `voxel_size`."""
    k = np.fft.fftfreq(size, d=voxel_size)
    return np.meshgrid(k, k, k, indexing="ij")


def wedge_mask(size: int, tilt: float) -> np.ndarray:
    """1 where a single-axis tilt series about y (beam along z) with tilts +-`tilt` degrees samples Fourier
    space (|k_z| <= tan(tilt) |k_x|, the origin kept), 0 in the missing wedge."""
    kz, _, kx = frequencies(size)
    return ((np.abs(kz) <= math.tan(math.radians(tilt)) * np.abs(kx) + 1e-12)).astype(np.float64)


def ctf(size: int, voxel_size: float, defocus: float, voltage: float, cs: float) -> np.ndarray:
    """-(sqrt(1 - A^2) sin(chi) + A cos(chi)), chi = pi lambda dz k^2 - pi/2 Cs lambda^3 k^4, on |k| (1/nm):
    the phase-contrast CTF with amplitude contrast A = 0.07 (lambda: the relativistic electron wavelength)."""
    volts = voltage * 1e3
    # h / sqrt(2 m_e e) in nm V^(1/2) and e / (2 m_e c^2) in 1/V, from CODATA 2018: 1.96875 pm at 300 kV.
    wavelength = 1.2264259653234233 / math.sqrt(volts * (1 + 9.784755904550028e-07 * volts))  # nm
    kz, ky, kx = frequencies(size, voxel_size)
    k2 = kz**2 + ky**2 + kx**2
    chi = math.pi * wavelength * defocus * 1e3 * k2 - math.pi / 2 * cs * 1e6 * wavelength**3 * k2**2
    a = AMPLITUDE_CONTRAST
    return -(math.sqrt(1 - a * a) * np.sin(chi) + a * np.cos(chi))


def microscope(density: np.ndarray, transfer: np.ndarray) -> np.ndarray:
    """Steps 3 and 4: the density filtered by `transfer` (wedge mask times CTF) in Fourier space."""
    return np.real(np.fft.ifftn(np.fft.fftn(density) * transfer))


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 3) rotations, uniform on SO(3)."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(n, random_state=rng).as_matrix()


def simulate(settings: SimulationSettings, labels: np.ndarray, rng: np.random.Generator, *,
             with_noise: bool = True):
    """The subtomograms of classes `labels`, one (size, size, size) float64 volume at a time (before
    per-volume normalisation). Every rotation is drawn first, then each volume's noise: the same rng
    state with and without noise gives the same signals."""
    structures = class_structures(settings)
    sigma = settings.blob_sigma * settings.size
    transfer = wedge_mask(settings.size, settings.tilt) * ctf(settings.size, settings.voxel_size, settings.defocus,
                                                              settings.voltage, settings.cs)
    rotations = random_rotations(rng, len(labels))
    for label, rotation in zip(labels, rotations):
        signal = microscope(render(structures[label] @ rotation.T, settings.size, sigma), transfer)
        if with_noise and settings.snr is not None:
            signal = signal + rng.normal(0.0, math.sqrt(signal.var() / settings.snr), signal.shape)
        yield signal


def load_simulated(name: str = NAME):
    """The dataset `name` (see the module docstring): balanced classes, per-volume normalised float32."""
    from jaxal.data.volumes import normalize_volume, volume_dataset

    settings = parse_name(name)
    splits = []
    for split, count in ((0, settings.train), (1, settings.test)):
        rng = np.random.default_rng([settings.seed, split])
        labels = rng.permutation(np.arange(count) % settings.classes).astype(np.int32)
        x = np.empty((count, settings.size, settings.size, settings.size, 1), np.float32)
        for i, volume in enumerate(simulate(settings, labels, rng)):
            x[i, ..., 0] = normalize_volume(volume)
        splits += [x, labels]
    classes = tuple(f"class{k}" for k in range(settings.classes))
    return volume_dataset(name, *splits, class_names=classes, num_classes=settings.classes)
