"""Decoding of FCOS outputs into detections, on the device: fixed shapes, batched (vmap), no Python loop
over boxes; and pseudo-labels from them.

Per image (`decode_image`), following the configs' sources:
- fcos_isal, mmdet v2.4 `FCOSHead._get_bboxes_single`: per level, class scores `sigmoid(cls)` and
  `sigmoid(ctr)`; if the level has more than `nms_pre` locations keep the `nms_pre` with the largest
  `max_c(score x ctr)`; boxes `distance2bbox(points, reg, max_shape=img_shape)` (clipped to the image);
  then `multiclass_nms`: pairs (location, class) with `score > score_thr` (the class score alone), scored
  `score x ctr`, per-class NMS at IoU 0.5, the best `max_per_img`.
- fcos_tv, torchvision `FCOS.postprocess_detections`: per level, pairs scored `sqrt(sigmoid(cls) x
  sigmoid(ctr))`, those `> score_thresh`, the best `topk_candidates` of them; boxes decoded and clipped;
  `batched_nms` at 0.6; the best `detections_per_img`.
Fixed size: the candidates of all levels are cut to the best `max_candidates` (default 1000) before NMS
(the sources run NMS on every candidate that passes the threshold; they differ only when more than
`max_candidates` pass, and then only in boxes ranked below 1000 before NMS). NMS is greedy in score
order over a (K, K) IoU matrix (`lax.fori_loop`, K steps of O(K)); a box is suppressed by a kept
higher-scoring one of the same class (class-agnostic: of any class) with IoU > threshold (mmcv `nms`
and torchvision `nms` both suppress on `>`). Detections: {"boxes" (M, 4), "scores" (M,), "classes" (M,)
int32, "valid" (M,) bool}, M = `max_per_img`, best first, invalid rows zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxal.detection.targets import all_points
from jaxal.models.fcos import FCOSConfig, level_shapes


def box_iou(a, b):
    """(K, 4) x (L, 4) -> (K, L) IoU, areas without +1 (mmcv offset 0, torchvision `box_iou`); 0 where the
    union is empty."""
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = jnp.prod(jnp.clip(rb - lt, 0), -1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0)


def nms(boxes, scores, classes, valid, iou_threshold: float, max_out: int, class_agnostic: bool = False):
    """Greedy NMS of one image's K candidates -> indices (max_out,) into them, best first, and their
    validity (max_out,). Per class unless `class_agnostic`."""
    order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True)
    boxes, classes, valid = boxes[order], classes[order], valid[order]
    overlap = box_iou(boxes, boxes) > iou_threshold
    if not class_agnostic:
        overlap &= classes[:, None] == classes[None, :]
    later = jnp.arange(boxes.shape[0])

    def visit(i, keep):
        return keep & ~(overlap[i] & keep[i] & (later > i))

    keep = jax.lax.fori_loop(0, boxes.shape[0], visit, valid)
    # kept ones in score order: their sorted positions are increasing, so take the first max_out of them
    rank = jnp.where(keep, later, boxes.shape[0] + later)
    picked = jnp.argsort(rank)[:max_out]
    if picked.shape[0] < max_out:
        pad = max_out - picked.shape[0]
        return (jnp.concatenate([order[picked], jnp.zeros(pad, order.dtype)]),
                jnp.concatenate([keep[picked], jnp.zeros(pad, bool)]))
    return order[picked], keep[picked]


def _level_candidates(cls, reg, ctr, points, image_size, config: FCOSConfig):
    """One level's candidate pairs: boxes (K, 4), scores (K,), classes (K,), valid (K,)."""
    num_classes = cls.shape[-1]
    prob, centre = jax.nn.sigmoid(cls), jax.nn.sigmoid(ctr)
    if config.score_mode == "cls_x_ctr":
        if points.shape[0] > config.pre_nms_per_level:  # mmdet nms_pre: top locations by max score x ctr
            _, top = jax.lax.top_k((prob * centre[:, None]).max(-1), config.pre_nms_per_level)
            prob, centre, reg, points = prob[top], centre[top], reg[top], points[top]
        valid = prob > config.score_thresh          # multiclass_nms: threshold on the class score
        scores = prob * centre[:, None]             # then score_factors=centerness
        location = jnp.repeat(jnp.arange(points.shape[0]), num_classes)
        scores, valid = scores.reshape(-1), valid.reshape(-1)
        labels = jnp.tile(jnp.arange(num_classes), points.shape[0])
    else:  # torchvision: sqrt(cls x ctr) > thresh, then topk_candidates of the flattened (location, class)
        scores = jnp.sqrt(prob * centre[:, None]).reshape(-1)
        k = min(config.pre_nms_per_level, scores.shape[0])
        masked = jnp.where(scores > config.score_thresh, scores, -jnp.inf)
        _, top = jax.lax.top_k(masked, k)
        scores, valid = scores[top], masked[top] > -jnp.inf
        location, labels = top // num_classes, top % num_classes
    x, y = points[location, 0], points[location, 1]
    r = reg[location]
    height, width = image_size[0], image_size[1]
    boxes = jnp.stack([jnp.clip(x - r[:, 0], 0, width), jnp.clip(y - r[:, 1], 0, height),
                       jnp.clip(x + r[:, 2], 0, width), jnp.clip(y + r[:, 3], 0, height)], -1)
    return boxes, scores, labels.astype(jnp.int32), valid


