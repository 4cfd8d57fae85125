"""`coreset` on detection (ISAL's appendix D.2): Sener & Savarese's greedy k-center on each image's
features, the global-average-pooled outputs of FCOS's classification and regression towers concatenated
(averaged over the FPN levels: `jaxal.models.fcos`'s "features"), the labelled set as the initial centres.
The greedy loop is jaxal's one (`jaxal.strategies.baselines.greedy_k_center`); the features are read per
batch, so only (pool + labelled) x 2 x channels numbers are held."""

from __future__ import annotations

import numpy as np

from jaxal import parallel
from jaxal.config import max_labeled
from jaxal.detection.strategies import DetectionContext, register, stream
from jaxal.strategies.base import Selection
from jaxal.strategies.baselines import greedy_k_center


def _features(detector, variables, images):
    return detector.apply(variables, images)["features"]


def features(ctx: DetectionContext, split, indices) -> np.ndarray:
    variables = parallel.replicate(ctx.variables, ctx.mesh)
    return stream(split, indices, ctx.config.eval_batch_size,
                  lambda batch: parallel.map_chunks(_features, ctx.detector, variables, batch["images"],
                                                    chunk_size=len(batch["images"]), mesh=ctx.mesh))


@register("coreset")
def coreset(ctx: DetectionContext, k: int) -> Selection:
    """Greedy k-center on the pooled tower features."""
    pool = features(ctx, ctx.pool, ctx.candidates)
    labeled = features(ctx, ctx.pool, ctx.labeled)
    chosen = greedy_k_center(pool, labeled, k, pool_capacity=len(ctx.pool),
                             labeled_capacity=max_labeled(ctx.config), precision=ctx.config.precision.solvers)
    return Selection(np.asarray(chosen), None, {"feature_dim": int(pool.shape[1])})
