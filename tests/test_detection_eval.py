"""Tests of `jaxal.detection.evaluate`: VOC mAP against a line-by-line Python transcription of the VOC
devkit's voc_eval (kept here, independent of the vectorised implementation), worked cases computed by
hand, and the COCO wiring against pycocotools on predictions of known AP (perfect, a class missing, a box
between IoU thresholds, difficult and crowd boxes ignored, areas measured in original pixels)."""

import numpy as np
import pytest

from jaxal.data.boxes import BoxSplit
from jaxal.detection import evaluate as E


def make_split(per_image, scale=1.0, size=(100, 100), crowd=None, areas=None) -> BoxSplit:
    """per_image: list of [(x1, y1, x2, y2, class, difficult)] in ORIGINAL pixels; areas (n, b) as
    annotated (default: the boxes' w x h)."""
    n, b = len(per_image), max(1, max(len(p) for p in per_image))
    boxes = np.zeros((n, b, 4), np.float32)
    classes = np.full((n, b), -1, np.int32)
    difficult = np.zeros((n, b), bool)
    for i, objects in enumerate(per_image):
        for j, (*box, cls, diff) in enumerate(objects):
            boxes[i, j], classes[i, j], difficult[i, j] = np.array(box) * scale, cls, diff
    return BoxSplit(
        tuple(str(i) for i in range(n)), boxes, classes, difficult, np.full(n, scale, np.float32),
        np.tile(np.array(size, np.int32), (n, 1)), np.tile((np.array(size) * scale).astype(np.int32), (n, 1)),
        np.zeros(n, np.int32), ((int(size[0] * scale), int(size[1] * scale)),),
        tuple(np.asarray(c, np.float32).reshape(-1, 5) for c in (crowd or [[]] * n)),
        np.asarray(areas, np.float32) if areas is not None else np.prod(boxes[..., 2:] - boxes[..., :2], -1) / scale**2,
        0, None,
    )


def make_detections(per_image, scale=1.0, k=None) -> dict:
    """per_image: list of [(x1, y1, x2, y2, score, class)] in ORIGINAL pixels -> canvas arrays."""
    n, k = len(per_image), k or max(1, max(len(p) for p in per_image))
    out = {"boxes": np.zeros((n, k, 4)), "scores": np.zeros((n, k)), "classes": np.zeros((n, k), np.int32),
           "valid": np.zeros((n, k), bool)}
    for i, dets in enumerate(per_image):
        for j, (*box, score, cls) in enumerate(dets):
            out["boxes"][i, j] = np.array(box) * scale
            out["scores"][i, j], out["classes"][i, j], out["valid"][i, j] = score, cls, True
    return out


# --- the VOC devkit's voc_eval, transcribed as written (loops, inclusive pixel widths) -------------


