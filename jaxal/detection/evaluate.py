"""Detection metrics in ORIGINAL image coordinates: COCO AP from pycocotools, VOC mAP@0.5 in NumPy.

Both take a `BoxSplit`, the `indices` of the evaluated images and their detections in canvas pixels:
    {"boxes": (n, K, 4) x1, y1, x2, y2, "scores": (n, K), "classes": (n, K) int, "valid": (n, K) bool}
and divide boxes by the image's `scale` first. Memory: the detections are K per image (K = the decoder's
max_per_img), so evaluation holds O(K x images) numbers -- 5000 COCO val images at K = 100 are 3.5 MB of
boxes -- and pycocotools' per-image records, bounded the same way.

`coco_metrics`: pycocotools' COCOeval (bbox) over a COCO object built from the split -- COCO's matching is
not reimplemented. Crowd regions (`BoxSplit.crowd`) and VOC's difficult boxes enter as iscrowd=1 (as
mmdetection's VOC-to-COCO converter writes difficult boxes), so pycocotools ignores the detections they
cover. Areas for APs/APm/APl are the split's `areas`: COCO's annotated (mask) areas where the source gives
them, as the official evaluation uses, else box areas w x h (VOC).

`voc_map`: the VOC devkit's voc_eval: detections of a class sorted by score, each matched to the ground
truth box of its image with the largest IoU; over `iou` (strictly) and not yet taken: a true positive;
matched to a difficult box: neither; else a false positive. AP is the area under the precision envelope
at every recall step (VOC2010+ "all-point"), or the 11-point mean (VOC2007) with `use_07_metric`.
The devkit's `+ 1` in widths is VOC's inclusive pixel count; in jaxal's continuous coordinates
(x1 = xmin - 1, x2 = xmax) the plain x2 - x1 is that same width.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

__all__ = ["coco_metrics", "voc_map"]

COCO_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
_IOU_CHUNK = 1 << 16  # detections per IoU block: bounds the (detections x boxes) matrix


def _original_detections(split, indices: np.ndarray, detections: dict):
    """(image row, box in original pixels, score, class) of every valid detection, rows into `indices`."""
    boxes = np.asarray(detections["boxes"], np.float64)
    scores = np.asarray(detections["scores"], np.float64)
    classes = np.asarray(detections["classes"], np.int64)
    valid = np.asarray(detections["valid"], bool)
    n = len(indices)
    if boxes.shape[:1] != (n,) or not (scores.shape == classes.shape == valid.shape == boxes.shape[:2]):
        raise ValueError(
            f"detections must be boxes (n, K, 4), scores, classes, valid (n, K) for the n={n} images; got "
            f"boxes {boxes.shape}, scores {scores.shape}, classes {classes.shape}, valid {valid.shape}"
        )
    rows, slots = np.nonzero(valid)
    scale = split.scales[indices].astype(np.float64)
    return rows, boxes[rows, slots] / scale[rows, None], scores[rows, slots], classes[rows, slots]


def _original_truth(split, indices: np.ndarray):
    """(image row, box in original pixels, class, difficult, area) of every real box of the images."""
    classes = split.classes[indices]
    rows, slots = np.nonzero(classes >= 0)
    scale = split.scales[indices].astype(np.float64)
    boxes = split.boxes[indices][rows, slots].astype(np.float64) / scale[rows, None]
    return (rows, boxes, classes[rows, slots].astype(np.int64), split.difficult[indices][rows, slots],
            split.areas[indices][rows, slots].astype(np.float64))


# --- COCO ------------------------------------------------------------------------------------------


def coco_ground_truth(split, indices, num_classes: int):
    """A pycocotools COCO object of the images `indices` (image ids 0..n-1 in their order): real boxes
    (difficult as iscrowd=1) and crowd regions, in original pixels, category ids = class indices."""
    from pycocotools.coco import COCO

    indices = np.asarray(indices, np.int64)
    rows, boxes, classes, difficult, areas = _original_truth(split, indices)
    annotations = []
    for row, box, cls, diff, area in zip(rows, boxes, classes, difficult, areas):
        annotations.append(_coco_annotation(len(annotations) + 1, int(row), box, int(cls), bool(diff), area))
    for row, i in enumerate(indices):
        for region in split.crowd[i]:
            box = region[:4].astype(np.float64)
            area = (box[2] - box[0]) * (box[3] - box[1])
            annotations.append(_coco_annotation(len(annotations) + 1, row, box, int(region[4]), True, area))
    h, w = split.original_sizes[indices].T
    coco = COCO()
    coco.dataset = {
        "images": [{"id": row, "height": int(h[row]), "width": int(w[row])} for row in range(len(indices))],
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _coco_annotation(ann_id: int, image: int, box: np.ndarray, cls: int, crowd: bool, area: float) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"id": ann_id, "image_id": image, "category_id": cls, "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(area), "iscrowd": int(crowd)}


def coco_metrics(split, indices, detections: dict, *, num_classes: int | None = None) -> dict:
    """{"ap": AP@[.5:.95], "ap50", "ap75", "aps", "apm", "apl", "per_class_ap": (C,)} from pycocotools
    (maxDets 100 per image), NaN where COCO reports -1 (no ground truth in that range). `num_classes`
    defaults to 1 + the largest class of the split."""
    from pycocotools.cocoeval import COCOeval

    indices = np.asarray(indices, np.int64).reshape(-1)
    num_classes = int(num_classes if num_classes is not None else split.classes.max() + 1)
    truth = coco_ground_truth(split, indices, num_classes)
    rows, boxes, scores, classes = _original_detections(split, indices, detections)
    nan = float("nan")
    if len(rows) == 0:  # pycocotools cannot load an empty result; no detection: AP 0 where there is truth
        has_truth = np.bincount(_original_truth(split, indices)[2], minlength=num_classes) > 0
        return {**{k: 0.0 for k in COCO_KEYS}, "per_class_ap": np.where(has_truth, 0.0, nan)}
    results = np.column_stack([rows, boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0],
                               boxes[:, 3] - boxes[:, 1], scores, classes])
    with contextlib.redirect_stdout(io.StringIO()):
        found = truth.loadRes(results)
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.params.imgIds = list(range(len(indices)))
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = {k: (nan if v < 0 else float(v)) for k, v in zip(COCO_KEYS, evaluation.stats[:6])}
    # precision [iou thresholds, recall points, classes, area ranges, max dets]: area "all", 100 dets
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    per_class = np.full(num_classes, nan)
    for k, cls in enumerate(evaluation.params.catIds):
        p = precision[:, :, k]
        per_class[cls] = p[p > -1].mean() if (p > -1).any() else nan
    return {**stats, "per_class_ap": per_class}


# --- VOC -------------------------------------------------------------------------------------------


def _iou(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(D, G) IoU of continuous boxes."""
    lo = np.maximum(boxes[:, None, :2], truth[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], truth[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_d = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    area_t = np.prod(truth[:, 2:] - truth[:, :2], axis=1)
    return inter / (area_d[:, None] + area_t[None, :] - inter)


def _average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    if use_07_metric:  # VOC2007: the mean of the best precision at recall >= 0, 0.1, ..., 1
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def _class_ap(det_rows, det_boxes, det_scores, truth_rows, truth_boxes, truth_difficult, iou, use_07_metric):
    positives = int((~truth_difficult).sum())
    if positives == 0:
        return float("nan")
    if len(det_rows) == 0:
        return 0.0
    order = np.argsort(-det_scores, kind="stable")
    det_rows, det_boxes = det_rows[order], det_boxes[order]
    # each detection's best box of its own image: the IoU is -inf against other images' boxes
    best_iou = np.full(len(det_rows), -np.inf)
    best_box = np.full(len(det_rows), -1)
    if len(truth_rows):
        for start in range(0, len(det_rows), _IOU_CHUNK):
            block = slice(start, start + _IOU_CHUNK)
            overlap = _iou(det_boxes[block], truth_boxes)
            overlap[det_rows[block, None] != truth_rows[None, :]] = -np.inf
            best_box[block] = np.argmax(overlap, axis=1)
            best_iou[block] = overlap[np.arange(len(overlap)), best_box[block]]
    hit = best_iou > iou
    on_difficult = hit & truth_difficult[np.maximum(best_box, 0)]
    candidate = hit & ~on_difficult
    # a box is taken by the first (highest-scoring) candidate that matches it; later ones are false positives
    first = np.zeros(len(det_rows), bool)
    _, first_of_box = np.unique(np.where(candidate, best_box, -1), return_index=True)
    first[first_of_box] = True
    tp = candidate & first
    fp = ~tp & ~on_difficult
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return _average_precision(recall, precision, use_07_metric)


def voc_map(split, indices, detections: dict, iou: float = 0.5, *, use_07_metric: bool = False,
            num_classes: int | None = None) -> dict:
    """{"map50": mean AP over the classes with a non-difficult box, "per_class_ap": (C,) NaN for a class
    without one}: the VOC devkit's algorithm (see the module docstring); `iou` the match threshold."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    num_classes = int(num_classes if num_classes is not None else split.classes.max() + 1)
    d_rows, d_boxes, d_scores, d_classes = _original_detections(split, indices, detections)
    t_rows, t_boxes, t_classes, t_difficult, _ = _original_truth(split, indices)
    per_class = np.array([
        _class_ap(d_rows[d_classes == c], d_boxes[d_classes == c], d_scores[d_classes == c],
                  t_rows[t_classes == c], t_boxes[t_classes == c], t_difficult[t_classes == c], iou, use_07_metric)
        for c in range(num_classes)
    ])  # fmt: skip
    counted = ~np.isnan(per_class)
    return {"map50": float(per_class[counted].mean()) if counted.any() else float("nan"), "per_class_ap": per_class}
