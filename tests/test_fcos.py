"""FCOS targets and losses of both configs against plain-loop NumPy transcriptions of mmdetection v2.4's
`FCOSHead` (`_get_target_single`, `centerness_target`, `loss`) and torchvision's `FCOS.compute_loss` /
`FCOSHead.compute_loss`, on hand-made images (float64, ~1e-9); the Flax model's shapes and sharing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal.detection import losses, targets
from detection_toys import ISAL, TV, toy_fcos
from jaxal.models import fcos

pytestmark = pytest.mark.usefixtures("x64")

SHAPES = ((8, 8), (4, 4), (2, 2))  # a 64x64 canvas
NUM_CLASSES = 3


# ---------------------------------------------------------------- NumPy transcriptions (plain loops)

def ref_points(config):
    """mmdet `_get_points_single` (+ stride // 2) / torchvision anchor centres (grid * stride)."""
    out = []
    for (h, w), s in zip(SHAPES, config.strides):
        off = s // 2 if config.point_offset == "half_stride" else 0
        for y in range(h):
            for x in range(w):
                out.append((x * s + off, y * s + off, s))
    return out


def ref_ranges_mmdet(level, n_levels):
    ranges = [(-1, 64), (64, 128), (128, 1e8)]  # regress_ranges of 3 levels, last = INF
    return ranges[level]


def ref_assign_mmdet(config, boxes, classes):
    """mmdet v2.4 `_get_target_single` (no centre sampling), as loops."""
    pts = ref_points(config)
    labels, tgts = [], []
    level_of = [lv for lv, (h, w) in enumerate(SHAPES) for _ in range(h * w)]
    for p, (x, y, _) in enumerate(pts):
        lo, hi = ref_ranges_mmdet(level_of[p], 3)
        best, best_area = None, 1e8
        for b, (x1, y1, x2, y2) in enumerate(boxes):
            if classes[b] < 0:
                continue
            l, t, r, bt = x - x1, y - y1, x2 - x, y2 - y
            if min(l, t, r, bt) <= 0:
                continue
            m = max(l, t, r, bt)
            if not (m >= lo and m <= hi):
                continue
            area = (x2 - x1) * (y2 - y1)
            if area < best_area:
                best, best_area = b, area
        if best is None:
            labels.append(-1)
            tgts.append((0.0, 0.0, 0.0, 0.0))
        else:
            x1, y1, x2, y2 = boxes[best]
            labels.append(classes[best])
            tgts.append((x - x1, y - y1, x2 - x, y2 - y))
    return np.array(labels), np.array(tgts, float)


def ref_assign_tv(config, boxes, classes):
    """torchvision `FCOS.compute_loss` matching, as loops: centre sampling 1.5, inside, (4s, 8s) exclusive,
    first level lower 0, last upper inf, max of match * (1e8 - area)."""
    pts = ref_points(config)
    level_of = [lv for lv, (h, w) in enumerate(SHAPES) for _ in range(h * w)]
    labels, tgts = [], []
    for p, (x, y, s) in enumerate(pts):
        lower = 0 if level_of[p] == 0 else 4 * s
        upper = math.inf if level_of[p] == len(SHAPES) - 1 else 8 * s
        best, best_value = None, 0.0
        for b, (x1, y1, x2, y2) in enumerate(boxes):
            if classes[b] < 0:
                continue
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ok = max(abs(x - cx), abs(y - cy)) < 1.5 * s
            d = (x - x1, y - y1, x2 - x, y2 - y)
            ok = ok and min(d) > 0 and lower < max(d) < upper
            value = float(ok) * (1e8 - (x2 - x1) * (y2 - y1))
            if value > best_value:
                best, best_value = b, value
        if best is None or best_value < 1e-5:
            labels.append(-1)
            tgts.append((0.0, 0.0, 0.0, 0.0))
        else:
            x1, y1, x2, y2 = boxes[best]
            labels.append(classes[best])
            tgts.append((x - x1, y - y1, x2 - x, y2 - y))
    return np.array(labels), np.array(tgts, float)


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def bce(z, t):
    return max(z, 0) - z * t + math.log1p(math.exp(-abs(z)))


def focal(z, t, alpha=0.25, gamma=2.0):
    p = sigmoid(z)
    pt = (1 - p) * t + p * (1 - t)  # mmdet py_sigmoid_focal_loss
    return bce(z, t) * (alpha * t + (1 - alpha) * (1 - t)) * pt ** gamma


def ctr_target(l, t, r, b):
    return math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))