def devkit_voc_ap(rec, prec, use_07_metric=False):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def devkit_voc_eval(truth, dets, cls, ovthresh=0.5, use_07_metric=False):
    """truth: per image [(xmin, ymin, xmax, ymax, class, difficult)] in VOC's 1-based inclusive pixels;
    dets: [(image, score, xmin, ymin, xmax, ymax, class)]."""
    class_recs, npos = {}, 0
    for image, objects in enumerate(truth):
        R = [o for o in objects if o[4] == cls]
        bbox = np.array([o[:4] for o in R]).reshape(-1, 4)
        difficult = np.array([o[5] for o in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[image] = {"bbox": bbox, "difficult": difficult, "det": det}
    mine = [d for d in dets if d[6] == cls]
    image_ids = [d[0] for d in mine]
    confidence = np.array([d[1] for d in mine])
    BB = np.array([d[2:6] for d in mine]).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return devkit_voc_ap(rec, prec, use_07_metric)


def random_case(seed, n_images=12, n_classes=3):
    """Integer VOC boxes, some difficult, and detections: jittered copies (duplicates too) and clutter."""
    rng = np.random.default_rng(seed)
    truth_voc, dets_voc = [], []
    for image in range(n_images):
        objects = []
        for _ in range(rng.integers(0, 6)):
            x, y = rng.integers(1, 60, 2)
            w, h = rng.integers(5, 40, 2)
            cls, difficult = int(rng.integers(n_classes)), bool(rng.random() < 0.2)
            objects.append((int(x), int(y), int(x + w), int(y + h), cls, difficult))
        truth_voc.append(objects)
        for o in objects:
            for _ in range(rng.integers(0, 3)):
                jitter = rng.integers(-6, 7, 4)
                box = np.clip(np.array(o[:4]) + jitter, 1, 100)
                if box[2] > box[0] and box[3] > box[1]:
                    cls = o[4] if rng.random() < 0.85 else int(rng.integers(n_classes))
                    dets_voc.append((image, 0.0, *box.tolist(), cls))
        for _ in range(rng.integers(0, 4)):
            x, y = rng.integers(1, 70, 2)
            dets_voc.append((image, 0.0, int(x), int(y), int(x + rng.integers(3, 30)), int(y + rng.integers(3, 30)),
                             int(rng.integers(n_classes))))
    scores = rng.permutation(len(dets_voc)) / len(dets_voc) + 0.01  # distinct: the devkit's order is defined
    dets_voc = [(d[0], float(s), *d[2:]) for d, s in zip(dets_voc, scores)]
    return truth_voc, dets_voc


def to_continuous(truth_voc, dets_voc, n_images):
    """VOC's inclusive xmin..xmax -> jaxal's x1 = xmin - 1, x2 = xmax."""
    truth = [[(o[0] - 1, o[1] - 1, o[2], o[3], o[4], o[5]) for o in objects] for objects in truth_voc]
    dets = [[] for _ in range(n_images)]
    for image, score, x1, y1, x2, y2, cls in dets_voc:
        dets[image].append((x1 - 1, y1 - 1, x2, y2, score, cls))
    return truth, dets


@pytest.mark.parametrize("seed, iou, use_07", [(0, 0.5, False), (1, 0.5, False), (2, 0.7, False), (3, 0.5, True)])
def test_voc_map_matches_the_devkit_loop(seed, iou, use_07):
    truth_voc, dets_voc = random_case(seed)
    truth, dets = to_continuous(truth_voc, dets_voc, len(truth_voc))
    scale = 0.75  # canvas coordinates: evaluation divides by the scale again
    got = E.voc_map(make_split(truth, scale), np.arange(len(truth)), make_detections(dets, scale), iou,
                    use_07_metric=use_07, num_classes=3)
    expected = [devkit_voc_eval(truth_voc, dets_voc, c, iou, use_07) for c in range(3)]
    np.testing.assert_allclose(got["per_class_ap"], expected, rtol=1e-12, atol=1e-12)
    assert got["map50"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert 0.05 < np.mean(expected) < 0.95  # a case with both hits and misses


def test_voc_map_worked_case_and_subset():
    # class 0: two boxes; detections TP 0.9, FP 0.8 (a duplicate), TP 0.7:
    # recall 1/2, 1/2, 1; precision 1, 1/2, 2/3 -> envelope 1, 2/3, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # class 1: its one box is difficult, so it has no AP (NaN) and the mAP is class 0's.
    truth = [[(0, 0, 10, 10, 0, False), (50, 50, 60, 70, 1, True)], [(20, 20, 40, 40, 0, False)]]
    dets = [[(0, 0, 10, 10, 0.9, 0), (1, 0, 10, 10, 0.8, 0), (50, 50, 60, 70, 0.95, 1)], [(20, 21, 40, 40, 0.7, 0)]]
    got = E.voc_map(make_split(truth), [0, 1], make_detections(dets), num_classes=2)
    assert got["per_class_ap"][0] == pytest.approx(5 / 6, abs=1e-12) and np.isnan(got["per_class_ap"][1])
    assert got["map50"] == pytest.approx(5 / 6, abs=1e-12)
    # only image 1, whose detection is right: AP 1
    only = E.voc_map(make_split(truth), [1], make_detections([dets[1]]), num_classes=2)
    assert only["per_class_ap"][0] == 1.0


# --- COCO wiring against pycocotools on cases of known AP ------------------------------------------


def perfect(truth):
    return [[(*o[:4], 0.9 - 0.01 * j, o[4]) for j, o in enumerate(objects)] for objects in truth]


TRUTH = [[(10, 10, 50, 60, 0, False), (60, 20, 90, 90, 1, False)], [(5, 5, 95, 40, 0, False)], []]


def test_coco_perfect_predictions_score_one():
    got = E.coco_metrics(make_split(TRUTH, 0.5), [0, 1, 2], make_detections(perfect(TRUTH), 0.5), num_classes=2)
    for key in ("ap", "ap50", "ap75"):
        assert got[key] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(got["per_class_ap"], [1.0, 1.0], atol=1e-12)


def test_coco_one_class_missing_scores_half():
    dets = [[d for d in image if d[5] == 0] for image in perfect(TRUTH)]
    got = E.coco_metrics(make_split(TRUTH), [0, 1, 2], make_detections(dets), num_classes=2)
    assert got["ap"] == pytest.approx(0.5, abs=1e-12)
    np.testing.assert_allclose(got["per_class_ap"], [1.0, 0.0], atol=1e-12)


def test_coco_box_between_thresholds():
    # IoU 0.72 with the only box: a match at thresholds .50-.70 (5 of 10), precision 1 there, 0 above
    truth = [[(0, 0, 10, 10, 0, False)]]
    got = E.coco_metrics(make_split(truth), [0], make_detections([[(0, 0, 10, 7.2, 0.5, 0)]]), num_classes=1)
    assert (got["ap"], got["ap50"], got["ap75"]) == pytest.approx((0.5, 1.0, 0.0), abs=1e-12)


def test_coco_areas_are_original_pixels():
    # a 40x40 box (area 1600: COCO "medium") at scale 0.5 is 20x20 on the canvas ("small" there)
    truth = [[(10, 10, 50, 50, 0, False)]]
    got = E.coco_metrics(make_split(truth, 0.5), [0], make_detections(perfect(truth), 0.5), num_classes=1)
    assert got["apm"] == pytest.approx(1.0) and np.isnan(got["aps"]) and np.isnan(got["apl"])
    # an annotated (mask) area, as COCO's, decides the range rather than the box's
    annotated = E.coco_metrics(make_split(truth, 0.5, areas=[[900.0]]), [0], make_detections(perfect(truth), 0.5),
                               num_classes=1)
    assert annotated["aps"] == pytest.approx(1.0) and np.isnan(annotated["apm"])


def test_coco_difficult_and_crowd_are_ignored():
    # a high-scoring detection on a difficult box and one inside a crowd region: neither is a false positive
    truth = [[(10, 10, 50, 60, 0, False), (60, 60, 90, 90, 0, True)]]
    dets = [[(60, 60, 90, 90, 0.99, 0), (5, 70, 25, 90, 0.98, 0), (10, 10, 50, 60, 0.5, 0)]]
    crowd = [[(0, 65, 30, 95, 0)]]
    got = E.coco_metrics(make_split(truth, crowd=crowd), [0], make_detections(dets), num_classes=1)
    assert got["ap"] == pytest.approx(1.0, abs=1e-12)
    without = E.coco_metrics(make_split([truth[0][:1]]), [0], make_detections(dets), num_classes=1)
    assert without["ap"] < 0.5  # the same detections, the boxes not marked: two false positives first


def test_coco_no_detections_and_bad_shapes():
    got = E.coco_metrics(make_split(TRUTH), [0, 1, 2], make_detections([[], [], []]), num_classes=3)
    assert got["ap"] == 0.0 and got["per_class_ap"][:2].tolist() == [0.0, 0.0] and np.isnan(got["per_class_ap"][2])
    with pytest.raises(ValueError, match="n=3 images"):
        E.coco_metrics(make_split(TRUTH), [0, 1, 2], make_detections([[], []]))
