"""Gradient-norm strategies: exp_gn, ent_gn (Wang et al., AAAI 2022), lplgrad, and egl (Settles et al.).

Each scores an unlabelled x by the norm of `grad_theta L(x)` of a loss that needs no label, with the
model in inference mode; the largest norms are selected.
  - ent_gn: L = the entropy of the prediction.
  - exp_gn: L = the expected loss `sum_i p_i CE(x, i)` with the posterior differentiated, as in the
    reference code. That is exactly the entropy, so exp_gn ranks exactly as ent_gn (see README).
  - lplgrad: ent_gn on a model trained jointly with the LL4AL loss-prediction module; the predicted
    loss itself is not used for selection.
  - egl: expected gradient length `sum_i p_i ||grad CE(x, i)||`: what "expected gradient norm" means
    when the norm is taken inside the expectation.
Norm ("layer_sum", the reference codes' choice, or "global"), parameter subset and the engine method
come from `config.gradnorm`.

Segmentation: the loss is the task's, the per-pixel entropy (or expected loss) averaged over the image's
pixels (`jaxal.tasks`), so ent_gn / exp_gn / lplgrad score one gradient norm per image. Memory per chunk
of images (XLA's analysis, experiments/bench_segmentation.py): "vmap" holds each image's activations and
gradient, "ghost" each layer's input patches (T positions x 9 C_in for a 3x3 convolution, so several times
the activations at full resolution); both grow with the chunk only, and the segmentation presets use
"vmap". EGL refuses segmentation (see its registration).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import gradnorm
from jaxal.config import Config
from jaxal.models import inference_apply
from jaxal.parallel import map_chunks
from jaxal.pytree import PARAM_SUBSETS
from jaxal.strategies.base import ALL_TASKS, Scores, StrategyContext, register_scorer

# The task method whose gradient norm each strategy ranks by (`jaxal.tasks`: a loss of one example's
# logits, reduced over its outputs).
QUERY_LOSSES = {"exp_gn": "expected_loss", "ent_gn": "entropy"}
# the query loss each gradient-norm strategy ranks by (lplgrad: ent_gn's, on its jointly trained model)
STRATEGY_QUERY_LOSS = {"exp_gn": "exp_gn", "ent_gn": "ent_gn", "lplgrad": "ent_gn"}


def check_options(config: Config) -> None:
    options = config.gradnorm
    if options.norm not in gradnorm.NORMS:
        raise ValueError(f"unknown --gradnorm.norm {options.norm!r}; choose one of: {', '.join(gradnorm.NORMS)}")
    if options.params not in PARAM_SUBSETS:
        raise ValueError(f"unknown --gradnorm.params {options.params!r}; choose one of: {', '.join(PARAM_SUBSETS)}")
    if options.method == "mixed":  # its layers come from compiling programs: what the budget's choice does
        raise ValueError("--gradnorm.method mixed: the mixed engine (each layer by vmap or ghost) is chosen from XLA's "
                         "memory analysis with --gradnorm.memory_budget_mib M (a large M takes the engine with the "
                         f"fewest bytes per example); --gradnorm.method is one of: {', '.join(gradnorm.METHODS)}")
    if options.method not in gradnorm.METHODS:
        raise ValueError(f"unknown --gradnorm.method {options.method!r}; choose one of: "
                         f"{', '.join(gradnorm.METHODS)}")
    if options.chunk_size < 1:
        raise ValueError("--gradnorm.chunk_size must be at least 1")
    if not options.memory_budget_mib >= 0:
        raise ValueError(f"--gradnorm.memory_budget_mib must be 0 (off) or positive, got {options.memory_budget_mib}")


def _query_norms(static, variables, xs):
    model, task, loss_name, norm, subset, method, ghost_layers = static
    loss = gradnorm.example_loss(inference_apply(model, variables["batch_stats"]),
                                 getattr(task, QUERY_LOSSES[loss_name]))
    return gradnorm.per_example_grad_norms(loss, variables["params"], xs, norm=norm, params_filter=subset,
                                           method=method, ghost_layers=ghost_layers)


def _expected_gradient_length(static, variables, xs):
    """sum_c p_c ||grad CE(x, c)||: every (example, class) pair is scored as a labelled example, so the
    memory stays that of C ordinary per-example norms (no C x |theta| gradients per example)."""
    model, norm, subset, method = static
    apply_fn = inference_apply(model, variables["batch_stats"])
    probs = jax.nn.softmax(apply_fn(variables["params"], xs).logits)
    n, num_classes = probs.shape
    pairs = (jnp.repeat(xs, num_classes, axis=0), jnp.tile(jnp.arange(num_classes), n))
    loss = gradnorm.example_loss(apply_fn, gradnorm.cross_entropy, labeled=True)
    norms = gradnorm.per_example_grad_norms(loss, variables["params"], pairs, norm=norm, params_filter=subset,
                                            method=method)
    return jnp.sum(probs * norms.reshape(n, num_classes), axis=1)


def engine_method(ctx: StrategyContext, loss: gradnorm.ExampleLoss, examples) -> str:
    """The configured engine, or "vmap" (with a warning, once) where the ghost engine ("ghost", "auto")
    does not know the model's layers: any model runs (`gradnorm.ghost_or_vmap`)."""
    options = ctx.config.gradnorm
    if options.method not in gradnorm.LAYERWISE_METHODS:
        return options.method
    return gradnorm.ghost_or_vmap(loss, ctx.variables["params"], examples, options.params, options.method)


