"""FCOS losses of both configurations, pure JAX.

Every loss is a SUM over an image's locations of a per-location term, divided by a normaliser:

| config | classification (focal, all P x C) | box (positives) | centerness BCE (positives) |
| fcos_isal (mmdet v2.4 `FCOSHead.loss`) | / (num_pos + num_imgs) | IoU loss x ctr target / sum(ctr t.) | / num_pos |
| fcos_tv (torchvision `FCOSHead.compute_loss`) | / max(1, num_fg) | GIoU loss / max(1, num_fg) | / max(1, num_fg) |

mmdet with no positive returns `pos_bbox_preds.sum()` (0) for the box and centerness terms, here 0 too.

- `image_loss`: ONE image normalised by its OWN positives (num_imgs = 1): what ISAL's batch-1 code
  differentiates per image (influence, pseudo-label gradients).
- `batch_loss`: the training loss of a batch, the sums over all images divided by the normalisers of the
  whole batch. Under `jit` with a batch sharded over a data-parallel mesh the sums are global (XLA
  inserts the all-reduce), so the normaliser counts the positives of every device's images (torchvision's
  reference scripts and later mmdet `reduce_mean` the count; mmdet v2.4 normalised per GPU -- with
  equal per-device batches the two differ only in how positives are spread over devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxal.detection import targets as targets_lib
from jaxal.models.fcos import FCOSConfig, flatten_levels, level_shapes


def sigmoid_focal_loss(logits, targets, alpha: float, gamma: float):
    """Elementwise, mmdet `py_sigmoid_focal_loss` = torchvision `sigmoid_focal_loss`:
    BCE(logits, t) * (alpha t + (1 - alpha)(1 - t)) * (1 - p_t)^gamma."""
    p = jax.nn.sigmoid(logits)
    ce = binary_cross_entropy_with_logits(logits, targets)
    p_t = p * targets + (1 - p) * (1 - targets)
    return ce * (alpha * targets + (1 - alpha) * (1 - targets)) * (1 - p_t) ** gamma


def binary_cross_entropy_with_logits(logits, targets):
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _boxes(points, ltrb):
    """mmdet `distance2bbox` (no clipping in the loss) = torchvision `BoxLinearCoder.decode`."""
    return jnp.concatenate([points - ltrb[:, :2], points + ltrb[:, 2:]], -1)


def iou_loss(pred, target, eps: float = 1e-6):
    """mmdet v2.4 `iou_loss`: `-log(bbox_overlaps(pred, target, is_aligned=True).clamp(min=eps))`, with
    `union = max(union, eps)` in `bbox_overlaps`."""
    lt, rb = jnp.maximum(pred[:, :2], target[:, :2]), jnp.minimum(pred[:, 2:], target[:, 2:])
    overlap = jnp.prod(jnp.clip(rb - lt, 0), -1)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    union = jnp.maximum(area(pred) + area(target) - overlap, eps)
    return -jnp.log(jnp.maximum(overlap / union, eps))


def giou_loss(pred, target, eps: float = 1e-7):
    """torchvision `ops.generalized_box_iou_loss` (eps 1e-7), elementwise."""
    x1, y1, x2, y2 = (pred[:, i] for i in range(4))
    x1g, y1g, x2g, y2g = (target[:, i] for i in range(4))
    xi1, yi1, xi2, yi2 = jnp.maximum(x1, x1g), jnp.maximum(y1, y1g), jnp.minimum(x2, x2g), jnp.minimum(y2, y2g)
    inter = jnp.where((yi2 > yi1) & (xi2 > xi1), (xi2 - xi1) * (yi2 - yi1), 0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    area_c = (jnp.maximum(x2, x2g) - jnp.minimum(x1, x1g)) * (jnp.maximum(y2, y2g) - jnp.minimum(y1, y1g))
    return 1 - (iou - (area_c - union) / (area_c + eps))


def image_terms(outputs, label, config: FCOSConfig):
    """One image's summed loss terms and the counts that normalise them: a dict of the sums "cls", "box",
    "ctr" and the counts "num_pos", "ctr_sum" (the positives' centerness targets). `outputs`: one image's
    per-level maps; `label`: {"boxes" (B, 4), "classes" (B,), "difficult" (B,)}."""
    cls, reg, ctr = flatten_levels(outputs)
    points, strides, ranges = targets_lib.all_points(level_shapes(outputs), config)
    difficult = label.get("difficult", jnp.zeros(label["classes"].shape, bool))
    labels, ltrb, _ = targets_lib.assign(points, strides, ranges, label["boxes"].astype(reg.dtype),
                                         label["classes"], difficult, config)
    positive = labels >= 0
    onehot = jax.nn.one_hot(jnp.where(positive, labels, 0), cls.shape[-1], dtype=cls.dtype) * positive[:, None]
    cls_sum = sigmoid_focal_loss(cls, onehot, config.focal_alpha, config.focal_gamma).sum()
    points = points.astype(reg.dtype)
    # Background rows: a dummy unit box keeps the IoU finite (and its gradient 0 after the mask).
    unit = jnp.ones_like(ltrb)
    pred_boxes = _boxes(points, jnp.where(positive[:, None], reg, unit))
    target_boxes = _boxes(points, jnp.where(positive[:, None], ltrb, unit))
    ctr_target = jnp.where(positive, targets_lib.centerness_target(ltrb), 0)
    if config.box_loss == "iou":  # mmdet: weight=pos_centerness_targets
        box_sum = jnp.sum(jnp.where(positive, iou_loss(pred_boxes, target_boxes) * ctr_target, 0))
    else:
        box_sum = jnp.sum(jnp.where(positive, giou_loss(pred_boxes, target_boxes), 0))
    ctr_sum = jnp.sum(jnp.where(positive, binary_cross_entropy_with_logits(ctr, ctr_target), 0))
    return {"cls": cls_sum, "box": box_sum, "ctr": ctr_sum,
            "num_pos": positive.sum().astype(cls.dtype), "ctr_target_sum": ctr_target.sum()}


def normalised(terms, num_images, config: FCOSConfig):
    """The three losses from summed terms (of one image or a whole batch); see the module's table."""
    if config.normalisation == "mmdet":
        safe = lambda s, d: jnp.where(d > 0, s / jnp.where(d > 0, d, 1), 0)  # noqa: E731  no positive -> 0
        return {"cls": terms["cls"] / (terms["num_pos"] + num_images),
                "box": safe(terms["box"], terms["ctr_target_sum"]),
                "ctr": safe(terms["ctr"], terms["num_pos"])}
    count = jnp.maximum(terms["num_pos"], 1)
    return {"cls": terms["cls"] / count, "box": terms["box"] / count, "ctr": terms["ctr"] / count}


def image_loss(outputs, label, config: FCOSConfig):
    """ONE image's loss, normalised by its own positives (num_imgs = 1): cls + box + ctr (loss weights 1)."""
    parts = normalised(image_terms(outputs, label, config), 1, config)
    return parts["cls"] + parts["box"] + parts["ctr"]


def batch_parts(outputs, labels, config: FCOSConfig, image_losses: bool = False):
    """A batch's losses (dict cls, box, ctr), each normalised by the counts of the whole batch. With
    `image_losses`, also "image": (n,) each image's `image_loss` from the same per-image terms (LL4AL's
    target on detection, `jaxal.detection.training.LossPrediction`)."""
    terms = jax.vmap(lambda o, l: image_terms(o, l, config))(outputs, labels)
    sums = jax.tree.map(jnp.sum, terms)
    parts = normalised(sums, labels["classes"].shape[0], config)
    if image_losses:  # `normalised` is elementwise: on the (n,) terms it normalises each image by its own counts
        own = normalised(terms, 1, config)
        parts["image"] = own["cls"] + own["box"] + own["ctr"]
    return parts


def batch_loss(outputs, labels, config: FCOSConfig):
    parts = batch_parts(outputs, labels, config)
    return parts["cls"] + parts["box"] + parts["ctr"]
