"""Influence-based selection: ISAL (Liu et al., ICCV 2021) and the gradient-similarity baseline.

ISAL scores an unlabelled point z by its influence on the loss of a labelled reference set R,

    I(z, R) = -grad L(R)^T H^-1 G_z,

and labels the MOST NEGATIVE I (the points whose addition lowers L(R) most; see the sign convention
in `jaxal.influence`). Here

- H is the Hessian of the mean true-label cross-entropy on the TRAINING labelled set
  (`ctx.labeled_x/y`), the model in inference mode (BatchNorm running averages, no dropout), with
  respect to the parameter subset `config.influence.params` (default "weights": every tensor of rank
  > 1, as ISAL), plus `weight_decay * I` with `--influence.hessian_weight_decay true` (the Hessian of the
  training objective, as Koh & Liang's code; ISAL's code leaves the weight decay out, the default).
  `s_test = (H + damping*scale*I)^-1 grad L(R)` comes from `config.influence.solver`: "lissa" (ISAL's:
  `depth` steps x `repeats` chains, `batch_size` labelled examples per Hessian-vector product,
  `damping`, `scale`), "cg" (stops at `cg_tol`) or "exact" (full-set Hessian of the labelled set, the
  same shifted system; refused before the run if the dense matrix exceeds `exact_max_gib`). Every
  product over the labelled set is a sum over chunks of `hvp_chunk_size` examples
  (`jaxal.influence.set_hvp`): the memory does not grow with the labelled set;
- v = grad L(R) is the mean true-label CE gradient over the reference set
  `ctx.reference_sets[reference]`;
- G_z is the gradient of CE at the pseudo-label, the arg-max class. With `top_k_classes = K > 1` it
  is the expected gradient over the K most probable classes (the paper's Table 1 variant),
  `G_z = sum_{k in top-K} q_k(z) grad CE(z, k)`, `q_k = p_k / sum_{j in top-K} p_j`: the probabilities
  are RENORMALISED over the top K and detached (constants of the differentiation). Renormalised,
  K = 1 is exactly the pseudo-label gradient, and G_z is the expected gradient of the label
  conditioned on being among the top K. (Unnormalised weights would scale every G_z by the top-K
  mass, which reorders the pool; and with all C classes both versions vanish identically, since
  `sum_k p_k (p - e_k) = 0` at the logits — so K must stay below the number of classes.)

Sign: the score registered (highest selected) is `-I(z, R) = s_test . G_z`, computed for the whole
pool by `jaxal.influence.influence_scores` (one forward-mode product per chunk, never per-example
gradients; the top-K loss is one per-example weighted loss, so it is also ONE jvp, not K).

Segmentation: the losses come from the task (`jaxal.tasks`): the reference loss and the Hessian's are the
cross-entropy averaged over an image's labelled pixels, G_z the gradient of the mean over its pixels of
each pixel's CE at its arg-max class (`top_k_classes` must be 1).

Strategies
----------
- `isal`: R = `config.influence.reference` ("val" by default: the validation split held out of the
  initial set, `--val_size N`; "initial", "labeled" or "test" can be chosen).
- `isal_v2`: R = the initial labelled set (its training part, without the validation split: the
  labelled set of cycle 0), whatever `config.influence.reference` says.
- `isal_v3`: R = the current training labelled set (the data the model was trained on, so the
  reference loss is a training loss).
  In cycle 0 the labelled set IS the initial set, so isal_v2 and isal_v3 coincide until cycle 1.
- `grad_sim`: H = I, i.e. `s = v` and the score `grad L(R) . G_z` (the paper's Table 2 baseline); R as
  for `isal`.
Reference "test" is what ISAL's released code does; it uses the TEST LABELS to choose the training
data, so test accuracy is no longer an unbiased estimate: a UserWarning says so whenever it is used.

Diagnostics (the cycle record's "strategy_info")
------------------------------------------------
`cosine_s_test_v` (cosine between s_test and v; 1 means ISAL ranks exactly like grad_sim),
`spearman_vs_grad_sim` (Spearman rank correlation of the scores with grad_sim's on the same pool,
one more jvp pass with s = v; None if either is constant), `solver`, `reference`, the norms of v and
s_test and the solver's own numbers (LiSSA's `lissa_final_norm`, the mean over chains of
||h_depth||, and `lissa_max_norm`; CG's iterations and residual). With ISAL's defaults the LiSSA
fixed point is `(H + 100 I)^-1 v`, near `v / 100` unless H has eigenvalues of order 100, so expect
`cosine_s_test_v` near 1 and ISAL to rank close to grad_sim (the LiSSA derivation in `jaxal.influence`).
A diverging LiSSA raises `jaxal.influence.LissaDivergenceError` with a suggested scale.

Compilation
-----------
Every program is compiled once per (model, settings, shapes), never because a cycle brings new
weights: the mean gradient (`jaxal.influence.reference_gradient`), the pool scores (`_pool_scores`,
under `map_chunks`) and the solver (`jaxal.influence.inverse_hvp`, the entry point the diagnostics
share) take the trained variables as TRACED arguments and build the loss (`LabeledLoss`, a hashable
setting), its restriction to the parameter subset and the inference-mode BatchNorm inside the
trace. The labelled set, which grows every cycle, enters the solver padded to the largest training
set of the run (`labeled_bucket`, `jaxal.config.max_labeled`; beyond it, the next power of two) with
weights 0 on the padding and `weighted_mean_loss`; the solvers run over the real rows only
(`num_examples`, traced: LiSSA draws its minibatches among them, so with the same rng it makes the same
draws as on the unpadded set, and the chunked products stop at the last real chunk), so the padding
costs memory for the inputs only. A run compiles the solver once.

Precision: `v`, the solve and the pool's jvps run at `--precision.solvers` ("highest"), see
`jaxal.precision`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxal import influence, parallel
from jaxal import precision as precision_lib
from jaxal.config import Config, max_labeled
from jaxal.models import inference_apply
from jaxal.pytree import partition, restrict, subset_mask, tree_dot, tree_norm, tree_size
from jaxal.strategies.base import ALL_TASKS, Scores, StrategyContext, register_scorer

REFERENCES = ("val", "initial", "labeled", "test")
VAL_NEEDED = ("needs a validation split: pass --val_size N (held out of the initial set) or "
              "--influence.reference labeled")
TEST_REFERENCE_WARNING = ("influence reference set 'test' (as in ISAL's released code) selects training data "
                          "with the TEST LABELS: test accuracy is then no longer an unbiased estimate; use "
                          "'val', 'initial' or 'labeled' for an honest evaluation")


# ----------------------------------------------------------------------------- losses


def top_k_expected_cross_entropy(logits: jax.Array, k: int) -> jax.Array:
    """`sum_{j in top-k} q_j CE(logits, j)` for ONE example, `q` the softmax probabilities of the k most
    probable classes renormalised to sum to 1 and detached. Its gradient is G_z of ISAL's
    expected-gradient variant; k = 1 equals `influence.pseudo_label_cross_entropy`."""
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits))
    top, classes = jax.lax.top_k(probs, k)
    weights = top / jnp.sum(top)
    return jax.nn.logsumexp(logits) - jnp.sum(weights * jnp.take(logits, classes))


def labeled_example_loss(apply_fn: Callable, task=None) -> Callable:
    """`example_loss_fn(params, (x, y))`: the task's supervised loss of one example (CE at the true label;
    a segmentation's averaged over its labelled pixels). None: classification."""
    if task is None:
        return influence.cross_entropy_example_loss(apply_fn)

    def loss(params, example):
        x, y = example
        return task.supervised_loss(apply_fn(params, x[None]).logits[0], y)

    return loss


