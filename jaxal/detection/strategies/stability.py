"""`localization_stability` (Kao et al., ACCV 2018, "Localization-aware active learning for object
detection"), as ISAL's code computes it (`dragonlzm/ISAL` `detection/src/mining/methods/
localization_based_mining_algorithm.py:11-87`, `src/test.py:117-124`):

- the detector's post-NMS detections on the clean image are the reference boxes (with their scores);
- the image is corrupted by Gaussian noise of several levels (mmdet's `Corrupt(corruption='gaussian_noise',
  severity=s)`, i.e. imagecorruptions' `clip(x / 255 + N(0, c), 0, 1) * 255` cast to uint8, c = 0.08, 0.12,
  0.18, 0.26, 0.38 for severities 1-5: `--boxal.stability_noise` lists the c's, default all five) and
  detected again;
- per reference box, its largest IoU with the detections of each noise level (0 where a level has none),
  averaged over the levels; the image's stability is the mean of those weighted by the reference
  scores. IoU with pixel-inclusive areas (+1) as its `calculate_iou` (`mining/utils/utils.py:51-74`),
  but of the boxes themselves: that function turns COCO's [x, y, w, h] (y the top edge) into
  [x, y - h, x + w, y], each box mirrored about its top edge, which changes the IoU of boxes of
  different heights; the true IoU is Kao et al.'s definition.
The LEAST stable images are selected (ascending, no `--sorted-reverse`); an image without a reference
box is unscored and filled in at random, as the code does (:57-64).

Deviation: the noise is added to the image on its canvas (resized, padding included) where mmdet adds it
to the original image before the resize.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import parallel
from jaxal.detection import training
from jaxal.detection.strategies import DetectionContext, rank, register, stream
from jaxal.strategies.base import Selection


def iou_inclusive(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(K, 4) x (L, 4) x1y1x2y2 boxes -> (K, L) IoU with ISAL's +1 pixel areas."""
    iw = np.maximum(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1.0, 0.0)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0] + 1.0) * (x[:, 3] - x[:, 1] + 1.0)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def stability(reference: dict, levels: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(n,) stabilities of n images from their clean detections and each noise level's ({"boxes" (n, M, 4),
    "scores" (n, M), "valid" (n, M)}), and which images have a reference box."""
    n = reference["valid"].shape[0]
    values, scored = np.full(n, np.nan), reference["valid"].any(axis=1)
    for i in np.flatnonzero(scored):
        ref = reference["valid"][i]
        boxes, weights = reference["boxes"][i][ref].astype(np.float64), reference["scores"][i][ref].astype(np.float64)
        average = np.zeros(len(boxes))
        for level in levels:
            found = level["valid"][i]
            if found.any():
                average += iou_inclusive(boxes, level["boxes"][i][found].astype(np.float64)).max(axis=1)
        average /= len(levels)
        values[i] = np.sum(average * weights) / np.sum(weights)
    return values, scored


def _detect_noisy(detector, consts, chunk):
    """Detections of the images with imagecorruptions' Gaussian noise of `std` (uint8 again, as mmdet's);
    each image's noise drawn from its own index, whatever batch (or device) it is in."""
    variables, key, std = consts
    images, sizes, indices = chunk
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), images.shape[1:]))(indices)
    x = images.astype(jnp.float32) / 255.0 + std * noise
    noisy = jnp.floor(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return training._detect_batch(detector, variables, noisy, sizes)


@register("localization_stability")
def localization_stability(ctx: DetectionContext, k: int) -> Selection:
    """The least stable boxes under Gaussian image noise (Kao et al.), weighted by their confidence."""
    keys = ("boxes", "scores", "valid")
    batch_size = ctx.config.eval_batch_size
    reference = training.detect(ctx.detector, ctx.variables, ctx.pool, ctx.candidates, batch_size, mesh=ctx.mesh)
    seed = int(ctx.rng.integers(2**31))
    variables = parallel.replicate(ctx.variables, ctx.mesh)
    levels = []
    for level, std in enumerate(ctx.config.boxal.stability_noise):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), level)

        def detect(batch, consts=(variables, key, float(std))):
            found = parallel.map_chunks(_detect_noisy, ctx.detector, consts,
                                        tuple(batch[k_] for k_ in ("images", "sizes", "indices")),
                                        chunk_size=batch_size, mesh=ctx.mesh)
            return {k_: found[k_] for k_ in keys}

        levels.append(stream(ctx.pool, ctx.candidates, ctx.config.eval_batch_size, detect))
    values, scored = stability(reference, levels)
    chosen = rank(values, scored, k, ctx.rng, descending=False)
    return Selection(chosen, values, {"num_scored": int(scored.sum()), "num_unscored": int((~scored).sum()),
                                      "filled_at_random": int(max(0, k - int(scored.sum()))),
                                      "noise_levels": [float(s) for s in ctx.config.boxal.stability_noise]})
