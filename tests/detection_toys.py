"""A toy FCOS for the detection tests: a 2-stage backbone (strides 8, 16), 3 levels, 16 channels, 64x64 images."""

import dataclasses

import flax.linen as nn

from jaxal.models import fcos

STRIDES = (8, 16, 32)
ISAL = dataclasses.replace(fcos.FCOS_ISAL, strides=STRIDES, norm_groups=4)
TV = dataclasses.replace(fcos.FCOS_TV, strides=STRIDES, norm_groups=4)


class ToyBackbone(nn.Module):
    """Two stages, strides 8 and 16 (the FPN adds the third level)."""

    @nn.compact
    def __call__(self, x, train=False):
        c3 = nn.relu(nn.Conv(8, (3, 3), (8, 8), padding=((1, 1), (1, 1)))(x))
        c4 = nn.relu(nn.Conv(8, (3, 3), (2, 2), padding=((1, 1), (1, 1)))(c3))
        return c3, c4


def toy_fcos(config, num_classes=3):
    return fcos.FCOS(ToyBackbone(), num_classes, config, channels=16, stacked_convs=2)
