"""Flax models: MLP, a small CNN, ResNet-18 (CIFAR stem), VGG-16, a DRN-D segmenter, and the LL4AL
loss-prediction module.

Every classifier returns a `ModelOutput`: the logits, the penultimate features (what coreset and BADGE
embed) and the intermediate block outputs (what the loss-prediction module reads). Under jit the
outputs a caller does not use are dead code, so one return type serves training, scoring and features.

Your own model: any Flax linen module works if
  - `__call__(x)` takes a batch of images (N, H, W, C), float32 and already normalised (`adapt` does it),
    and returns the logits (N, num_classes), or a `ModelOutput`, or a dict with "logits" and optionally
    "features" (N, d) (for coreset, BADGE) and "blocks" (a sequence of (N, ...) arrays, for the LL4AL
    loss-prediction module of ll4al and lplgrad);
  - it takes the keyword arguments `train` (batch statistics and dropout on) and `mc_dropout` (dropout
    on, BatchNorm in inference mode; needed by BALD) if it has such layers, and may omit them otherwise;
  - its variables are "params" and optionally "batch_stats" (updated with `mutable=["batch_stats"]`),
    its random layers draw from the "dropout" stream.
`adapt` wraps it so that the rest of jaxal sees a `ModelOutput` and passes only the keywords the module
takes; a strategy that needs an output the model does not give is refused before the run starts.

Modes: `train=True` uses batch statistics and updates the BatchNorm running averages (pass
`mutable=["batch_stats"]`) and enables dropout; `train=False` is inference mode (running averages,
no dropout), the mode every scoring function uses. `mc_dropout=True` turns dropout on while
BatchNorm stays in inference mode (MC-dropout BALD).

The final classifier layer is always named `head`, so "last layer" parameter subsets find it by name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ModelOutput(NamedTuple):
    logits: jax.Array  # (batch, num_classes), or (batch, H, W, num_classes) for segmentation
    features: Optional[jax.Array] = None  # (batch, d): penultimate representation, input of `head`
    blocks: tuple[jax.Array, ...] = ()  # intermediate outputs, (batch, H, W, C) or (batch, C)


def _dropout(rate: float, train: bool, mc_dropout: bool) -> nn.Dropout:
    return nn.Dropout(rate, deterministic=not (train or mc_dropout))


class MLP(nn.Module):
    num_classes: int
    hidden: Sequence[int] = (256, 128)
    dropout_rate: float = 0.25

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False) -> ModelOutput:
        h = x.reshape((x.shape[0], -1))
        blocks = []
        for width in self.hidden:
            h = nn.relu(nn.Dense(width)(h))
            blocks.append(h)
        features = h
        h = _dropout(self.dropout_rate, train, mc_dropout)(features)
        return ModelOutput(nn.Dense(self.num_classes, name="head")(h), features, tuple(blocks))


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, a max-pool and a dense layer: the default for 8x8 digits and 28x28 MNIST."""

    num_classes: int
    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    dropout_rate: float = 0.25

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False) -> ModelOutput:
        blocks = []
        h = x
        for width in self.channels:
            h = nn.relu(nn.Conv(width, (3, 3))(h))
            blocks.append(h)
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = nn.relu(nn.Dense(self.hidden)(h.reshape((h.shape[0], -1))))
        blocks.append(h)
        features = h
        h = _dropout(self.dropout_rate, train, mc_dropout)(features)
        return ModelOutput(nn.Dense(self.num_classes, name="head")(h), features, tuple(blocks))


