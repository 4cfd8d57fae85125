"""torchvision's ResNet-18/34/50 as a detection backbone (Flax), returning C3, C4, C5 (strides 8, 16, 32).

The layers are torchvision's `resnet.py` (v1.5): a 7x7 stride-2 stem convolution, BatchNorm, ReLU, a 3x3
stride-2 max-pool, then four stages of BasicBlocks (18, 34) or Bottlenecks (50) whose first block strides
(layer2-4) -- on the Bottleneck's 3x3 convolution, as torchvision does (Caffe's v1 strides the 1x1) -- with
a 1x1 convolution + BatchNorm shortcut where the shape changes. No convolution has a bias. Inputs are
NHWC images normalised as torchvision's ImageNet weights expect (mean 0.485, 0.456, 0.406, std 0.229,
0.224, 0.225 of [0, 1] pixels); ISAL's mmdetection config uses Caffe-style weights (BGR, 0..255 minus
the mean, std 1), a deviation of input scaling only.

Freezing, as mmdetection's ResNet (`frozen_stages`, `norm_eval`, `norm_cfg.requires_grad`) and
torchvision's detection backbones (FrozenBatchNorm2d, trainable_backbone_layers=3) do:
  - `frozen_stages=k`: the stem (k >= 0) and stages 1..k get no gradient (a stop_gradient on their output);
    -1 freezes nothing. Default 1: the stem and layer1, as both FCOS configurations.
  - `norm_eval=True`: every BatchNorm uses its running statistics, in training too, and never updates them.
  - `norm_trainable=False`: the BatchNorm scale and bias get no gradient (mmdetection's requires_grad=False).
An optimiser's weight decay would still move frozen parameters: `trainable_mask` marks those that train.

`load_torchvision_weights(path, depth)` reads a torchvision state dict (`resnet50-*.pth` or an .npz of
its arrays) into this module's variables; `fc.*` is ignored.
"""

from __future__ import annotations

import os
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DEPTHS", "ResNetBackbone", "load_torchvision_weights", "torchvision_variables", "trainable_mask"]

# depth -> (block kind, blocks per stage), torchvision's resnet18/34/50
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
_WIDTHS = (64, 128, 256, 512)
_EPS = 1e-5  # torch.nn.BatchNorm2d's
_MOMENTUM = 0.1  # torch's: running = (1 - m) * running + m * batch


