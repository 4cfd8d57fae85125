"""3-D CNNs for subtomogram classification, with the sizes of AITom's code (xulabs/aitom).

Both are VGG-like: three stages of two 3x3x3 convolutions ("same" padding, ReLU) and a 2x2x2 max-pool
with stride 2 (32, 64, 128 channels), a flatten, two fully connected ReLU layers with dropout 0.7 after
each, and the linear `head`:
  - "dsrf3d": DSRF3D-v2 (Che et al. 2018; AITom `classify/deep/supervised/cnn/subdivide.py` `DSRF3D_v2`):
    FC 1024 -> FC 1024; Keras' default initialisers (Glorot uniform kernels, zero biases).
  - "hal3d": the classifier of AITom's hybrid active learning (`cnn/active/hal/models.py` `get_model`):
    FC 1024 -> FC 256; He-uniform convolution kernels, truncated-normal (std 0.05) dense kernels.
  - "dsrf3d_half", "hal3d_half": the same layers at half the width everywhere (channels 16-32-64, FC 512
    -> 512 or 512 -> 128), the CPU size of the experiments.
  - "dsrf3d_half_cpu": NOT an AITom model: dsrf3d_half with BatchNorm after each convolution (before its
    ReLU) and the mean over the last stage's voxels in place of the flatten (64 values into FC 1). With
    AITom's flatten, FC 1 sees each 3 x 3 x 3 position separately, so the network has to learn every class
    in every orientation from the labelled volumes; the mean over the voxels makes the features' sum over
    the volume, like the radial power spectrum that separates these classes, nearly independent of the
    particle's orientation. On a CPU budget the faithful model stays at chance where this one leaves it
    (README, "Volumes").
Both codes are written for 40^3 inputs (HAL's `train_cryoet_model` also for 28^3). The flatten adapts to
any size: each pool floors (Keras' "valid" pooling), so a D x H x W input reaches the flatten as
(D//8) x (H//8) x (W//8) x 128 values -- 5^3 x 128 = 16000 at 40^3 (16.4M weights in FC 1), 3^3 x 128 =
3456 at 24^3 -- and the first dense layer's input size follows from it at initialisation. A volume
smaller than 8 voxels along an axis pools to nothing and is refused before a run (`jaxal.loop`).

`ModelOutput`: features = the last hidden layer (what coreset and BADGE embed), blocks = the three pooled
stages and the first hidden layer (for the LL4AL loss-prediction module; it averages each over its voxels).
Dropout (Keras' `Dropout(0.7)` after each hidden layer) is on in training and in MC-dropout BALD.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn

from jaxal.models import ModelOutput, _dropout

AITOM_CHANNELS = (32, 64, 128)


class SubtomogramCNN(nn.Module):
    num_classes: int
    channels: Sequence[int] = AITOM_CHANNELS
    hidden: Sequence[int] = (1024, 1024)
    dropout_rate: float = 0.7
    conv_init: Callable = nn.initializers.glorot_uniform()
    dense_init: Callable = nn.initializers.glorot_uniform()
    batch_norm: bool = False  # BatchNorm after each convolution, before its ReLU (not in AITom's models)
    # "flatten" (AITom's) or "average": the mean over the voxels of the last pooled stage (not in AITom's models)
    pooling: str = "flatten"

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False) -> ModelOutput:
        h, blocks = x, []
        for stage, width in enumerate(self.channels):
            for i in range(2):
                h = nn.Conv(width, (3, 3, 3), padding="SAME", kernel_init=self.conv_init,
                            name=f"conv{stage + 1}_{i + 1}")(h)
                if self.batch_norm:
                    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{stage + 1}_{i + 1}")(h)
                h = nn.relu(h)
            h = nn.max_pool(h, (2, 2, 2), strides=(2, 2, 2))
            blocks.append(h)
        h = h.reshape((h.shape[0], -1)) if self.pooling == "flatten" else h.mean(axis=(1, 2, 3))
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, kernel_init=self.dense_init, name=f"fc{i + 1}")(h))
            features = h
            if i < len(self.hidden) - 1:
                blocks.append(h)
            h = _dropout(self.dropout_rate, train, mc_dropout)(h)
        logits = nn.Dense(self.num_classes, kernel_init=self.dense_init, name="head")(h)
        return ModelOutput(logits, features, tuple(blocks))


_HAL_INITS = dict(conv_init=nn.initializers.he_uniform(), dense_init=nn.initializers.truncated_normal(0.05))
_HALF = tuple(c // 2 for c in AITOM_CHANNELS)

VOLUME_MODELS = {
    "dsrf3d": functools.partial(SubtomogramCNN, hidden=(1024, 1024)),
    "hal3d": functools.partial(SubtomogramCNN, hidden=(1024, 256), **_HAL_INITS),
    "dsrf3d_half": functools.partial(SubtomogramCNN, channels=_HALF, hidden=(512, 512)),
    "hal3d_half": functools.partial(SubtomogramCNN, channels=_HALF, hidden=(512, 128), **_HAL_INITS),
    # NOT AITom's: dsrf3d_half with BatchNorm after each convolution and the mean over the last stage's voxels
    # in place of the flatten, for CPU budgets (module docstring).
    "dsrf3d_half_cpu": functools.partial(SubtomogramCNN, channels=_HALF, hidden=(512, 512), batch_norm=True,
                                         pooling="average"),
}


def flatten_size(shape: Sequence[int], channels: Sequence[int] = AITOM_CHANNELS) -> int:
    """Inputs of the first dense layer for volumes of `shape` (D, H, W): three floor-halvings per axis."""
    return math.prod(s // 8 for s in shape[:3]) * channels[-1]
