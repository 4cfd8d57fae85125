"""Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019).

The loop trains the loss-prediction module (`jaxal.models.LossNet`) jointly with the classifier
(`jaxal.train.loss_prediction_loss`) because the strategy is registered with `needs_lossnet=True`.
Selection: the LossNet applied to the intermediate block outputs of an inference-mode forward pass
(BatchNorm running averages, no dropout; the reference's `eval()`), highest predicted loss first.
The pool is scored in fixed-size jitted chunks (one compilation).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxal.models import LossNet
from jaxal.strategies.bald import map_pool_chunks
from jaxal.strategies.base import StrategyContext, register_scorer


@functools.partial(jax.jit, static_argnames=("model", "lossnet"))
def _predicted_loss_chunk(variables, lossnet_params, xs, *, model: nn.Module, lossnet: LossNet) -> jax.Array:
    blocks = model.apply(variables, xs, train=False).blocks
    return lossnet.apply({"params": lossnet_params}, blocks)


def predicted_losses(model: nn.Module, variables: dict, lossnet: LossNet, lossnet_params, xs, *,
                     chunk_size: int = 512) -> jax.Array:
    """(n,) losses predicted by the LossNet for every example of `xs`."""
    fn = functools.partial(_predicted_loss_chunk, model=model, lossnet=lossnet)
    return map_pool_chunks(lambda chunk, _: fn(variables, lossnet_params, chunk), xs, chunk_size)


@register_scorer("ll4al", needs_lossnet=True)
def ll4al(ctx: StrategyContext):
    """Highest loss predicted by a jointly trained loss-prediction module (LL4AL, Yoo & Kweon 2019)."""
    if ctx.lossnet is None or ctx.lossnet_params is None:
        raise ValueError("ll4al needs the jointly trained LossNet (ctx.lossnet and ctx.lossnet_params)")
    return predicted_losses(ctx.model, ctx.variables, ctx.lossnet, ctx.lossnet_params, ctx.pool_x,
                            chunk_size=ctx.config.eval_batch_size)
