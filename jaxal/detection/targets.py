"""FCOS target assignment of one image, pure JAX (vmap-, jit- and jvp-safe; fixed shapes).

mmdet v2.4 `fcos_head.py` `_get_target_single` and torchvision `fcos.py` `FCOS.compute_loss` assign each
location the SMALLEST-AREA ground-truth box that (1) contains it (strictly, `min(l, t, r, b) > 0`), with
torchvision also (1b) within `center_sampling_radius * stride` of the box centre (L-inf), and (2) whose
max(l, t, r, b) lies in the level's range (mmdet `>= lo & <= hi`; torchvision `> lo & < hi`). Ties in area
go to the first box (np.argmin / argmax order; both sources leave them to torch's reduction).

Boxes whose class is -1 (padding) or that are `difficult` never match: mmdet's VOC loader moves difficult
boxes to `gt_bboxes_ignore`, which FCOSHead does not read; so they are neither positives nor negatives
of their own, exactly as if absent.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxal.models.fcos import FCOSConfig, level_points, regress_ranges


def all_points(shapes, config: FCOSConfig):
    """(P, 2) locations, (P,) stride, (P, 2) range of every level, concatenated finest first."""
    points = [level_points(s, stride, config) for s, stride in zip(shapes, config.strides)]
    sizes = [p.shape[0] for p in points]
    strides = jnp.concatenate([jnp.full((n,), s, jnp.float32) for n, s in zip(sizes, config.strides)])
    ranges = jnp.concatenate([jnp.tile(jnp.asarray(r, jnp.float32)[None], (n, 1))
                              for n, r in zip(sizes, regress_ranges(config))])
    return jnp.concatenate(points), strides, ranges


def assign(points, strides, ranges, boxes, classes, difficult, config: FCOSConfig):
    """One image: points (P, 2), boxes (B, 4) x1 y1 x2 y2, classes (B,) (-1 padding), difficult (B,).
    Returns labels (P,) int32 (-1 background), ltrb targets (P, 4) of the matched box (zeros where
    background), matched box index (P,) (-1 background)."""
    dtype = boxes.dtype
    points, ranges = points.astype(dtype), ranges.astype(dtype)
    xs, ys = points[:, 0:1], points[:, 1:2]                                      # (P, 1)
    ltrb = jnp.stack([xs - boxes[None, :, 0], ys - boxes[None, :, 1],
                      boxes[None, :, 2] - xs, boxes[None, :, 3] - ys], -1)       # (P, B, 4)
    match = ltrb.min(-1) > 0                                                     # inside the box
    if config.center_sampling is not None:                                       # tv: |p - c|_inf < r * s
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        dist = jnp.abs(points[:, None, :] - centres[None]).max(-1)
        match &= dist < config.center_sampling * strides.astype(dtype)[:, None]
    reach = ltrb.max(-1)
    lo, hi = ranges[:, 0:1], ranges[:, 1:2]
    match &= (reach >= lo) & (reach <= hi) if config.range_inclusive else (reach > lo) & (reach < hi)
    match &= ((classes >= 0) & ~difficult)[None]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    masked = jnp.where(match, areas[None], jnp.inf)
    index = jnp.argmin(masked, -1)
    positive = match.any(-1)
    labels = jnp.where(positive, classes[index], -1).astype(jnp.int32)
    targets = jnp.where(positive[:, None], jnp.take_along_axis(ltrb, index[:, None, None], 1)[:, 0], 0)
    return labels, targets, jnp.where(positive, index, -1)


def centerness_target(ltrb):
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) (both sources; torchvision's encoded targets are
    divided by the stride, which the ratios cancel). Background rows (zeros) give 0, not NaN."""
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    safe = lambda a: jnp.where(a.max(-1) > 0, a.max(-1), 1)  # noqa: E731
    return jnp.sqrt(jnp.clip(lr.min(-1) / safe(lr) * tb.min(-1) / safe(tb), 0))
