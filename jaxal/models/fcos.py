"""FCOS (Tian et al., 2019) in Flax: FPN P3-P7 over a backbone's feature maps, and the head shared by the
levels. Two configurations, each following its source:

`fcos_isal` -- the detector ISAL's detection code trains: `dragonlzm/ISAL`
  `detection/configs/mining_experiments/fcos/fcos_r50_caffe_fpn_1x_coco.py` inherits mmdetection v2.4's
  `configs/fcos/fcos_r50_caffe_fpn_4x4_1x_coco.py` (ISAL's Dockerfile checks out `v2.4.0`), whose head is
  `mmdet/models/dense_heads/fcos_head.py` (v2.x, before `AnchorFreeHead`). What the code says, checked
  line by line (the issue's first reading was wrong on two points, marked *):
    * GroupNorm IS in the head: the config gives no `norm_cfg`, so FCOSHead's default
      `norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)` applies, and `conv_bias='auto'` drops
      the tower convs' biases (ConvModule: bias iff no norm).
    - IoU loss (`loss_bbox=dict(type='IoULoss')`: `-log(clamp(iou, 1e-6))`), weighted by the centerness
      targets and divided by their sum (`avg_factor=pos_centerness_targets.sum()`); focal loss (alpha .25,
      gamma 2) over `num_pos + num_imgs`; centerness BCE averaged over the positives.
    - no centre sampling (`center_sampling=False`), centerness on the CLASSIFICATION tower
      (`centerness_on_reg=False`), `bbox_pred = scale(fcos_reg(x)).exp()` (`norm_on_bbox=False`),
      points at `grid * stride + stride // 2`, regress ranges inclusive at both ends.
    * warm-up: `lr_config = dict(warmup='constant')` over `_base_/schedules/schedule_1x.py`'s
      `warmup_iters=500, warmup_ratio=0.001`: 500 iterations at lr x 0.001 (not 1/3, mmdet v1's ratio).
    - SGD lr 0.01 (ISAL), momentum 0.9, weight decay 1e-4, `bias_lr_mult=2., bias_decay_mult=0.`,
      `grad_clip=dict(max_norm=10)` (ISAL's COCO config; its VOC config sets `max_norm=8`), steps at
      epochs 8 and 11 of 12, 2 images x 4 GPUs.
    - test: `nms_pre=1000` per level by max class score x centerness, `score_thr=0.05` on the class
      score BEFORE the centerness factor (v2.x `multiclass_nms`), score = cls x centerness, per-class
      NMS at IoU 0.5, `max_per_img=100`.
`fcos_tv` -- torchvision `torchvision/models/detection/fcos.py` (`fcos_resnet50_fpn`): GroupNorm(32) with
  conv biases, GIoU loss, centre sampling radius 1.5, centerness on the regression tower,
  `relu(bbox_reg(x))` times the anchor size (= the stride, `BoxLinearCoder(normalize_by_size=True)`),
  anchor centres at `grid * stride` (AnchorGenerator's shifts, no half-stride offset), scale ranges
  `(4s, 8s)` exclusive, every loss over `max(1, num_foreground)`; test: score `sqrt(sigmoid(cls) x
  sigmoid(ctr))` > 0.2, 1000 candidates per level, per-class NMS 0.6, 100 detections.

The model returns {"logits": maps, "features": ...} (what `jaxal.models.adapt` turns into a ModelOutput
whose `logits` is a pytree): maps are per-level (tuples over levels, finest first): "cls" (n, h, w, C)
logits, "reg" (n, h, w, 4) distances (left, top, right, bottom) IN PIXELS (both configs: mmdet's exp is
in pixels; torchvision's relu output is multiplied by the stride here, where its box coder would),
"ctr" (n, h, w) centerness logits; "features" is the mean over levels of the two towers' global average
pools (n, 2 x channels) (ISAL's coreset features, its appendix D.2); "blocks" the FPN levels P3-P7 (n, h, w,
channels) each, what LL4AL's loss-prediction module reads on detection (ISAL's appendix D.2).
`jaxal.detection` holds the targets, losses and decoding that read the maps.

The head's convolutions are applied once per level with shared weights: their gradient is the sum of
the per-level gradients (what `jaxal.gradnorm` handles for a layer called several times).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

INF = 1e8  # mmdet fcos_head.py `INF = 1e8`, the last level's upper range


@dataclasses.dataclass(frozen=True)
class FCOSConfig:
    name: str
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    head_bias: bool = False              # tower conv biases (mmdet: conv_bias='auto' with GN -> none)
    norm_groups: int = 32                # GroupNorm groups of the towers (both sources: 32)
    centerness_on_reg: bool = False
    regression: str = "exp"              # "exp": exp(scale_l * x) (mmdet); "relu": relu(x) * stride (tv)
    point_offset: str = "half_stride"    # "half_stride": grid*s + s//2 (mmdet); "none": grid*s (tv)
    range_inclusive: bool = True         # mmdet: lo <= max(ltrb) <= hi; tv: lo < max(ltrb) < hi
    first_lower: float = -1.0            # mmdet (-1, 64); tv lower_bound[:first level] = 0
    last_upper: float = INF              # mmdet INF = 1e8; tv float("inf")
    center_sampling: Optional[float] = None  # radius in strides (tv 1.5)
    box_loss: str = "iou"                # "iou" (mmdet, centerness-weighted) or "giou" (tv)
    normalisation: str = "mmdet"         # "mmdet" or "torchvision": see jaxal.detection.losses
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # decoding
    score_mode: str = "cls_x_ctr"        # mmdet; "sqrt" = sqrt(cls x ctr) (tv)
    score_thresh: float = 0.05           # mmdet on the class score; tv on the combined score
    pre_nms_per_level: int = 1000        # mmdet nms_pre (locations); tv topk_candidates (pairs)
    nms_iou: float = 0.5
    max_per_img: int = 100
    fpn_init: str = "xavier_uniform"     # mmdet FPN init_weights; tv kaiming_uniform_(a=1)


FCOS_ISAL = FCOSConfig(name="fcos_isal")
FCOS_TV = FCOSConfig(
    name="fcos_tv", head_bias=True, centerness_on_reg=True, regression="relu", point_offset="none",
    range_inclusive=False, first_lower=0.0, last_upper=float("inf"), center_sampling=1.5, box_loss="giou",
    normalisation="torchvision", score_mode="sqrt", score_thresh=0.2, nms_iou=0.6, fpn_init="kaiming_a1")
CONFIGS = {c.name: c for c in (FCOS_ISAL, FCOS_TV)}


def regress_ranges(config: FCOSConfig) -> tuple[tuple[float, float], ...]:
    """Per level (lo, hi) of max(l, t, r, b): mmdet's default ((-1, 64), (64, 128), (128, 256), (256, 512),
    (512, INF)) and torchvision's (anchor_size * 4, anchor_size * 8) with 0 / inf at the ends are both
    (4s, 8s) with the ends replaced."""
    ranges = [(4.0 * s, 8.0 * s) for s in config.strides]
    ranges[0] = (config.first_lower, ranges[0][1])
    ranges[-1] = (ranges[-1][0], config.last_upper)
    return tuple(ranges)


def level_points(shape: tuple[int, int], stride: int, config: FCOSConfig):
    """(h*w, 2) x, y of a level's locations, row-major (both sources flatten (h, w) row-major).
    mmdet `_get_points_single`: `stack((x * stride, y * stride)) + stride // 2`; torchvision: the
    anchors' centres, `arange(w) * stride` (base anchors are centred on 0)."""
    h, w = shape
    offset = stride // 2 if config.point_offset == "half_stride" else 0
    ys, xs = jnp.meshgrid(jnp.arange(h) * stride, jnp.arange(w) * stride, indexing="ij")
    return jnp.stack([xs.reshape(-1), ys.reshape(-1)], -1).astype(jnp.float32) + offset