def iou_mmdet(p, g, eps=1e-6):
    w = max(min(p[2], g[2]) - max(p[0], g[0]), 0)
    h = max(min(p[3], g[3]) - max(p[1], g[1]), 0)
    ov = w * h
    union = max((p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - ov, eps)
    return max(ov / union, eps)


def giou_tv(p, g, eps=1e-7):
    xi1, yi1, xi2, yi2 = max(p[0], g[0]), max(p[1], g[1]), min(p[2], g[2]), min(p[3], g[3])
    inter = (xi2 - xi1) * (yi2 - yi1) if (yi2 > yi1 and xi2 > xi1) else 0.0
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    iou = inter / (union + eps)
    area_c = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    return 1 - (iou - (area_c - union) / (area_c + eps))


def ref_terms(config, flat, boxes, classes):
    cls, reg, ctr = flat
    assign = ref_assign_mmdet if config.normalisation == "mmdet" else ref_assign_tv
    labels, tgt = assign(config, boxes, classes)
    pts = ref_points(config)
    s_cls = s_box = s_ctr = ctr_sum = 0.0
    n_pos = 0
    for p in range(len(pts)):
        for c in range(cls.shape[1]):
            s_cls += focal(cls[p, c], float(labels[p] == c))
        if labels[p] < 0:
            continue
        n_pos += 1
        x, y, _ = pts[p]
        pred = (x - reg[p, 0], y - reg[p, 1], x + reg[p, 2], y + reg[p, 3])
        gt = (x - tgt[p, 0], y - tgt[p, 1], x + tgt[p, 2], y + tgt[p, 3])
        ct = ctr_target(*tgt[p])
        ctr_sum += ct
        s_box += ct * -math.log(iou_mmdet(pred, gt)) if config.box_loss == "iou" else giou_tv(pred, gt)
        s_ctr += bce(ctr[p], ct)
    return dict(cls=s_cls, box=s_box, ctr=s_ctr, num_pos=n_pos, ctr_sum=ctr_sum)


def ref_normalise(config, t, num_imgs):
    if config.normalisation == "mmdet":  # loss_cls avg_factor=num_pos + num_imgs; box / sum ctr; ctr mean
        if t["num_pos"] == 0:
            return t["cls"] / num_imgs
        return t["cls"] / (t["num_pos"] + num_imgs) + t["box"] / t["ctr_sum"] + t["ctr"] / t["num_pos"]
    n = max(1, t["num_pos"])
    return (t["cls"] + t["box"] + t["ctr"]) / n


# ---------------------------------------------------------------- hand-made images (64 x 64 canvas)

MAX_BOXES = 5
IMAGES = [
    # every size range: a small box (level 0), a medium (64 < max <= 128 -> level 1), a large (level 2),
    # the larger two reaching past the canvas
    ([(4, 4, 30, 26), (-40, 2, 100, 62), (-120, -100, 170, 150)], [0, 1, 2]),
    # overlapping boxes; a location inside two boxes (the smaller wins); a padding box
    ([(0, 0, 40, 40), (8, 8, 28, 30), (30.5, 20, 63, 50)], [1, 2, 0]),
    # an image without boxes (only padding)
    ([], []),
    # boxes crossing the level boundaries (max distance exactly 64 at a point: inclusive vs exclusive)
    ([(-60, 4, 68, 60), (12, 12, 20.5, 36)], [2, 1]),
]


def padded(boxes, classes):
    b = np.zeros((MAX_BOXES, 4))
    c = -np.ones(MAX_BOXES, np.int32)
    c[:len(classes)] = classes
    b[len(boxes):] = (1, 1, 50, 50)
    b[:len(boxes)] = np.reshape(boxes, (-1, 4))  # padding boxes with real-looking coordinates: must never match
    return {"boxes": jnp.asarray(b), "classes": jnp.asarray(c), "difficult": jnp.zeros(MAX_BOXES, bool)}


def random_outputs(key, config, n):
    ks = jax.random.split(key, 3)
    cls = tuple(jax.random.normal(jax.random.fold_in(ks[0], i), (n, h, w, NUM_CLASSES)) * 2 - 2
                for i, (h, w) in enumerate(SHAPES))
    reg = tuple(jnp.exp(jax.random.normal(jax.random.fold_in(ks[1], i), (n, h, w, 4))) * s * 2
                for i, ((h, w), s) in enumerate(zip(SHAPES, config.strides)))
    ctr = tuple(jax.random.normal(jax.random.fold_in(ks[2], i), (n, h, w)) for i, (h, w) in enumerate(SHAPES))
    return {"cls": cls, "reg": reg, "ctr": ctr}


def flat_np(outputs, i):
    one = jax.tree.map(lambda a: a[i], outputs)
    return tuple(np.asarray(a) for a in fcos.flatten_levels(one))


@pytest.mark.parametrize("config", [ISAL, TV], ids=["isal", "tv"])
def test_assignment_matches_the_reference_loops(config):
    points, strides, ranges = targets.all_points(SHAPES, config)
    assign = ref_assign_mmdet if config.normalisation == "mmdet" else ref_assign_tv
    total_pos = 0
    for boxes, classes in IMAGES:
        label = padded(boxes, classes)
        got_labels, got_t, _ = jax.jit(targets.assign, static_argnums=6)(
            points, strides, ranges, label["boxes"], label["classes"], label["difficult"], config)
        want_labels, want_t = assign(config, boxes, classes)
        np.testing.assert_array_equal(np.asarray(got_labels), want_labels)
        np.testing.assert_allclose(np.asarray(got_t), want_t, rtol=0, atol=1e-12)
        total_pos += int((want_labels >= 0).sum())
    assert total_pos > 10  # the cases do exercise positives


def test_assignment_cases_cover_what_they_claim():
    """The hand-made images hit every level, a location inside two boxes, and the range boundary."""
    points, strides, ranges = targets.all_points(SHAPES, ISAL)
    boxes, classes = IMAGES[0]
    labels, _ = ref_assign_mmdet(ISAL, boxes, classes)
    level_of = np.repeat(np.arange(3), [h * w for h, w in SHAPES])
    assert set(level_of[labels >= 0]) == {0, 1, 2}
    b, c = IMAGES[1]
    inside_both = [i for i, (x, y, _) in enumerate(ref_points(ISAL))
                   if all(bx[0] < x < bx[2] and bx[1] < y < bx[3] for bx in b[:2])]
    assert inside_both
    # image 3: a location whose largest distance to a box is exactly 64, the boundary of two ranges
    (x1, y1, x2, y2), = IMAGES[3][0][:1]
    assert any(max(x - x1, y - y1, x2 - x, y2 - y) == 64 and min(x - x1, y - y1, x2 - x, y2 - y) > 0
               for x, y, _ in ref_points(ISAL))


def test_difficult_boxes_never_match():
    points, strides, ranges = targets.all_points(SHAPES, ISAL)
    label = padded(*IMAGES[0])
    difficult = jnp.zeros(MAX_BOXES, bool).at[1].set(True)
    got, _, index = targets.assign(points, strides, ranges, label["boxes"], label["classes"], difficult, ISAL)
    without = padded([IMAGES[0][0][0], IMAGES[0][0][2]], [0, 2])
    want, _, _ = targets.assign(points, strides, ranges, without["boxes"], without["classes"],
                                without["difficult"], ISAL)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.any(np.asarray(index) == 1)


@pytest.mark.parametrize("config", [ISAL, TV], ids=["isal", "tv"])
def test_image_and_batch_losses_match_the_reference(config):
    outputs = random_outputs(jax.random.PRNGKey(0), config, len(IMAGES))
    labels = jax.tree.map(lambda *a: jnp.stack(a), *[padded(*im) for im in IMAGES])
    per_image = jax.jit(jax.vmap(lambda o, l: losses.image_loss(o, l, config)))(outputs, labels)
    refs = [ref_terms(config, flat_np(outputs, i), *IMAGES[i]) for i in range(len(IMAGES))]
    want_images = [ref_normalise(config, t, 1) for t in refs]
    np.testing.assert_allclose(np.asarray(per_image), want_images, rtol=1e-10, atol=1e-12)
    total = {k: sum(t[k] for t in refs) for k in refs[0]}
    np.testing.assert_allclose(float(jax.jit(losses.batch_loss, static_argnums=2)(outputs, labels, config)),
                               ref_normalise(config, total, len(IMAGES)), rtol=1e-10)
    # the batch loss is not the mean of the per-image losses (normalisers differ): the two are distinct
    assert abs(np.mean(want_images) - ref_normalise(config, total, len(IMAGES))) > 1e-6


@pytest.mark.parametrize("config", [ISAL, TV], ids=["isal", "tv"])
def test_image_loss_gradients_are_finite_and_jvp_matches_grad(config):
    """Background locations must not leak NaNs into gradients (the dummy boxes), and a jvp of the loss
    in the outputs equals grad . tangent (forward and reverse mode agree)."""
    outputs = random_outputs(jax.random.PRNGKey(1), config, 1)
    one = jax.tree.map(lambda a: a[0], outputs)
    label = padded(*IMAGES[1])
    f = lambda o: losses.image_loss(o, label, config)  # noqa: E731
    g = jax.jit(jax.grad(f))(one)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    tangent = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), one)
    _, jv = jax.jit(lambda o, t: jax.jvp(f, (o,), (t,)))(one, tangent)
    dot = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(tangent)))
    np.testing.assert_allclose(float(jv), dot, rtol=1e-9)


