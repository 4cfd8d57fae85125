"""`ll4al` on detection (Yoo & Kweon, CVPR 2019, as ISAL's appendix D.2 runs it): LL4AL's loss-prediction
module on FCOS's five FPN levels P3-P7, trained with the detector without back-propagating into it
(`jaxal.detection.training.LossPrediction`: the loop trains it because the strategy is registered with
`trains_loss_prediction=True`); the images with the highest predicted loss first (LL4AL's code,
`Mephisto405/Learning-Loss-for-Active-Learning` main.py:191-207 `get_uncertainty`, then main.py:270-273: the
last ADDENDUM of `np.argsort(uncertainty)`, the largest). The module is jaxal's one
(`jaxal.models.LossNet`, the classification `ll4al`'s), its options `--lossnet.margin`, `--lossnet.weight`
and `--lossnet.width`. Each batch of the pool goes through `parallel.map_chunks` (split over the mesh's
`data` axis); one number per image is kept."""

from __future__ import annotations

import numpy as np

from jaxal import parallel
from jaxal.config import Config
from jaxal.detection import training
from jaxal.detection.strategies import DetectionContext, rank, register, stream
from jaxal.models import LossNet
from jaxal.strategies.base import Selection


def loss_prediction(config: Config) -> training.LossPrediction:
    """The module of the config's `--lossnet.*` (width 128, margin 1, lambda 1 by default: LL4AL's, ISAL's)."""
    o = config.lossnet
    return training.LossPrediction(LossNet(o.width), margin=o.margin, weight=o.weight)


def _predicted(static, variables, images):
    detector, module = static
    return training.predicted_losses(detector, module, variables, images)


def predicted_losses(ctx: DetectionContext, indices) -> np.ndarray:
    """(n,) the module's predicted loss of each image of `indices` (into ctx.pool)."""
    if "lossnet" not in ctx.variables:
        raise ValueError("ll4al needs the loss-prediction module trained with the detector (variables['lossnet']: "
                         "training.train(..., loss_prediction=...))")
    static, variables = (ctx.detector, loss_prediction(ctx.config)), parallel.replicate(ctx.variables, ctx.mesh)
    return stream(ctx.pool, indices, ctx.config.eval_batch_size,
                  lambda batch: parallel.map_chunks(_predicted, static, variables, batch["images"],
                                                    chunk_size=len(batch["images"]), mesh=ctx.mesh))


@register("ll4al", trains_loss_prediction=True)
def ll4al(ctx: DetectionContext, k: int) -> Selection:
    """Highest loss predicted by the jointly trained module."""
    scores = predicted_losses(ctx, ctx.candidates)
    return Selection(rank(scores, np.ones(len(scores), bool), k, ctx.rng, descending=True), scores,
                     {"predicted_loss_mean": float(np.mean(scores))})