class Norm(nn.Module):
    """torch's BatchNorm2d: batch statistics in training (the running variance updated with the unbiased
    batch variance), running statistics otherwise; optionally a frozen scale and bias."""

    use_running_average: bool
    trainable: bool = True

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not self.trainable:
            scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)
        if self.use_running_average:
            m, v = mean.value, var.value
        else:
            m, v = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            if not self.is_initializing():
                n = x.size // c
                mean.value = (1 - _MOMENTUM) * mean.value + _MOMENTUM * m
                var.value = (1 - _MOMENTUM) * var.value + _MOMENTUM * v * n / max(n - 1, 1)
        shape = (1,) * (x.ndim - 1) + (c,)  # explicit: the project raises on implicit rank promotion
        inv = jax.lax.rsqrt(v + _EPS) * scale
        return (x - m.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"), name=name)


class Block(nn.Module):
    """torchvision's BasicBlock ("basic") or Bottleneck ("bottleneck", stride on the 3x3)."""

    kind: str
    width: int
    stride: int
    norm: dict

    @nn.compact
    def __call__(self, x):
        expansion = 4 if self.kind == "bottleneck" else 1
        if self.kind == "basic":
            h = nn.relu(Norm(**self.norm, name="bn1")(_conv(self.width, 3, self.stride, "conv1")(x)))
            h = Norm(**self.norm, name="bn2")(_conv(self.width, 3, 1, "conv2")(h))
        else:
            h = nn.relu(Norm(**self.norm, name="bn1")(_conv(self.width, 1, 1, "conv1")(x)))
            h = nn.relu(Norm(**self.norm, name="bn2")(_conv(self.width, 3, self.stride, "conv2")(h)))
            h = Norm(**self.norm, name="bn3")(_conv(self.width * 4, 1, 1, "conv3")(h))
        if self.stride != 1 or x.shape[-1] != self.width * expansion:
            x = _conv(self.width * expansion, 1, self.stride, "downsample_conv")(x)
            x = Norm(**self.norm, name="downsample_bn")(x)
        return nn.relu(h + x)


class ResNetBackbone(nn.Module):
    depth: int = 50
    frozen_stages: int = 1
    norm_eval: bool = True
    norm_trainable: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {self.depth}")
        kind, blocks = DEPTHS[self.depth]
        norm = {"use_running_average": self.norm_eval or not train, "trainable": self.norm_trainable}
        x = nn.relu(Norm(**norm, name="bn1")(_conv(64, 7, 2, "conv1")(x)))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        if self.frozen_stages >= 0:
            x = jax.lax.stop_gradient(x)
        outputs = []
        for stage, (width, count) in enumerate(zip(_WIDTHS, blocks), start=1):
            for i in range(count):
                stride = 2 if i == 0 and stage > 1 else 1
                x = Block(kind, width, stride, norm, name=f"layer{stage}_{i}")(x)
            if stage <= self.frozen_stages:
                x = jax.lax.stop_gradient(x)
            outputs.append(x)
        return tuple(outputs[1:])


def trainable_mask(params, frozen_stages: int = 1, norm_trainable: bool = False):
    """A pytree of bools like `params` (a ResNetBackbone's): False for the frozen stages' parameters and,
    without `norm_trainable`, the BatchNorm scales and biases -- for optax.masked around weight decay."""

    def stage(top: str) -> int:
        return 0 if top in ("conv1", "bn1") else int(top[5])  # "layer3_1" -> 3

    def trainable(path, _) -> bool:
        names = [getattr(k, "key", str(k)) for k in path]
        if stage(names[0]) <= frozen_stages:
            return False
        return norm_trainable or not any(n.startswith(("bn", "downsample_bn")) for n in names)

    return jax.tree_util.tree_map_with_path(trainable, params)


def torchvision_variables(state: Mapping[str, np.ndarray], depth: int, dtype=np.float32) -> dict:
    """{"params", "batch_stats"} of ResNetBackbone(depth) from a torchvision ResNet state dict (arrays)."""
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    state = {k.removeprefix("module."): np.asarray(v) for k, v in state.items()}
    kind, blocks = DEPTHS[depth]
    params, stats, used = {}, {}, set()

    def take(key: str, shape: tuple) -> np.ndarray:
        if key not in state:
            raise ValueError(f"not a torchvision ResNet-{depth} state dict: {key} is missing")
        value = state[key]
        if value.shape != shape:
            raise ValueError(f"not a torchvision ResNet-{depth} state dict: {key} has shape {value.shape}, "
                             f"ResNet-{depth} needs {shape}")
        used.add(key)
        return value.astype(dtype)

    def conv(torch_name: str, out: int, inp: int, k: int) -> dict:
        return {"kernel": take(f"{torch_name}.weight", (out, inp, k, k)).transpose(2, 3, 1, 0)}  # OIHW -> HWIO

    def norm(torch_name: str, c: int) -> tuple[dict, dict]:
        used.add(f"{torch_name}.num_batches_tracked")
        return ({"scale": take(f"{torch_name}.weight", (c,)), "bias": take(f"{torch_name}.bias", (c,))},
                {"mean": take(f"{torch_name}.running_mean", (c,)), "var": take(f"{torch_name}.running_var", (c,))})

    params["conv1"] = conv("conv1", 64, 3, 7)
    params["bn1"], stats["bn1"] = norm("bn1", 64)
    channels = 64
    expansion = 4 if kind == "bottleneck" else 1
    for stage, (width, count) in enumerate(zip(_WIDTHS, blocks), start=1):
        for i in range(count):
            t, name = f"layer{stage}.{i}", f"layer{stage}_{i}"
            p, s = {}, {}
            if kind == "basic":
                p["conv1"], p["conv2"] = conv(f"{t}.conv1", width, channels, 3), conv(f"{t}.conv2", width, width, 3)
                norms = (("bn1", width), ("bn2", width))
            else:
                p["conv1"] = conv(f"{t}.conv1", width, channels, 1)
                p["conv2"] = conv(f"{t}.conv2", width, width, 3)
                p["conv3"] = conv(f"{t}.conv3", width * 4, width, 1)
                norms = (("bn1", width), ("bn2", width), ("bn3", width * 4))
            for bn, c in norms:
                p[bn], s[bn] = norm(f"{t}.{bn}", c)
            if i == 0 and (stage > 1 or channels != width * expansion):
                p["downsample_conv"] = conv(f"{t}.downsample.0", width * expansion, channels, 1)
                p["downsample_bn"], s["downsample_bn"] = norm(f"{t}.downsample.1", width * expansion)
            params[name], stats[name] = p, s
            channels = width * expansion
    extra = sorted(k for k in state if k not in used and not k.startswith("fc."))
    if extra:
        raise ValueError(f"not a torchvision ResNet-{depth} state dict: unexpected {', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''}")
    return {"params": params, "batch_stats": stats}


_CONVERT = ("python -c \"import numpy as np, torch; s = torch.load('{path}', map_location='cpu'); "
            "s = s.get('state_dict', s); np.savez('{stem}.npz', **{{k: v.numpy() for k, v in s.items()}})\"")


def load_torchvision_weights(path: str | os.PathLike, depth: int, dtype=np.float32) -> dict:
    """ResNetBackbone(depth) variables from torchvision's state dict saved as .pth (needs PyTorch) or .npz."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"the backbone weights {path} do not exist")
    if path.endswith(".npz"):
        try:
            with np.load(path) as data:
                state = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} as an .npz of a state dict: {e}") from e
    elif path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError:
            raise ValueError(
                f"reading {path} needs PyTorch, which is not installed here. Convert it where torch is:\n  "
                + _CONVERT.format(path=path, stem=os.path.splitext(path)[0]) + "\nand pass the .npz") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a file that is not a checkpoint
            raise ValueError(f"cannot read {path} with torch.load: {type(e).__name__}: {e}") from e
        state = state.get("state_dict", state)
        state = {k: v.numpy() for k, v in state.items()}
    else:
        raise ValueError(f"backbone weights must be a .pth or .npz torchvision state dict, got {path}")
    try:
        return torchvision_variables(state, depth, dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