def unlabeled_example_loss(apply_fn: Callable, top_k_classes: int = 1, task=None) -> Callable:
    """`example_loss_fn(params, x)` whose gradient is G_z: CE at the arg-max class (k = 1; the task's
    pseudo-label loss, for segmentation the mean over pixels of CE at each pixel's arg-max) or the
    top-k expected CE (k > 1, classification only)."""
    if top_k_classes == 1:
        if task is None:
            return influence.cross_entropy_example_loss(apply_fn, pseudo_label=True)
        return lambda params, x: task.pseudo_label_loss(apply_fn(params, x[None]).logits[0])

    def loss(params, x):
        return top_k_expected_cross_entropy(apply_fn(params, x[None]).logits[0], top_k_classes)

    return loss


# ----------------------------------------------------------------------------- checks


def _check_common(config: Config) -> None:
    opts = config.influence
    if config.task == "segmentation" and opts.top_k_classes != 1:
        raise ValueError("--influence.top_k_classes > 1 (the expected gradient over the top classes) is for "
                         "classification; segmentation uses each pixel's arg-max class (1)")
    influence.check_solver_options(opts, "--influence.")
    if opts.top_k_classes < 1:
        raise ValueError(f"--influence.top_k_classes must be at least 1, got {opts.top_k_classes}")
    precision_lib.check(config.precision.solvers, "--precision.solvers")


