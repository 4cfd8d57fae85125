"""`ent_gn` / `exp_gn` on detection (Wang et al.'s gradient-norm strategies, which never ran detection): the
norm of the gradient of an image's label-free loss, the binary entropy of the sigmoid class posteriors at
its top-k scoring locations (`jaxal.tasks.Detection.entropy`; `expected_loss` is the same function, so
exp_gn = ent_gn), with respect to the classification branch (its tower and last conv; `--boxal.gn_params
all`: every layer but the per-level scales, which the ghost engine cannot form). The norms come from
jaxal's one gradient-norm engine (`jaxal.gradnorm`, `--gradnorm.method`, `--gradnorm.norm`), which sums a
head layer's per-level gradients; the pool is read per batch. The highest norm is selected."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import traverse_util

from jaxal import gradnorm, parallel
from jaxal.detection.strategies import DetectionContext, inference_apply, register, stream
from jaxal.strategies.base import Selection

CLS_BRANCH = ("cls_conv", "cls_norm", "fcos_cls")


def cls_branch(params):
    """Mask of the classification tower (convs and GroupNorms) and the last classification conv."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: len(k) > 1 and k[0] == "head" and any(k[1].startswith(p) for p in CLS_BRANCH) for k in flat})


def all_but_scales(params):
    """Every parameter but the per-level Scale factors (bare parameters, no layer)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: not k[-1].startswith("scale_") for k in flat})


SUBSETS = {"cls_branch": cls_branch, "all": all_but_scales}
LOSSES = {"ent_gn": "entropy", "exp_gn": "expected_loss"}


def _norms(static, variables, images):
    detector, task, loss_name, subset, norm, method = static
    loss = gradnorm.example_loss(inference_apply(detector, variables.get("batch_stats", {})),
                                 getattr(task, loss_name))
    return gradnorm.per_example_grad_norms(loss, variables["params"], images, norm=norm, params_filter=SUBSETS[subset],
                                           method=method)


def gradient_norms(ctx: DetectionContext, name: str) -> np.ndarray:
    o = ctx.config.boxal
    task = dataclasses.replace(ctx.task, top_k=o.top_k)
    static = (ctx.detector, task, LOSSES[name], o.gn_params, ctx.config.gradnorm.norm, ctx.config.gradnorm.method)
    variables = parallel.replicate(ctx.variables, ctx.mesh)
    return stream(ctx.pool, ctx.candidates, ctx.config.eval_batch_size,
                  lambda batch: parallel.map_chunks(_norms, static, variables, batch["images"],
                                                    chunk_size=len(batch["images"]), mesh=ctx.mesh))


def _selection(ctx: DetectionContext, k: int, name: str) -> Selection:
    norms = gradient_norms(ctx, name).astype(np.float64)
    chosen = np.argsort(-norms, kind="stable")[:k]
    return Selection(chosen, norms, {"params": ctx.config.boxal.gn_params, "top_k": ctx.config.boxal.top_k})


@register("ent_gn")
def ent_gn(ctx: DetectionContext, k: int) -> Selection:
    """Largest gradient norm of the top-k binary entropy."""
    return _selection(ctx, k, "ent_gn")


@register("exp_gn")
def exp_gn(ctx: DetectionContext, k: int) -> Selection:
    """Largest gradient norm of the expected BCE under the model's own posteriors (= ent_gn)."""
    return _selection(ctx, k, "exp_gn")
