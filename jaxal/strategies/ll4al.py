"""Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019).

The loop trains the loss-prediction module (`jaxal.models.LossNet`) jointly with the classifier
(`jaxal.train.loss_prediction_loss`) because the strategy is registered with `needs_lossnet=True`.
Selection: the LossNet applied to the intermediate block outputs of an inference-mode forward pass
(BatchNorm running averages, no dropout; the reference's `eval()`), highest predicted loss first.
The pool is scored in fixed-size jitted chunks (one compilation) by `jaxal.parallel.map_chunks`.
Segmentation: the predicted loss is an image's (the module pools every block over its pixels), and its
target the task's supervised loss of the image, the cross-entropy averaged over its labelled pixels.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxal import parallel
from jaxal.models import LossNet
from jaxal.strategies.base import ALL_TASKS, Scores, StrategyContext, register_scorer


def _predicted_loss_chunk(static, consts, xs) -> jax.Array:
    (model, lossnet), (variables, lossnet_params) = static, consts
    blocks = model.apply(variables, xs, train=False).blocks
    return lossnet.apply({"params": lossnet_params}, blocks)


def predicted_losses(model: nn.Module, variables: dict, lossnet: LossNet, lossnet_params, xs, *,
                     chunk_size: int = 512, mesh=None) -> jax.Array:
    """(n,) losses predicted by the LossNet for every example of `xs`."""
    return parallel.map_chunks(_predicted_loss_chunk, (model, lossnet), (variables, lossnet_params), xs,
                               chunk_size=chunk_size, mesh=mesh)


@register_scorer("ll4al", needs_lossnet=True, tasks=ALL_TASKS)
def ll4al(ctx: StrategyContext):
    """Highest loss predicted by a jointly trained loss-prediction module (LL4AL, Yoo & Kweon 2019)."""
    if ctx.lossnet is None or ctx.lossnet_params is None:
        raise ValueError("ll4al needs the jointly trained LossNet (ctx.lossnet and ctx.lossnet_params)")
    return Scores(predicted_losses(ctx.model, ctx.variables, ctx.lossnet, ctx.lossnet_params, ctx.pool_x,
                                   chunk_size=ctx.config.eval_batch_size, mesh=ctx.mesh))