def _batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    # momentum 0.9 in Flax is PyTorch's momentum 0.1, the reference codes' default.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda f, s, k, name: nn.Conv(f, (k, k), (s, s), padding=((k // 2, k // 2),) * 2,
                                             use_bias=False, name=name)
        h = nn.relu(_batch_norm(train, "bn1")(conv(self.filters, self.strides, 3, "conv1")(x)))
        h = _batch_norm(train, "bn2")(conv(self.filters, 1, 3, "conv2")(h))
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = _batch_norm(train, "shortcut_bn")(conv(self.filters, self.strides, 1, "shortcut")(x))
        return nn.relu(h + x)


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), as in kuangliu/pytorch-cifar and the
    reference codes of Wang et al., LL4AL, LPLgrad and ISAL."""

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    dropout_rate: float = 0.0

    @property
    def min_image_size(self) -> int:
        """Each stage after the first halves the images (padded convolutions never reach 0 pixels, unlike
        VGG's pooling): below this size some stages run on 1-pixel maps, mostly padding."""
        return 2 ** (len(self.stage_sizes) - 1)

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False) -> ModelOutput:
        h = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem")(x)
        h = nn.relu(_batch_norm(train, "stem_bn")(h))
        blocks = []
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                h = BasicBlock(self.width * 2**stage, strides, name=f"stage{stage}_block{block}")(h, train)
            blocks.append(h)
        features = jnp.mean(h, axis=(1, 2))
        h = _dropout(self.dropout_rate, train, mc_dropout)(features)
        return ModelOutput(nn.Dense(self.num_classes, name="head")(h), features, tuple(blocks))


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG-16 with BatchNorm and a single linear classifier (the CIFAR variant of the LL4AL code)."""

    num_classes: int
    layout: Sequence[Any] = VGG16_LAYOUT
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False) -> ModelOutput:
        h, blocks = x, []
        for item in self.layout:
            if item == "M":
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
                blocks.append(h)
            else:
                h = nn.Conv(item, (3, 3), padding=((1, 1), (1, 1)))(h)
                h = nn.relu(_batch_norm(train)(h))
        features = jnp.mean(h, axis=(1, 2))
        h = _dropout(self.dropout_rate, train, mc_dropout)(features)
        # LL4AL reads the last four pooled stages.
        return ModelOutput(nn.Dense(self.num_classes, name="head")(h), features, tuple(blocks[-4:]))


# ---- segmentation ---------------------------------------------------------------------------------

DRN_D_22_LAYERS = (1, 1, 2, 2, 2, 2, 1, 1)
DRN_D_22_CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)


def _conv_bn_relu(h, features: int, train: bool, *, kernel: int = 3, strides: int = 1, dilation: int = 1,
                  name: str):
    pad = dilation * (kernel // 2)
    h = nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
                kernel_dilation=(dilation, dilation), use_bias=False, name=name)(h)
    return nn.relu(_batch_norm(train, name + "_bn")(h))


class DilatedBlock(nn.Module):
    """DRN's BasicBlock: two 3x3 convolutions with dilation, a residual (1x1 projection when the shape
    changes)."""

    filters: int
    strides: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        d = self.dilation
        h = _conv_bn_relu(x, self.filters, train, strides=self.strides, dilation=d, name="conv1")
        h = nn.Conv(self.filters, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d), use_bias=False,
                    name="conv2")(h)
        h = _batch_norm(train, "bn2")(h)
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = nn.Conv(self.filters, (1, 1), (self.strides, self.strides), use_bias=False, name="shortcut")(x)
            x = _batch_norm(train, "shortcut_bn")(x)
        return nn.relu(h + x)


class DRNSegmenter(nn.Module):
    """A DRN-D dilated residual network for semantic segmentation (Yu, Koltun & Funkhouser, CVPR 2017;
    fyu/drn `drn_d_22` + `DRNSeg`), the model of Wang et al.'s Cityscapes experiment.

    Eight levels (`layers` blocks each, `channels` wide): a 7x7 stem and two levels of plain 3x3
    convolutions (the second with stride 2), two levels of residual blocks with stride 2 (output stride 8),
    two levels of residual blocks with dilation 2 and 4 instead of more striding, then two levels of plain
    convolutions with dilation 2 and 1 (DRN-D's degridding). A level with 0 layers is skipped. The head is
    a 1x1 convolution to the classes, named `head`, and its logits are upsampled bilinearly to the input
    size (DRNSeg's fixed bilinear transposed convolution, as a resize). Dropout (for MC-dropout BALD) sits
    on the last feature map, right before `head`; DRNSeg has none, so the default rate is 0.

    `ModelOutput`: logits (N, H, W, C); features = the last feature map averaged over its pixels (N, d),
    what coreset embeds; blocks = the outputs of levels 3 to 8 (for a loss-prediction module).

    Sizes (`MODELS`): "drn_d_22" is DRN-D-22 as published (channels 16..512; 15.89M parameters with
    Cityscapes' 19 classes, the published 16.4M being those of its 1000-class ImageNet head; Cityscapes on
    a GPU); "drn_d_22_cpu" has the same depth at a quarter of the width (channels 4..128, 1/16 of the
    parameters and multiply-adds), the size for CamVid at 180x240 on a CPU.
    """

    num_classes: int
    layers: Sequence[int] = DRN_D_22_LAYERS
    channels: Sequence[int] = DRN_D_22_CHANNELS
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False) -> ModelOutput:
        height, width = x.shape[1:3]
        layers, channels = self.layers, self.channels
        h = _conv_bn_relu(x, channels[0], train, kernel=7, name="level0")
        blocks = []
        for level, strides in ((0, 1), (1, 2)):  # plain convolutions (levels 1 and 2)
            for i in range(layers[level]):
                h = _conv_bn_relu(h, channels[level], train, strides=strides if i == 0 else 1,
                                  name=f"level{level + 1}_conv{i}")
        for level, strides, dilation in ((2, 2, 1), (3, 2, 1), (4, 1, 2), (5, 1, 4)):  # residual levels 3-6
            for i in range(layers[level]):
                h = DilatedBlock(channels[level], strides if i == 0 else 1, dilation,
                                 name=f"level{level + 1}_block{i}")(h, train)
            if layers[level]:
                blocks.append(h)
        for level, dilation in ((6, 2), (7, 1)):  # degridding: plain dilated convolutions (levels 7, 8)
            for i in range(layers[level]):
                h = _conv_bn_relu(h, channels[level], train, dilation=dilation, name=f"level{level + 1}_conv{i}")
            if layers[level]:
                blocks.append(h)
        features = jnp.mean(h, axis=(1, 2))
        h = _dropout(self.dropout_rate, train, mc_dropout)(h)
        logits = nn.Conv(self.num_classes, (1, 1), name="head")(h)
        logits = jax.image.resize(logits, (logits.shape[0], height, width, logits.shape[-1]), "bilinear")
        return ModelOutput(logits, features, tuple(blocks))


class LossNet(nn.Module):
    """Loss-prediction module of Yoo & Kweon (LL4AL): per block, global average pool and a dense layer
    of `width` with ReLU; concatenate; a linear layer to one predicted loss per example."""

    width: int = 128

    @nn.compact
    def __call__(self, blocks: Sequence[jax.Array]) -> jax.Array:
        pooled = [b if b.ndim == 2 else jnp.mean(b, axis=tuple(range(1, b.ndim - 1))) for b in blocks]
        hidden = [nn.relu(nn.Dense(self.width, name=f"fc{i}")(p)) for i, p in enumerate(pooled)]
        return nn.Dense(1, name="out")(jnp.concatenate(hidden, axis=-1))[:, 0]


MODES = ("train", "mc_dropout")  # the keyword arguments jaxal may pass to a model


@functools.lru_cache(maxsize=None)
def accepted_modes(module_type: type) -> frozenset[str]:
    """Which of MODES `module_type.__call__` takes (all of them if it takes **kwargs)."""
    parameters = inspect.signature(module_type.__call__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return frozenset(MODES)
    return frozenset(mode for mode in MODES if mode in {p.name for p in parameters})


def as_model_output(output) -> ModelOutput:
    """A model's output as a `ModelOutput`: logits alone, a `ModelOutput` (or any object with `.logits`
    and optionally `.features`, `.blocks`), or a dict with "logits" and optionally "features", "blocks"."""
    if isinstance(output, ModelOutput):
        return output
    if isinstance(output, Mapping):
        if "logits" not in output:
            raise ValueError(f"a model returning a dict must put its logits under 'logits'; it has {sorted(output)}")
        get = output.get
    elif hasattr(output, "logits"):
        def get(name, default=None):
            return getattr(output, name, default)
    elif isinstance(output, jax.Array):
        return ModelOutput(output)
    else:
        raise ValueError(f"a model must return its logits, a ModelOutput or a dict with 'logits'; got "
                         f"{type(output).__name__}")
    return ModelOutput(get("logits"), get("features"), tuple(get("blocks") or ()))


class Adapted(nn.Module):
    """A model as jaxal runs it: stored pixels in, normalised on the device as the first operation (so
    images stay uint8 until a batch is there), a `ModelOutput` out. The wrapped module's parameters keep
    their own names and structure (the wrapper shares its scope), so checkpoints, parameter subsets
    ("head") and the gradient engines see the wrapped module's tree unchanged. A module of your own
    (see the module docstring) gets only the keywords of MODES it takes, and its output becomes a
    `ModelOutput` (`as_model_output`)."""

    module: nn.Module
    normalization: Any  # jaxal.data.Normalization: hashable, a static part of the model
    # The dtype the normalised input is cast to (bfloat16 training, `jaxal.train.in_compute_dtype`); None:
    # float32. With parameters cast alike, flax layers then compute in that dtype.
    compute_dtype: Any = None

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, x, train: bool = False, mc_dropout: bool = False) -> ModelOutput:
        modes = {"train": train, "mc_dropout": mc_dropout}
        accepted = accepted_modes(type(self.module))
        x = self.normalization(x)
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        return as_model_output(self.module(x, **{k: v for k, v in modes.items() if k in accepted}))


def adapt(model: nn.Module, normalization) -> Adapted:
    """`model` reading stored pixels normalised by `normalization` (a `jaxal.data.Normalization`)."""
    return Adapted(model, normalization)


def base_model(model: nn.Module) -> nn.Module:
    """The module inside an `Adapted` wrapper (the model itself otherwise): for questions about the
    architecture, such as where its dropout sits."""
    return model.module if isinstance(model, Adapted) else model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet18": ResNet18,
    "vgg16": VGG16,
    "drn_d_22": DRNSegmenter,
    "drn_d_22_cpu": functools.partial(DRNSegmenter, channels=tuple(c // 4 for c in DRN_D_22_CHANNELS)),
}

from jaxal.models.volumes import VOLUME_MODELS  # noqa: E402  (3-D CNNs for subtomograms; they import from here)

MODELS.update(VOLUME_MODELS)


def create_model(name: str, num_classes: int, dropout_rate: float | None = None) -> nn.Module:
    """The model registered as `name`; `dropout_rate=None` keeps the architecture's default."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    kwargs = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
    return MODELS[name](num_classes=num_classes, **kwargs)


@functools.partial(jax.jit, static_argnames=("model", "input_shape"))
def _init(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    return model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)


def init_variables(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict:
    """{'params': ..., 'batch_stats': ...} for one example of `input_shape` (H, W, C).
    `batch_stats` is an empty dict for models without BatchNorm. Compiled once per model and shape."""
    variables = _init(model, rng, tuple(input_shape))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def inference_apply(model: nn.Module, batch_stats) -> Callable[[Any, jax.Array], ModelOutput]:
    """`apply(params, xs) -> ModelOutput` in inference mode with the BatchNorm averages fixed.
    The scoring engines differentiate this with respect to `params` only."""

    def apply(params, xs):
        return model.apply({"params": params, "batch_stats": batch_stats}, xs, train=False)

    return apply