def decode_image(outputs, config: FCOSConfig, image_size=None, *, class_agnostic: bool = False,
                 max_candidates: int = 1000):
    """One image's per-level maps -> detections (see the module docstring). `image_size`: (h, w) of the
    resized image inside its canvas (boxes are clipped to it); default the extent of level 0 (its size x its stride)."""
    shapes = level_shapes(outputs)
    if image_size is None:
        image_size = (shapes[0][0] * config.strides[0], shapes[0][1] * config.strides[0])
    image_size = jnp.asarray(image_size, outputs["reg"][0].dtype)
    points, _, _ = all_points(shapes, config)
    sizes = [h * w for h, w in shapes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    parts = []
    for level, (start, size) in enumerate(zip(starts, sizes)):
        cls = outputs["cls"][level].reshape(size, -1)
        reg = outputs["reg"][level].reshape(size, 4)
        ctr = outputs["ctr"][level].reshape(size)
        parts.append(_level_candidates(cls, reg, ctr, points[start:start + size].astype(reg.dtype),
                                       image_size, config))
    boxes, scores, classes, valid = (jnp.concatenate(p) for p in zip(*parts))
    if scores.shape[0] > max_candidates:
        _, top = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), max_candidates)
        boxes, scores, classes, valid = boxes[top], scores[top], classes[top], valid[top]
    index, keep = nms(boxes, scores, classes, valid, config.nms_iou, config.max_per_img, class_agnostic)
    zero = lambda a: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0)  # noqa: E731
    return {"boxes": zero(boxes[index]), "scores": zero(scores[index]),
            "classes": zero(classes[index]).astype(jnp.int32), "valid": keep}


def decode_batch(outputs, config: FCOSConfig, image_sizes=None, *, class_agnostic: bool = False,
                 max_candidates: int = 1000):
    """`decode_image` over a batch's outputs (n, ...); `image_sizes` (n, 2) or None."""
    one = lambda o, s: decode_image(o, config, s, class_agnostic=class_agnostic,  # noqa: E731
                                    max_candidates=max_candidates)
    maps = {k: outputs[k] for k in ("cls", "reg", "ctr")}
    if image_sizes is None:
        return jax.vmap(lambda o: one(o, None))(maps)
    return jax.vmap(one)(maps, image_sizes)


def pseudo_labels(detections, score_threshold: float, max_boxes: int):
    """An unlabelled image's own detections with score >= `score_threshold` as a label of the interface's
    format ({"boxes" (B, 4), "classes" (B,) with -1 padding, "difficult" (B,) False}), the best
    `max_boxes` (detections are best first). Works on one image or, with leading batch axes, on many."""
    keep = detections["valid"] & (detections["scores"] >= score_threshold)
    m = keep.shape[-1]
    take = min(max_boxes, m)
    boxes = jnp.where(keep[..., None], detections["boxes"], 0)[..., :take, :]
    classes = jnp.where(keep, detections["classes"], -1)[..., :take]
    # detections are sorted by score, so the kept ones are a prefix of the valid ones
    if take < max_boxes:
        pad = max_boxes - take
        boxes = jnp.concatenate([boxes, jnp.zeros(boxes.shape[:-2] + (pad, 4), boxes.dtype)], -2)
        classes = jnp.concatenate([classes, -jnp.ones(classes.shape[:-1] + (pad,), classes.dtype)], -1)
    return {"boxes": boxes, "classes": classes.astype(jnp.int32), "difficult": jnp.zeros(classes.shape, bool)}


def num_pseudo_boxes(label) -> jax.Array:
    """Real boxes of a label (or of each label of a batch)."""
    return jnp.sum(label["classes"] >= 0, -1)

