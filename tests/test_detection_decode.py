"""Decoding + NMS on the device against plain-Python transcriptions of mmdet v2.4's `_get_bboxes_single` +
`multiclass_nms` and torchvision's `postprocess_detections` + `batched_nms` (greedy loops); pseudo-labels."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal.detection import decode
from jaxal.models import fcos

pytestmark = pytest.mark.usefixtures("x64")

STRIDES = (8, 16, 32)
SHAPES = ((8, 8), (4, 4), (2, 2))
C = 3
# small pre-NMS limits so that the per-level top-k of both sources is exercised
ISAL = dataclasses.replace(fcos.FCOS_ISAL, strides=STRIDES, pre_nms_per_level=20, score_thresh=0.3,
                           max_per_img=15)
TV = dataclasses.replace(fcos.FCOS_TV, strides=STRIDES, pre_nms_per_level=25, score_thresh=0.35, max_per_img=15)
IMAGE_SIZE = (56.0, 60.0)  # the resized image inside the 64 x 64 canvas: boxes clip to it


def outputs(key, n):
    ks = jax.random.split(key, 3)
    return {
        "cls": tuple(jax.random.normal(jax.random.fold_in(ks[0], i), (n, h, w, C)) * 1.5 - 0.5
                     for i, (h, w) in enumerate(SHAPES)),
        "reg": tuple(jnp.exp(jax.random.normal(jax.random.fold_in(ks[1], i), (n, h, w, 4)) * 0.5) * s * 1.5
                     for i, ((h, w), s) in enumerate(zip(SHAPES, STRIDES))),
        "ctr": tuple(jax.random.normal(jax.random.fold_in(ks[2], i), (n, h, w)) for i, (h, w) in enumerate(SHAPES)),
    }


def sig(z):
    return 1 / (1 + math.exp(-z))


def iou(a, b):
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def greedy_nms(cands, thr, agnostic):
    """cands: list of (score, box, cls). The textbook loop."""
    cands = sorted(cands, key=lambda c: -c[0])
    kept = []
    for c in cands:
        if all(iou(c[1], k[1]) <= thr or (not agnostic and k[2] != c[2]) for k in kept):
            kept.append(c)
    return kept


def ref_decode(maps, config, agnostic=False):
    H, W = IMAGE_SIZE
    cands = []
    for lv, ((h, w), s) in enumerate(zip(SHAPES, STRIDES)):
        off = s // 2 if config.point_offset == "half_stride" else 0
        cls = np.asarray(maps["cls"][lv]).reshape(-1, C)
        reg = np.asarray(maps["reg"][lv]).reshape(-1, 4)
        ctr = np.asarray(maps["ctr"][lv]).reshape(-1)
        pts = [(x * s + off, y * s + off) for y in range(h) for x in range(w)]
        rows = []
        for p in range(h * w):
            prob = [sig(v) for v in cls[p]]
            rows.append((p, prob, sig(ctr[p])))
        if config.score_mode == "cls_x_ctr":
            if len(rows) > config.pre_nms_per_level:  # nms_pre by max(score x ctr)
                rows = sorted(rows, key=lambda r: -max(q * r[2] for q in r[1]))[:config.pre_nms_per_level]
            level = [(prob[c] * ct, p, c) for p, prob, ct in rows for c in range(C) if prob[c] > config.score_thresh]
        else:
            level = [(math.sqrt(prob[c] * ct), p, c) for p, prob, ct in rows for c in range(C)]
            level = sorted([x for x in level if x[0] > config.score_thresh], key=lambda x: -x[0])
            level = level[:config.pre_nms_per_level]
        for score, p, c in level:
            x, y = pts[p]
            l, t, r, b = reg[p]
            box = (min(max(x - l, 0), W), min(max(y - t, 0), H), min(max(x + r, 0), W), min(max(y + b, 0), H))
            cands.append((score, box, c))
    return greedy_nms(cands, config.nms_iou, agnostic)[:config.max_per_img], len(cands)


@pytest.mark.parametrize("config,agnostic", [(ISAL, False), (TV, False), (ISAL, True)],
                         ids=["isal", "tv", "isal_agnostic"])
def test_decode_matches_the_reference_loops(config, agnostic):
    n = 3
    maps = outputs(jax.random.PRNGKey(3), n)
    sizes = jnp.tile(jnp.asarray(IMAGE_SIZE)[None], (n, 1))
    got = jax.jit(lambda m, s: decode.decode_batch(m, config, s, class_agnostic=agnostic))(maps, sizes)
    total = candidates = 0
    for i in range(n):
        want, count = ref_decode(jax.tree.map(lambda a: a[i], maps), config, agnostic)
        candidates += count
        valid = np.asarray(got["valid"][i])
        k = len(want)
        total += k
        assert valid.sum() == k and valid[:k].all()
        np.testing.assert_allclose(np.asarray(got["scores"][i][:k]), [w[0] for w in want], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(got["boxes"][i][:k]), [w[1] for w in want], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.asarray(got["classes"][i][:k]), [w[2] for w in want])
        assert not np.asarray(got["boxes"][i][k:]).any()
    assert 3 * 5 < total < candidates  # the cases have detections, and NMS removed some


def test_nms_suppresses_and_is_per_class_by_default():
    boxes = jnp.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10.]])
    scores = jnp.array([0.9, 0.8, 0.7, 0.6, 0.95])
    classes = jnp.array([0, 0, 1, 0, 2])
    valid = jnp.array([True, True, True, True, False])
    index, keep = decode.nms(boxes, scores, classes, valid, 0.5, 5)
    assert list(np.asarray(index)[np.asarray(keep)]) == [0, 2, 3]
    index, keep = decode.nms(boxes, scores, classes, valid, 0.5, 5, class_agnostic=True)
    assert list(np.asarray(index)[np.asarray(keep)]) == [0, 3]
    loop = greedy_nms([(float(s), tuple(map(float, b)), int(c)) for s, b, c, v in
                       zip(scores, boxes, classes, valid) if v], 0.5, True)
    assert [c[0] for c in loop] == [0.9, 0.6]


def test_pseudo_labels_keep_boxes_above_the_threshold_in_the_label_format():
    dets = {"boxes": jnp.arange(5 * 4, dtype=jnp.float64).reshape(5, 4), "scores": jnp.array([0.9, 0.6, 0.5, 0.2, 0]),
            "classes": jnp.array([2, 0, 1, 1, 0], jnp.int32), "valid": jnp.array([True, True, True, True, False])}
    label = decode.pseudo_labels(dets, 0.5, max_boxes=7)
    np.testing.assert_array_equal(np.asarray(label["classes"]), [2, 0, 1, -1, -1, -1, -1])
    np.testing.assert_array_equal(np.asarray(label["boxes"][:3]), np.asarray(dets["boxes"][:3]))
    assert not np.asarray(label["boxes"][3:]).any() and not np.asarray(label["difficult"]).any()
    assert int(decode.num_pseudo_boxes(label)) == 3
    short = decode.pseudo_labels(dets, 0.1, max_boxes=2)
    np.testing.assert_array_equal(np.asarray(short["classes"]), [2, 0])