def _check_reference(config: Config, reference: str) -> None:
    if reference not in REFERENCES:
        raise ValueError(f"unknown influence reference set {reference!r}; choose one of: {', '.join(REFERENCES)}")
    if reference == "val" and config.val_size == 0:
        raise ValueError(f"influence reference 'val' {VAL_NEEDED}")


def check_configured_reference(config: Config) -> None:
    _check_common(config)
    _check_reference(config, config.influence.reference)


def check_fixed_reference(config: Config) -> None:
    _check_common(config)


def check_model(config: Config, variables) -> None:
    """Before the run: `--influence.solver exact` must fit this model's parameter subset."""
    if config.influence.solver == "exact":
        params = variables["params"]
        check_exact_fits(config, partition(params, subset_mask(params, config.influence.params))[0])


# ----------------------------------------------------------------------------- scoring


def spearman(a, b) -> Optional[float]:
    """Spearman rank correlation (ties averaged), or None where undefined (a constant input)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    value = float(stats.spearmanr(a, b).statistic)
    return value if math.isfinite(value) else None


def _float(x) -> Optional[float]:
    value = float(x)
    return value if math.isfinite(value) else None


def _reference_set(ctx: StrategyContext, reference: str):
    if reference not in REFERENCES:
        raise ValueError(f"unknown influence reference set {reference!r}; choose one of: {', '.join(REFERENCES)}")
    if reference == "test":
        warnings.warn(TEST_REFERENCE_WARNING, UserWarning, stacklevel=3)
    if reference not in ctx.reference_sets:
        if reference == "val":
            raise ValueError(f"influence reference 'val' {VAL_NEEDED}")
        raise ValueError(f"reference set {reference!r} is not available this cycle "
                         f"(have: {', '.join(sorted(ctx.reference_sets))})")
    return ctx.reference_sets[reference]


# ----------------------------------------------------------------------------- compiled once per settings
# The losses are hashable settings of the compiled programs (NamedTuples of the model and the task) and
# receive the trained variables as traced arguments: a new cycle's weights compile nothing.


class LabeledLoss(NamedTuple):
    """`example_loss(variables, (x, y))` of `jaxal.influence.inverse_hvp`: the task's supervised loss of one
    labelled example under the model in inference mode (BatchNorm running averages, no dropout)."""

    model: object
    task: object

    def __call__(self, variables, example):
        apply = inference_apply(self.model, variables.get("batch_stats", {}))
        return labeled_example_loss(apply, self.task)(variables["params"], example)


def _pool_scores(static, consts, xs):
    """`s . G_z` for every pool point of the chunk: one jvp (`map_chunks`)."""
    model, task, subset, top_k_classes, precision = static
    variables, s = consts
    with precision_lib.scope(precision):
        apply = inference_apply(model, variables.get("batch_stats", {}))
        loss, selected = restrict(unlabeled_example_loss(apply, top_k_classes, task), variables["params"], subset)
        return influence.jvp_scores(loss, selected, s, xs)


def labeled_bucket(n: int, config: Config) -> int:
    """The padded size of a labelled set of n examples: the largest training set of the run
    (`config.max_labeled`), so the solver compiles once per run (beyond it, the next power of two).
    Padding costs only memory: every solver runs over the real rows only (`num_examples`)."""
    return parallel.bucket(n, max_labeled(config))


def hessian_l2(config: Config) -> float:
    """The weight-decay term of H: `weight_decay` with `--influence.hessian_weight_decay`, else 0."""
    return float(config.weight_decay) if config.influence.hessian_weight_decay else 0.0


def check_exact_fits(config: Config, subset_params, flag: str = "--influence.exact_max_gib") -> None:
    """ValueError (with what to use instead) if `--influence.solver exact` on these parameters (arrays or
    shapes) would allocate more than the limit."""
    opts = config.influence
    try:
        influence.check_exact_memory(subset_params, max_bytes=int(opts.exact_max_gib * 2**30),
                                     block_size=opts.exact_block_size, flag=flag)
    except ValueError as error:
        raise ValueError(f"--influence.solver exact with --influence.params {opts.params}: {error}") from None


def influence_selection_scores(ctx: StrategyContext, reference: str, *, hessian: bool = True):
    """`(scores, info)`: `scores = -I(z, R) = s . G_z` for every pool point (highest = most negative
    influence = selected), with `s = s_test` (`hessian=True`, ISAL) or `s = v` (`hessian=False`,
    grad_sim); `info` holds JSON-able diagnostics (see the module docstring)."""
    config = ctx.config
    opts = config.influence
    _check_common(config)
    ref_x, ref_y = _reference_set(ctx, reference)
    if opts.top_k_classes >= ctx.num_classes:
        raise ValueError(f"--influence.top_k_classes ({opts.top_k_classes}) must be below the number of classes "
                         f"({ctx.num_classes}): the expected gradient over all classes is identically zero")
    variables = {"params": ctx.variables["params"], "batch_stats": ctx.variables.get("batch_stats", {})}
    subset = influence.select(variables["params"], opts.params)
    mesh = ctx.mesh

    solver_precision = config.precision.solvers
    loss = LabeledLoss(ctx.model, ctx.task)
    v = influence.reference_gradient(loss, variables, (ref_x, ref_y), subset=opts.params, chunk_size=opts.chunk_size,
                                     mesh=mesh, precision=solver_precision)
    with precision_lib.scope(solver_precision):  # outside the jitted solvers: set it here too
        v_norm = tree_norm(v)
    info = {"solver": opts.solver if hessian else "identity", "reference": reference,
            "reference_size": int(ref_y.shape[0]), "num_params": int(tree_size(subset)),
            "top_k_classes": int(opts.top_k_classes), "v_norm": _float(v_norm)}
    pool_static = (ctx.model, ctx.task, opts.params, opts.top_k_classes, solver_precision)
    grad_sim = parallel.map_chunks(_pool_scores, pool_static, (variables, v), ctx.pool_x,
                                   chunk_size=opts.chunk_size, mesh=mesh)
    if not hessian:
        info.update(cosine_s_test_v=1.0, spearman_vs_grad_sim=1.0)
        return grad_sim, info

    if opts.solver == "exact":
        check_exact_fits(config, subset)
    s_test, solver_info = influence.inverse_hvp(
        loss, variables, (ctx.labeled_x, ctx.labeled_y), v, options=opts, rng=ctx.rng, l2=hessian_l2(config),
        capacity=labeled_bucket(int(ctx.labeled_y.shape[0]), config), mesh=mesh, precision=solver_precision)
    info.update({k: _float(x) if isinstance(x, float) else x for k, x in solver_info.items()})
    scores = parallel.map_chunks(_pool_scores, pool_static, (variables, s_test), ctx.pool_x,
                                 chunk_size=opts.chunk_size, mesh=mesh)
    with precision_lib.scope(solver_precision):
        s_norm = tree_norm(s_test)
        cosine = jnp.clip(tree_dot(s_test, v) / (s_norm * v_norm), -1.0, 1.0)  # float32 rounding can pass 1
    info.update(cosine_s_test_v=_float(cosine), s_test_norm=_float(s_norm),
                spearman_vs_grad_sim=spearman(scores, grad_sim))
    return scores, info


@register_scorer("isal", check=check_configured_reference, check_model=check_model, tasks=ALL_TASKS)
def isal_scores(ctx: StrategyContext):
    """ISAL: most negative influence -grad L(R)^T H^-1 G_z on the reference set --influence.reference."""
    return Scores(*influence_selection_scores(ctx, ctx.config.influence.reference))


@register_scorer("isal_v2", check=check_fixed_reference, check_model=check_model, tasks=ALL_TASKS)
def isal_v2_scores(ctx: StrategyContext):
    """ISAL with the initial (cycle-0) training labelled set as reference set."""
    return Scores(*influence_selection_scores(ctx, "initial"))


@register_scorer("isal_v3", check=check_fixed_reference, check_model=check_model, tasks=ALL_TASKS)
def isal_v3_scores(ctx: StrategyContext):
    """ISAL with the current training labelled set as reference set."""
    return Scores(*influence_selection_scores(ctx, "labeled"))


@register_scorer("grad_sim", check=check_configured_reference, tasks=ALL_TASKS)
def grad_sim_scores(ctx: StrategyContext):
    """Gradient similarity grad L(R) . G_z (ISAL with H = I) on the reference set --influence.reference."""
    return Scores(*influence_selection_scores(ctx, ctx.config.influence.reference, hessian=False))
