"""ISAL's uncertainty miners on detection (`dragonlzm/ISAL` `detection/src/mining/methods/
hitl_mining_algorithm.py`): an image's post-NMS detection scores (the detector's test output; the miners'
`score_thresh` is 0, so every detection counts), each box a Bernoulli [1 - s, s], a value per box reduced
over the image's boxes by the max (`torch.max(...)`, the code; `--boxal.reduction mean|sum` as options), the
highest selected (the miners run with `--sorted-reverse`):

- `entropy` (`MaxEntropyMiningAlgorithm`, :83-93): -(s log(s + 1e-10) + (1 - s) log(1 - s + 1e-10));
- `least_confidence` (`LeastConfidenceMiningAlgorithm`, :68-74): -s (the code negates the score itself,
  not 1 - max(s, 1 - s));
- `margin` (`MarginalSamplingMiningAlgorithm`, :96-107): the second probability minus the first of the
  sorted [1 - s, s], i.e. -|2s - 1|.

An image with no detection has no value: it is ranked after every scored image, in random order (the
miners' `unscored_data`, shuffled and used only when the scored images are fewer than the budget, :40-53).
ISAL's simulated pool holds only images with ground-truth boxes (its COCO loader drops the others): that is
the loop's choice of pool, not the strategy's.
"""

from __future__ import annotations

import numpy as np

from jaxal.detection import training
from jaxal.detection.strategies import DetectionContext, rank, register
from jaxal.strategies.base import Selection

EPS = 1e-10  # hitl_mining_algorithm.py:85 `eps=1e-10`


def box_values(scores: np.ndarray, measure: str) -> np.ndarray:
    """Per-box values of detection scores (any shape)."""
    s = np.asarray(scores, np.float64)
    if measure == "entropy":
        return -(s * np.log(s + EPS) + (1.0 - s) * np.log(1.0 - s + EPS))
    if measure == "least_confidence":
        return -s
    if measure == "margin":
        return -np.abs(2.0 * s - 1.0)
    raise ValueError(f"unknown uncertainty measure {measure!r}")


def image_values(scores: np.ndarray, valid: np.ndarray, measure: str, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """(n,) values of images with detections (n, M) (`valid` marks real ones), and which images have any."""
    values = box_values(scores, measure)
    valid = np.asarray(valid, bool)
    scored = valid.any(axis=1)
    if reduction == "max":
        out = np.where(valid, values, -np.inf).max(axis=1)
    elif reduction == "sum":
        out = np.where(valid, values, 0.0).sum(axis=1)
    elif reduction == "mean":
        out = np.where(valid, values, 0.0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return np.where(scored, out, np.nan), scored


def uncertainty_selection(ctx: DetectionContext, k: int, measure: str) -> Selection:
    found = training.detect(ctx.detector, ctx.variables, ctx.pool, ctx.candidates, ctx.config.eval_batch_size,
                             mesh=ctx.mesh)
    values, scored = image_values(found["scores"], found["valid"], measure, ctx.config.boxal.reduction)
    chosen = rank(values, scored, k, ctx.rng, descending=True)
    info = {"num_scored": int(scored.sum()), "num_unscored": int((~scored).sum()),
            "filled_at_random": int(max(0, k - int(scored.sum()))), "reduction": ctx.config.boxal.reduction}
    return Selection(chosen, values, info)


for _measure in ("entropy", "least_confidence", "margin"):
    register(_measure)(lambda ctx, k, _m=_measure: uncertainty_selection(ctx, k, _m))