# ---------------------------------------------------------------- the Flax model

@pytest.mark.parametrize("config", [ISAL, TV], ids=["isal", "tv"])
def test_model_outputs_levels_and_shares_the_head(config):
    model = toy_fcos(config, NUM_CLASSES)
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    out = jax.jit(model.apply)(variables, x)["logits"]
    assert fcos.level_shapes(jax.tree.map(lambda a: a[0], out)) == SHAPES
    head = variables["params"]["head"]
    # one set of head weights for all levels; no tower biases in isal (GN), biases in tv
    assert "bias" in head["cls_conv_0"] if config.head_bias else "bias" not in head["cls_conv_0"]
    assert ("scale_2" in head) == (config.regression == "exp")
    np.testing.assert_allclose(np.asarray(head["fcos_cls"]["bias"]), -math.log(99), rtol=1e-6)  # float32 params
    assert all((np.asarray(r) >= 0).all() for r in out["reg"])
    labels = jax.tree.map(lambda *a: jnp.stack(a), padded(*IMAGES[0]), padded(*IMAGES[1]))
    loss = jax.jit(losses.batch_loss, static_argnums=2)(out, labels, config)
    assert np.isfinite(float(loss))


def test_nearest_resize_matches_torch_rule():
    x = jnp.arange(7 * 5, dtype=jnp.float64).reshape(1, 7, 5, 1)
    got = np.asarray(fcos.nearest_resize(x, (13, 9)))[0, :, :, 0]
    want = np.array([[np.asarray(x)[0, (i * 7) // 13, (j * 5) // 9, 0] for j in range(9)] for i in range(13)])
    np.testing.assert_array_equal(got, want)