def _init(kind: str):
    if kind == "xavier_uniform":
        return nn.initializers.xavier_uniform()
    return nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # kaiming_uniform_(a=1)


def nearest_resize(x, size):
    """torch `F.interpolate(x, size=size, mode='nearest')` on (n, h, w, c): source index floor(i * in / out)."""
    rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
    cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, cols]


class FPN(nn.Module):
    """mmdet `necks/fpn.py` (start_level=1, add_extra_convs=True, extra_convs_on_inputs=False,
    relu_before_extra_convs=True) = torchvision `FeaturePyramidNetwork` + `LastLevelP6P7(256, 256)` (use_P5):
    1x1 laterals, top-down nearest upsampling added, 3x3 outputs, then stride-2 3x3 convs on P5, and on
    relu of each extra level after it."""

    channels: int
    num_outs: int
    init: str = "xavier_uniform"

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        kinit = _init(self.init)
        conv = lambda k, s, name: nn.Conv(self.channels, (k, k), (s, s), padding=((k // 2, k // 2),) * 2,  # noqa: E731
                                          kernel_init=kinit, name=name)
        laterals = [conv(1, 1, f"lateral_{i}")(f) for i, f in enumerate(features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + nearest_resize(laterals[i], laterals[i - 1].shape[1:3])
        outs = [conv(3, 1, f"fpn_{i}")(lat) for i, lat in enumerate(laterals)]
        for j in range(self.num_outs - len(outs)):
            source = outs[-1] if j == 0 else nn.relu(outs[-1])
            outs.append(conv(3, 2, f"extra_{j}")(source))
        return tuple(outs)


class FCOSHead(nn.Module):
    """The head shared by the levels (mmdet fcos_head.py `_init_layers`, `forward_single`; torchvision
    `FCOSClassificationHead`, `FCOSRegressionHead`). Weights N(0, 0.01), class bias -log(99) (prior 0.01)."""

    num_classes: int
    config: FCOSConfig
    channels: int = 256
    stacked_convs: int = 4

    def setup(self):
        cfg, normal = self.config, nn.initializers.normal(0.01)
        conv = lambda n, bias, name, binit=nn.initializers.zeros: nn.Conv(  # noqa: E731
            n, (3, 3), padding=((1, 1), (1, 1)), use_bias=bias, kernel_init=normal, bias_init=binit, name=name)
        self.cls_convs = [conv(self.channels, cfg.head_bias, f"cls_conv_{i}") for i in range(self.stacked_convs)]
        self.reg_convs = [conv(self.channels, cfg.head_bias, f"reg_conv_{i}") for i in range(self.stacked_convs)]
        gn = lambda name: nn.GroupNorm(num_groups=cfg.norm_groups, epsilon=1e-5, name=name)  # noqa: E731  torch eps
        self.cls_norms = [gn(f"cls_norm_{i}") for i in range(self.stacked_convs)]
        self.reg_norms = [gn(f"reg_norm_{i}") for i in range(self.stacked_convs)]
        prior = -math.log((1 - 0.01) / 0.01)  # mmdet bias_init_with_prob(0.01); tv prior_probability=0.01
        self.fcos_cls = conv(self.num_classes, True, "fcos_cls", nn.initializers.constant(prior))
        self.fcos_reg = conv(4, True, "fcos_reg")
        self.fcos_centerness = conv(1, True, "fcos_centerness")
        if cfg.regression == "exp":  # mmdet: `self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])`
            self.scales = [self.param(f"scale_{i}", nn.initializers.ones, ()) for i in range(len(cfg.strides))]

    def _tower(self, x, convs, norms):
        for conv, norm in zip(convs, norms):
            x = nn.relu(norm(conv(x)))
        return x

    def __call__(self, x, level: int):
        cls_feat = self._tower(x, self.cls_convs, self.cls_norms)
        reg_feat = self._tower(x, self.reg_convs, self.reg_norms)
        cls_score = self.fcos_cls(cls_feat)
        ctr = self.fcos_centerness(reg_feat if self.config.centerness_on_reg else cls_feat)[..., 0]
        reg = self.fcos_reg(reg_feat)
        if self.config.regression == "exp":  # mmdet `bbox_pred = scale(self.fcos_reg(reg_feat)).float().exp()`
            reg = jnp.exp(self.scales[level] * reg)
        else:  # tv `relu(self.bbox_reg(bbox_feature))`, decoded times the anchor size (= stride)
            reg = nn.relu(reg) * self.config.strides[level]
        return cls_score, reg, ctr, jnp.concatenate([cls_feat.mean((1, 2)), reg_feat.mean((1, 2))], -1)


class FCOS(nn.Module):
    """backbone(x, train=...) -> a tuple of feature maps (finest first; e.g. ResNet's C3, C4, C5); the FPN
    turns them into `len(config.strides)` levels."""

    backbone: nn.Module
    num_classes: int
    config: FCOSConfig = FCOS_ISAL
    channels: int = 256
    stacked_convs: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = self.backbone(x, train=train)
        levels = FPN(self.channels, len(self.config.strides), self.config.fpn_init, name="neck")(features)
        head = FCOSHead(self.num_classes, self.config, self.channels, self.stacked_convs, name="head")
        outs = [head(p, i) for i, p in enumerate(levels)]
        cls, reg, ctr, pooled = zip(*outs)
        return {"logits": {"cls": tuple(cls), "reg": tuple(reg), "ctr": tuple(ctr)},
                "features": jnp.mean(jnp.stack(pooled), 0), "blocks": tuple(levels)}


def flatten_levels(outputs: dict):
    """One image's per-level maps ((h, w, ...) per level) -> points concatenated over levels, row-major
    within each (mmdet's `permute(0, 2, 3, 1).reshape` + `cat`, torchvision's `(N, HWA, K)`):
    cls (P, C), reg (P, 4), ctr (P,)."""
    points = lambda maps: jnp.concatenate([m.reshape((-1,) + m.shape[2:]) for m in maps])  # noqa: E731
    return points(outputs["cls"]), points(outputs["reg"]), points(outputs["ctr"])


def level_shapes(outputs: dict) -> tuple[tuple[int, int], ...]:
    """The (h, w) of each level of one image's outputs (static)."""
    return tuple(tuple(m.shape[:2]) for m in outputs["ctr"])