_ENGINE_CHOICES: dict = {}


def budget_engine(model, task, loss_name: str, options, variables: dict, examples) -> gradnorm.EngineChoice:
    """With `--gradnorm.memory_budget_mib`: the engine and chunk size that XLA's memory analysis allows
    (`gradnorm.choose_engine` among vmap, the ghost engine of `--gradnorm.method` (left out where it does
    not know every selected layer) and the mixed engine, each layer by the engine XLA finds smaller for it),
    decided once per model, loss, options and example shape (the compiled programs depend on nothing
    else), so the run header and every cycle agree."""
    key = (model, task, loss_name, options, examples.shape[1:], str(examples.dtype))
    if key not in _ENGINE_CHOICES:
        loss = gradnorm.example_loss(inference_apply(model, variables["batch_stats"]),
                                     getattr(task, QUERY_LOSSES[loss_name]))
        ghost = "auto" if options.method == "auto" else "ghost"
        layerwise = gradnorm.ghost_or_vmap(loss, variables["params"], examples[:1], options.params, ghost)
        methods = ("vmap", "mixed") if layerwise == "vmap" else ("vmap", layerwise, "mixed")
        _ENGINE_CHOICES[key] = gradnorm.choose_engine(
            loss, variables["params"], examples[:1], options.memory_budget_mib * 2**20, methods=methods,
            max_chunk=options.chunk_size, norm=options.norm, params_filter=options.params)
    return _ENGINE_CHOICES[key]


def query_gradient_norms(ctx: StrategyContext, loss_name: str) -> jax.Array:
    options = ctx.config.gradnorm
    loss = gradnorm.example_loss(inference_apply(ctx.model, ctx.variables["batch_stats"]),
                                 getattr(ctx.task, QUERY_LOSSES[loss_name]))
    if options.memory_budget_mib > 0:
        choice = budget_engine(ctx.model, ctx.task, loss_name, options, ctx.variables, ctx.pool_x)
        method, chunk_size = choice.method, choice.chunk_size
        ghost_layers = choice.ghost_layers if method == "mixed" else None
    else:
        method, chunk_size, ghost_layers = engine_method(ctx, loss, ctx.pool_x), options.chunk_size, None
    static = (ctx.model, ctx.task, loss_name, options.norm, options.params, method, ghost_layers)
    return map_chunks(_query_norms, static, ctx.variables, ctx.pool_x, chunk_size=chunk_size, mesh=ctx.mesh)


@register_scorer("exp_gn", check=check_options, tasks=ALL_TASKS)
def exp_gn_scores(ctx: StrategyContext):
    """Largest gradient norm of the expected loss (Wang et al.; equals ent_gn, see README)."""
    return Scores(query_gradient_norms(ctx, STRATEGY_QUERY_LOSS["exp_gn"]))


@register_scorer("ent_gn", check=check_options, tasks=ALL_TASKS)
def ent_gn_scores(ctx: StrategyContext):
    """Largest gradient norm of the prediction entropy (Wang et al.)."""
    return Scores(query_gradient_norms(ctx, STRATEGY_QUERY_LOSS["ent_gn"]))


@register_scorer("lplgrad", needs_lossnet=True, check=check_options, tasks=ALL_TASKS)
def lplgrad_scores(ctx: StrategyContext):
    """Entropy gradient norm of a model trained jointly with the LL4AL loss-prediction module."""
    return Scores(query_gradient_norms(ctx, STRATEGY_QUERY_LOSS["lplgrad"]))


@register_scorer("egl", check=check_options, task_note=(
    "the expected gradient length sums ||grad CE(x, y)|| over every labelling y of the output, C^(H*W) label "
    "maps for an image (a gradient per pixel and class would be H*W*C backward passes per image)"))
def egl_scores(ctx: StrategyContext):
    """Largest expected gradient length sum_i p_i ||grad CE(x, i)|| (Settles et al.)."""
    options = ctx.config.gradnorm
    loss = gradnorm.example_loss(inference_apply(ctx.model, ctx.variables["batch_stats"]), gradnorm.cross_entropy,
                                 labeled=True)
    pair = (ctx.pool_x[:1], np.zeros((1,), np.int32))
    static = (ctx.model, options.norm, options.params, engine_method(ctx, loss, pair))
    # C labelled pairs per example: keep a chunk of pairs as large as a chunk of examples.
    chunk = max(1, options.chunk_size // ctx.num_classes)
    return Scores(map_chunks(_expected_gradient_length, static, ctx.variables, ctx.pool_x, chunk_size=chunk,
                             mesh=ctx.mesh))
