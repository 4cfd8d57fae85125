"""The influence engine: Hessian-vector products, inverse-HVP solvers, and influence scores.

Conventions
-----------
- `loss_fn(params, batch) -> scalar` is the MEAN loss over a batch, a pytree of arrays with a
  leading example axis such as `(xs, ys)`. The Hessian `H` below is always the Hessian of this mean
  (plus whatever regulariser `loss_fn` itself adds) with respect to `params`.
- `example_loss_fn(params, example) -> scalar` is the loss of ONE example (no batch axis). It is what
  per-example quantities (influence scores, masked mean gradients) vmap over. `mean_loss` turns it
  into a `loss_fn`.
- `params` is any pytree, usually a subset chosen with `jaxal.pytree.restrict` (ISAL uses
  "weights", every tensor of rank > 1). Vectors `v`, `s` are pytrees of the same structure.
- Functions that take a loss function jit it as a *static* argument, so the compiled program is
  cached per loss-function object and per shape: build the loss once and reuse it (a new lambda per
  call compiles again, and the closure's arrays become constants of the program).
  A caller whose loss closes over arrays that change (trained weights, BatchNorm statistics) should
  instead build the loss INSIDE its own jitted function, from traced arguments, and call the
  un-jitted bodies there: `solve_traced`, `jvp_scores`, `weighted_gradient` (with
  `jaxal.parallel.map_chunks`/`sum_chunks`), then `check_lissa`/`check_cg` on the host. The program
  is then compiled once per settings and shapes, whatever the weights (`jaxal.strategies.isal`).
- A padded batch (fixed size, so one program serves a growing labelled set) is `(batch, weights)`
  with `weighted_mean_loss`: weights 1 for the real examples, 0 for the padding. `lissa` draws its
  minibatches among the first `num_examples` rows only.

Influence sign convention (Koh & Liang 2017)
--------------------------------------------
With `theta*` the minimiser of the mean training loss over n points and `H` its Hessian there,
up-weighting a training point z by eps moves the loss on a set R by

    dL(R)/d eps = -grad L(R)^T H^-1 grad L(z) =: I(z, R).

- Adding z to the training set (eps ~ +1/n): the change of L(R) is about `I(z, R) / n`. ISAL selects
  the MOST NEGATIVE `I(z, R)` (the points whose addition lowers the reference loss most), with
  `grad L(z)` taken at the pseudo-label (arg-max class) because z is unlabelled.
- Removing z (eps = -1/n): the change of L(R) is about `-I(z, R) / n = +grad L(R)^T H^-1 grad L(z) / n`.

In code: `s = solve(..., v=mean_gradient(example_loss_fn, params, R))` is `s_test = H^-1 grad L(R)`,
and `influence_scores(example_loss_fn, params, pool, s)` returns `s . grad L(z_i)` for every z_i, so
`I(z_i, R) = -influence_scores(...)`. `tests/test_influence_loo.py` checks both signs against exact
leave-one-out / add-one retraining.

Damping conventions
-------------------
- `lissa(damping=d, scale=s)` solves `(H + d*s*I) x = v` (relative damping, the convention of
  Koh & Liang's and ISAL's code); with ISAL's defaults d=0.01, s=1e4 that is `(H + 100 I)^-1 v`.
- `cg(damping=mu)` and `exact_inverse_hvp(damping=mu)` solve `(H + mu*I) x = v` (absolute shift);
  the LiSSA system above is `mu = d*s`. `solve(method, ...)` takes LiSSA's (damping, scale) for every
  method and passes `mu = damping*scale` to cg/exact, so all three methods target the same system.

LiSSA, derived
--------------
The recursion `h_0 = v`, `h_{t+1} = v + (1 - d) h_t - H_t h_t / s` (H_t: Hessian of the loss on a
fresh minibatch) has, with E[H_t] = H, the fixed point `h* = v + (1 - d) h* - H h* / s`, i.e.
`(H + d s I) h* / s = v`, so the result `h_T / s -> (H + d s I)^-1 v`. The error obeys
`h_T - h* = A^(T+1) (h_0 - h*)`-style contraction with `A = (1 - d) I - H/s`: along a Hessian
eigenvector with eigenvalue lambda the factor per step is `1 - d - lambda/s`. It converges iff
`-d*s < lambda < (2 - d)*s` for every eigenvalue of every minibatch Hessian; `scale > lambda_max`
is the safe (non-oscillating) choice. After T steps the fraction of the fixed point reached along
lambda is `1 - (1 - d - lambda/s)^(T+1)`: with ISAL's defaults (T=250, d=0.01) the flat directions
reach `1 - 0.99^251 = 92%` of `v/100`, and directions with lambda >> 100 are shrunk by
`100/(lambda + 100)`. The *fixed point itself* is close to `v/100` unless the Hessian has
eigenvalues of order 100 or more, so ISAL under its defaults ranks much like the plain gradient
similarity `grad L(R) . grad L(z)`; `LissaResult.cosine_to_v` reports how close `s_test` is to v.
With a PSD minibatch Hessian below the scale, `||h_t|| <= ||v|| sum_{k<=t} (1-d)^k`; `lissa` raises
`LissaDivergenceError` when the norm is non-finite or exceeds `divergence_factor` times that bound.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.flatten_util import ravel_pytree

from jaxal import parallel
from jaxal.losses import cross_entropy, pseudo_label_cross_entropy  # noqa: F401  (the engine's losses)
from jaxal.pytree import tree_add_scaled, tree_dot, tree_norm, tree_scale, tree_size

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

SOLVERS = ("lissa", "cg", "exact")
MAX_EXACT_PARAMS = 5000  # a dense Hessian of 5000^2 float64 entries is 200 MB


# ----------------------------------------------------------------------------- losses


def example_loss(apply_fn: Callable, *, pseudo_label: bool = False) -> Callable:
    """A per-example loss from `apply_fn(params, xs) -> ModelOutput` (see
    `jaxal.models.inference_apply`). With `pseudo_label=False` an example is `(x, y)` and the loss is
    CE at the true label; with `pseudo_label=True` an example is `x` alone and the loss is CE at the
    arg-max class. Build it once and reuse it: it is a static argument of the jitted engines."""

    def true_label_loss(params, example):
        x, y = example
        return cross_entropy(apply_fn(params, x[None]).logits[0], y)

    def pseudo_label_loss(params, x):
        return pseudo_label_cross_entropy(apply_fn(params, x[None]).logits[0])

    return pseudo_label_loss if pseudo_label else true_label_loss


def mean_loss(example_loss_fn: Callable) -> LossFn:
    """`loss_fn(params, batch)`: the mean of `example_loss_fn` over the batch's leading axis."""

    def loss_fn(params, batch):
        return jnp.mean(jax.vmap(example_loss_fn, (None, 0))(params, batch))

    return loss_fn


def weighted_mean_loss(example_loss_fn: Callable) -> LossFn:
    """`loss_fn(params, (batch, weights))`: `sum_i w_i l_i / sum_i w_i`. With weights 1 for the real
    examples and 0 for padding it is the mean over the real examples of a padded batch (and exactly
    `mean_loss` on a minibatch drawn among the real rows)."""

    def loss_fn(params, weighted):
        batch, weights = weighted
        losses = jax.vmap(example_loss_fn, (None, 0))(params, batch)
        weights = weights.astype(losses.dtype)
        return jnp.sum(weights * losses) / jnp.sum(weights)

    return loss_fn


# ----------------------------------------------------------------------------- HVP and friends


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """Exact Hessian-vector product `H v` of `loss_fn(., batch)` at `params`, forward-over-reverse."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))[1]


# XLA:CPU runs a convolution on its fast (Eigen) path only if its dimension numbers are NHWC/HWIO/NHWC,
# and the pass that rewrites the others into that form (xla/service/cpu/conv_canonicalization.cc) visits
# only the entry computation. The backward pass of a convolution (input and weight gradients) has
# non-canonical dimension numbers, so an HVP inside a `lax.scan`/`while_loop` body falls back to naive
# loops: 3-6x slower than the same HVP called on its own. `_canonical_convs` does that rewrite at the
# jaxpr level (explicit transposes around a canonical convolution), so the loop bodies of `lissa`,
# `power_iteration` and `cg` run at the speed of a standalone HVP. Other backends get `fn` unchanged.


def _is_canonical_conv(params) -> bool:
    dn = params["dimension_numbers"]
    nd = len(dn.lhs_spec)
    spatial = tuple(range(1, nd - 1))
    return (tuple(dn.lhs_spec) == (0, nd - 1, *spatial) and tuple(dn.out_spec) == (0, nd - 1, *spatial)
            and tuple(dn.rhs_spec) == (nd - 1, nd - 2, *range(nd - 2)))


def _canonical_conv(lhs, rhs, params):
    dn = params["dimension_numbers"]
    nd = len(dn.lhs_spec)
    spatial = tuple(range(1, nd - 1))
    lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])  # -> batch, spatial..., feature
    rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])  # -> spatial..., in, out
    out_perm = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
    canonical = lax.ConvDimensionNumbers((0, nd - 1, *spatial), (nd - 1, nd - 2, *range(nd - 2)),
                                         (0, nd - 1, *spatial))
    out = lax.conv_general_dilated_p.bind(jnp.transpose(lhs, lhs_perm), jnp.transpose(rhs, rhs_perm),
                                          **{**params, "dimension_numbers": canonical})
    return jnp.transpose(out, np.argsort(out_perm))


def _eval_canonical(jaxpr, consts, *args):
    """`jax.core.eval_jaxpr` with non-canonical convolutions rewritten; nested jit calls are inlined,
    other higher-order primitives are bound unchanged."""
    env = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p and not _is_canonical_conv(eqn.params):
            outvals = [_canonical_conv(*invals, eqn.params)]
        elif eqn.primitive.name in ("pjit", "jit") and "jaxpr" in eqn.params:
            closed = eqn.params["jaxpr"]
            outvals = _eval_canonical(closed.jaxpr, closed.consts, *invals)
        else:
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        env.update(zip(eqn.outvars, outvals))
    return [read(v) for v in jaxpr.outvars]


def _canonical_convs(fn: Callable) -> Callable:
    """`fn` with its convolutions in NHWC/HWIO form (see above); for use inside loop bodies on CPU."""
    if jax.default_backend() != "cpu":
        return fn

    def wrapped(*args):
        flat, treedef = jax.tree.flatten(args)
        try:
            closed, out_shape = jax.make_jaxpr(lambda *f: fn(*treedef.unflatten(f)), return_shape=True)(*flat)
            out = _eval_canonical(closed.jaxpr, closed.consts, *flat)
        except Exception as error:  # an internal API changed: correct but slow beats failing
            warnings.warn(f"convolution canonicalisation failed ({error!r}); using the plain HVP", RuntimeWarning)
            return fn(*args)
        return jax.tree.structure(out_shape).unflatten(out)

    return wrapped


def _loop_hvp(loss_fn: LossFn) -> Callable:
    """`(params, batch, v) -> H v` for use inside `lax` loops."""
    return _canonical_convs(lambda params, batch, v: hvp(loss_fn, params, batch, v))


def _normal_like(rng: jax.Array, tree: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(rng, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@functools.partial(jax.jit, static_argnames=("loss_fn", "iters"))
def _power_iteration(loss_fn, params, batch, rng, iters):
    v = _normal_like(rng, params)
    v = tree_scale(v, 1.0 / tree_norm(v))
    dtype = jax.tree.leaves(params)[0].dtype
    loop_hvp = _loop_hvp(loss_fn)

    def body(_, carry):
        v, _ = carry
        hv = loop_hvp(params, batch, v)
        eigenvalue = tree_dot(v, hv)  # Rayleigh quotient, ||v|| = 1
        norm = tree_norm(hv)
        v = tree_scale(hv, 1.0 / jnp.where(norm > 0, norm, 1.0))
        return v, eigenvalue.astype(dtype)

    return lax.fori_loop(0, iters, body, (v, jnp.zeros((), dtype)))[1]


def power_iteration(loss_fn: LossFn, params: PyTree, batch: PyTree, *, rng: jax.Array,
                    iters: int = 50) -> jax.Array:
    """Estimate of the largest-MAGNITUDE eigenvalue of the Hessian of `loss_fn(., batch)` (signed:
    the Rayleigh quotient of the last iterate). One jitted `fori_loop` of `iters` HVPs."""
    return _power_iteration(loss_fn, params, batch, rng, iters)


def dense_hessian(loss_fn: LossFn, params: PyTree, batch: PyTree) -> jax.Array:
    """The (P, P) Hessian on the flattened parameters (`jax.flatten_util.ravel_pytree` order),
    for P <= MAX_EXACT_PARAMS."""
    size = tree_size(params)
    if size > MAX_EXACT_PARAMS:
        raise ValueError(f"the dense Hessian needs P <= {MAX_EXACT_PARAMS} parameters (P^2 entries), got "
                         f"P = {size}; use cg or lissa, or a smaller subset (jaxal.pytree.restrict)")
    return _dense_hessian(loss_fn, params, batch)


def _dense_hessian_body(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)
    return 0.5 * (hessian + hessian.T)


_dense_hessian = jax.jit(_dense_hessian_body, static_argnames=("loss_fn",))


def _exact_body(loss_fn, params, batch, v, damping):
    flat_v, unravel = ravel_pytree(v)
    hessian = _dense_hessian_body(loss_fn, params, batch)
    shifted = hessian + damping * jnp.eye(flat_v.shape[0], dtype=hessian.dtype)
    return unravel(jnp.linalg.solve(shifted, flat_v))


_exact_inverse_hvp = jax.jit(_exact_body, static_argnames=("loss_fn",))


def check_exact_size(params: PyTree) -> None:
    """ValueError if `params` is too large for a dense Hessian (above MAX_EXACT_PARAMS)."""
    size = tree_size(params)
    if size > MAX_EXACT_PARAMS:
        raise ValueError(f"exact_inverse_hvp builds a dense P x P Hessian and is limited to P <= "
                         f"{MAX_EXACT_PARAMS} parameters, got P = {size}; use cg or lissa instead")


def exact_inverse_hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree, *,
                      damping: float = 0.0) -> PyTree:
    """`(H + damping*I)^-1 v` by a dense solve of the full Hessian on `batch` (absolute damping).
    Only for small problems: raises ValueError above MAX_EXACT_PARAMS parameters."""
    check_exact_size(params)
    return _exact_inverse_hvp(loss_fn, params, batch, v, damping)


# ----------------------------------------------------------------------------- conjugate gradients


class CGResult(NamedTuple):
    solution: PyTree
    residual_norm: jax.Array  # ||v - (H + damping I) x|| (the recursively updated residual)
    iterations: jax.Array
    converged: jax.Array  # residual_norm <= tol * ||v||
    min_curvature: jax.Array  # min over search directions of p^T (H + damping I) p / ||p||^2


def _cg_body(loss_fn, params, batch, v, damping, tol, maxiter, mesh=None):
    loop_hvp = _loop_hvp(loss_fn)
    batch = parallel.constrain_batch(batch, mesh)
    matvec = lambda x: tree_add_scaled(loop_hvp(params, batch, x), x, damping)
    dtype = jax.tree.leaves(v)[0].dtype
    target = tol * tree_norm(v)
    x = jax.tree.map(jnp.zeros_like, v)
    rs = tree_dot(v, v).astype(dtype)
    init = (x, v, v, rs, jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, dtype))

    def cond(carry):
        _, _, _, rs, i, min_curv = carry
        return (jnp.sqrt(rs) > target) & (i < maxiter) & (min_curv > 0)

    def body(carry):
        x, r, p, rs, i, min_curv = carry
        ap = matvec(p)
        pap = tree_dot(p, ap).astype(dtype)
        curvature = pap / tree_dot(p, p).astype(dtype)
        alpha = rs / pap
        x = tree_add_scaled(x, p, alpha)
        r = tree_add_scaled(r, ap, -alpha)
        rs_new = tree_dot(r, r).astype(dtype)
        p = tree_add_scaled(r, p, rs_new / rs)
        return x, r, p, rs_new, i + 1, jnp.minimum(min_curv, curvature)

    x, _, _, rs, i, min_curv = lax.while_loop(cond, body, init)
    residual = jnp.sqrt(rs)
    return CGResult(x, residual, i, residual <= target, min_curv)


_cg = jax.jit(_cg_body, static_argnames=("loss_fn", "maxiter", "mesh"))


def check_cg(result: CGResult, damping: float, *, stacklevel: int = 2) -> None:
    """The host checks of `cg` on a `CGResult`: ValueError on non-positive curvature, a RuntimeWarning
    if `tol` was not reached."""
    if not float(result.min_curvature) > 0:
        raise ValueError(f"cg: H + damping*I is not positive definite (found curvature "
                         f"{float(result.min_curvature):.3g} <= 0 along a search direction); "
                         f"increase damping (now {damping})")
    if not bool(result.converged):
        warnings.warn(f"cg stopped after {int(result.iterations)} iterations with residual "
                      f"{float(result.residual_norm):.3g} > tol*||v||; raise maxiter or damping",
                      RuntimeWarning, stacklevel=stacklevel + 1)


def cg(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree, *, damping: float = 0.0,
       maxiter: int = 100, tol: float = 1e-6, return_diagnostics: bool = False, mesh=None):
    """`(H + damping*I)^-1 v` by conjugate gradients on the full-batch Hessian of `batch` (damping is
    the ABSOLUTE shift; LiSSA's `(damping, scale)` corresponds to `damping*scale` here). One jitted
    `lax.while_loop`, one HVP per iteration, stopping at `||r|| <= tol*||v||` or `maxiter`.

    CG needs `H + damping*I` positive definite. The Hessian of a trained non-convex network is
    usually indefinite, so pick a damping above minus its most negative eigenvalue; if a search
    direction with non-positive curvature is met the iteration stops and this raises ValueError.
    Not reaching `tol` within `maxiter` only warns. `return_diagnostics=True` returns a `CGResult`.
    """
    placed = parallel.replicate((params, batch, v), mesh)
    result = _cg(loss_fn, *placed, damping, tol, maxiter, mesh)  # the batch split over `mesh`, if any
    result = result if mesh is None else parallel.local(result)
    check_cg(result, damping, stacklevel=2)
    return result if return_diagnostics else result.solution


# ----------------------------------------------------------------------------- LiSSA


class LissaDivergenceError(RuntimeError):
    """The LiSSA recursion diverged: `scale` is not above the largest Hessian eigenvalue (or
    `damping*scale` not above minus the most negative one)."""


class LissaResult(NamedTuple):
    inverse_hvp: PyTree  # mean over chains of h_T / scale, the estimate of (H + damping*scale*I)^-1 v
    norms: jax.Array  # (repeats, depth + 1): ||h_t|| per chain for t = 0..depth (h_0 = v)
    cosine_to_v: jax.Array  # cosine between the estimate and v (near 1: the solve is close to a multiple of v)


def _lissa_chains(loss_fn, params, data, v, rng, damping, scale, *, depth, repeats, batch_size,
                  parallel_chains, mesh=None, num_examples=None):
    # `num_examples` (traced): draw among the first rows only, the rest of `data` being padding.
    n = jax.tree.leaves(data)[0].shape[0] if num_examples is None else num_examples
    loop_hvp = _loop_hvp(loss_fn)

    def step(h, key):
        if batch_size is None:
            batch = data
        else:  # a fresh minibatch, indices drawn uniformly with replacement among the real rows
            idx = jax.random.randint(key, (batch_size,), 0, n)
            batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        hv = loop_hvp(params, parallel.constrain_batch(batch, mesh), h)
        h = jax.tree.map(lambda v_, h_, hv_: v_ + (1 - damping) * h_ - hv_ / scale, v, h, hv)
        return h, tree_norm(h)

    def chain(key):
        h, norms = lax.scan(step, v, jax.random.split(key, depth))
        return h, jnp.concatenate([tree_norm(v)[None].astype(norms.dtype), norms])

    keys = jax.random.split(rng, repeats)
    if parallel_chains:
        hs, norms = jax.vmap(chain)(keys)
        total = jax.tree.map(lambda x: jnp.sum(x, axis=0), hs)
    else:  # sequential chains: memory of one chain, a running sum of the results
        def run(total, key):
            h, norms = chain(key)
            return jax.tree.map(jnp.add, total, h), norms

        total, norms = lax.scan(run, jax.tree.map(jnp.zeros_like, v), keys)
    estimate = tree_scale(total, 1.0 / (repeats * scale))
    cosine = tree_dot(estimate, v) / (tree_norm(estimate) * tree_norm(v))
    return LissaResult(estimate, norms, cosine)


_lissa_jit = jax.jit(_lissa_chains,
                     static_argnames=("loss_fn", "depth", "repeats", "batch_size", "parallel_chains", "mesh"))


def _divergence_bound(v_norm: float, damping: float, depth: int) -> np.ndarray:
    """`||v|| sum_{k<=t} (1 - d)^k`, the largest ||h_t|| of a recursion with PSD minibatch Hessians
    below the scale."""
    t = np.arange(depth + 1, dtype=np.float64)
    if damping > 0:
        return v_norm * (1.0 - (1.0 - damping) ** (t + 1)) / damping
    return v_norm * (t + 1)


def _divergence_message(loss_fn, params, data, rng, damping, scale, batch_size, norms, bound,
                        num_examples=None) -> str:
    finite = np.isfinite(norms)
    if not finite.all():
        step = int(np.argmin(finite.all(axis=0)))
        what = f"||h_t|| became non-finite at step {step}"
    else:
        ratio = norms / np.maximum(bound, np.finfo(np.float64).tiny)
        step = int(np.argmax(ratio.max(axis=0)))
        what = (f"||h_t|| grew from {norms[0, 0]:.3g} to {norms.max():.3g}, {ratio.max():.3g} times the "
                f"bound of a convergent recursion (reached at step {step})")
    n = jax.tree.leaves(data)[0].shape[0] if num_examples is None else int(num_examples)
    k_full, k_mini = jax.random.split(jax.random.fold_in(rng, 1))
    m = min(n, 256)
    subset = jax.tree.map(lambda a: a[:m], data)
    lam_full = float(power_iteration(loss_fn, params, subset, rng=k_full, iters=30))
    lam_mini = lam_full
    if batch_size is not None and batch_size < m:
        lams = [float(power_iteration(loss_fn, params, jax.tree.map(lambda a: a[i * batch_size:(i + 1) * batch_size], subset),
                                      rng=jax.random.fold_in(k_mini, i), iters=30))
                for i in range(min(8, m // batch_size))]
        lam_mini = max(lams, key=abs)
    estimate = max(abs(lam_full), abs(lam_mini))
    return (f"LiSSA diverged: {what}, with scale={scale:g}, damping={damping:g}. The recursion "
            f"converges only if scale exceeds the largest eigenvalue of every minibatch Hessian (and "
            f"damping*scale exceeds minus the most negative one). power_iteration estimates the largest-"
            f"magnitude eigenvalue at {lam_full:.4g} on {m} labelled examples and {lam_mini:.4g} on "
            f"minibatches of {batch_size}; try scale >= {2 * estimate:.3g} (2x the estimate).")


def lissa(loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *, rng: jax.Array,
          depth: int = 250, repeats: int = 4, damping: float = 0.01, scale: float = 1e4,
          batch_size: int | None = 1, parallel_chains: bool = False, check: bool = True,
          divergence_factor: float = 10.0, return_diagnostics: bool = False, mesh=None,
          num_examples: int | jax.Array | None = None):
    """LiSSA estimate of `(H + damping*scale*I)^-1 v` (Agarwal et al. 2017; Koh & Liang 2017).

    `h_0 = v`, `h_{t+1} = v + (1 - damping) h_t - H_t h_t / scale` for t < depth, where `H_t` is the
    Hessian of `loss_fn` on `batch_size` examples drawn uniformly with replacement from `data` (the
    labelled set; `batch_size=None` uses all of `data` every step, a deterministic recursion); the
    result is `h_depth / scale`, averaged over `repeats` independent chains. See the module docstring
    for the derivation: the fixed point is `(H + damping*scale*I)^-1 v` (with the defaults, ISAL's,
    `(H + 100 I)^-1 v`), reached only if `scale` exceeds the largest eigenvalue of the minibatch
    Hessians.

    All chains and steps are ONE jitted function (`lax.scan` over steps inside a `lax.scan` over
    chains, or `jax.vmap` over chains with `parallel_chains=True`), compiled once per loss function,
    shapes and static settings; `rng`, `v`, `params`, `data` values, `damping` and `scale` can change
    without recompiling. With a `mesh`, each step's minibatch (when it has more than one example and
    at least one per device) is split over the devices; everything else is replicated.

    `num_examples` (default: all rows): minibatches are drawn among the first `num_examples` rows of
    `data` only, the rest being padding. It is a traced value, so a labelled set padded to a fixed
    size compiles once for every count up to that size, and with the same `rng` the draws are those
    of the unpadded set. With `batch_size=None` every row enters each HVP: the loss itself must then
    ignore the padding (`weighted_mean_loss` with zero weights).

    With `check=True` (a host sync), raises `LissaDivergenceError` if any ||h_t|| is non-finite or
    exceeds `divergence_factor` times `||v|| sum_{k<=t} (1-damping)^k`, the bound that holds when
    every minibatch Hessian is PSD with eigenvalues below `scale`; the message gives a power-iteration
    estimate of lambda_max and a scale to try. Returns the estimate (a pytree like `v`), or a
    `LissaResult` with the per-step norms and the cosine to `v` if `return_diagnostics=True`.
    """
    if not 0 <= damping < 1:
        raise ValueError(f"lissa needs 0 <= damping < 1, got {damping}")
    placed = parallel.replicate((params, data, v, rng, num_examples), mesh)
    result = _lissa_jit(loss_fn, *placed[:4], damping, scale, depth=depth, repeats=repeats, batch_size=batch_size,
                        parallel_chains=parallel_chains, mesh=mesh, num_examples=placed[4])
    result = result if mesh is None else parallel.local(result)
    if check:
        check_lissa(result, loss_fn, params, data, rng=rng, damping=damping, scale=scale, batch_size=batch_size,
                    divergence_factor=divergence_factor, num_examples=num_examples)
    return result if return_diagnostics else result.inverse_hvp


def check_lissa(result: LissaResult, loss_fn: LossFn, params: PyTree, data: PyTree, *, rng: jax.Array,
                damping: float, scale: float, batch_size: int | None, divergence_factor: float = 10.0,
                num_examples: int | None = None) -> None:
    """The divergence check of `lissa` on a `LissaResult` (a host sync): raises
    `LissaDivergenceError` with a suggested scale. `loss_fn`, `params` and `data` serve only to
    estimate lambda_max for that message (compiled only when it is raised)."""
    norms = np.asarray(result.norms, dtype=np.float64)
    depth = norms.shape[1] - 1
    bound = _divergence_bound(float(norms[0, 0]), damping, depth)
    if not np.isfinite(norms).all() or (norms > divergence_factor * bound).any():
        raise LissaDivergenceError(_divergence_message(loss_fn, params, data, rng, damping, scale,
                                                       batch_size, norms, bound, num_examples))


# ----------------------------------------------------------------------------- dispatch


def solve(method: str, loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *,
          rng: jax.Array | None = None, damping: float = 0.01, scale: float = 1e4, depth: int = 250,
          repeats: int = 4, batch_size: int | None = 1, maxiter: int = 100, tol: float = 1e-6) -> PyTree:
    """`(H + damping*scale*I)^-1 v` by `method` in SOLVERS, all in LiSSA's damping convention:
    "lissa" samples minibatches of `data`; "cg" and "exact" use the full-batch Hessian on `data` with
    the absolute shift `damping*scale` (with ISAL's defaults, 100). `rng` is needed by "lissa" only."""
    if method == "lissa":
        if rng is None:
            raise ValueError("solve('lissa', ...) needs rng")
        return lissa(loss_fn, params, data, v, rng=rng, depth=depth, repeats=repeats, damping=damping,
                     scale=scale, batch_size=batch_size)
    if method == "cg":
        return cg(loss_fn, params, data, v, damping=damping * scale, maxiter=maxiter, tol=tol)
    if method == "exact":
        return exact_inverse_hvp(loss_fn, params, data, v, damping=damping * scale)
    raise ValueError(f"unknown influence solver {method!r}; choose one of: {', '.join(SOLVERS)}")


def solve_traced(method: str, loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *,
                 rng: jax.Array | None = None, damping=0.01, scale=1e4, depth: int = 250, repeats: int = 4,
                 batch_size: int | None = 1, maxiter: int = 100, tol=1e-6, num_examples=None,
                 parallel_chains: bool = False, mesh=None):
    """The body of `solve` for use INSIDE a caller's jitted function, whose loss may close over traced
    arrays (the trained variables): no jit of its own (it is traced into the caller's program) and no
    host checks. Returns the `LissaResult` ("lissa"), the `CGResult` ("cg") or the solution
    ("exact"); on the host, check them with `check_lissa` / `check_cg` (and `check_exact_size`
    beforehand). `damping`, `scale`, `tol` and `num_examples` may be traced; the rest is static."""
    if method == "lissa":
        return _lissa_chains(loss_fn, params, data, v, rng, damping, scale, depth=depth, repeats=repeats,
                             batch_size=batch_size, parallel_chains=parallel_chains, mesh=mesh,
                             num_examples=num_examples)
    if method == "cg":
        return _cg_body(loss_fn, params, data, v, damping * scale, tol, maxiter, mesh)
    if method == "exact":
        return _exact_body(loss_fn, params, data, v, damping * scale)
    raise ValueError(f"unknown influence solver {method!r}; choose one of: {', '.join(SOLVERS)}")


# ----------------------------------------------------------------------------- per-example products


def jvp_scores(example_loss_fn: Callable, params: PyTree, s: PyTree, xs: PyTree) -> jax.Array:
    """`s . grad example_loss_fn(params, x_i)` for every row of `xs`: ONE forward-mode product. The
    body of `influence_scores` for a caller's own (jitted, chunked) function."""
    return jax.jvp(lambda p: jax.vmap(example_loss_fn, (None, 0))(p, xs), (params,), (s,))[1]


def _jvp_scores(example_loss_fn, consts, xs):
    params, s = consts
    return jvp_scores(example_loss_fn, params, s, xs)


def influence_scores(example_loss_fn: Callable, params: PyTree, xs: PyTree, s: PyTree, *,
                     chunk_size: int | None = None, mesh=None) -> jax.Array:
    """`s . grad_params example_loss_fn(params, x_i)` for every example i of `xs`, shape (n,).

    One forward-mode product per chunk, `jvp(lambda p: vmap(example_loss_fn)(p, xs), (params,), (s,))`
    — about the cost of a forward pass and its tangent, never per-example gradients. With
    `chunk_size`, examples go through in chunks of exactly that size (the last padded), so one compiled
    function serves any pool size; with a `mesh`, each chunk is split over its devices
    (`jaxal.parallel.map_chunks`). ISAL's score is `-influence_scores(...)` with `s = s_test`.
    """
    return parallel.map_chunks(_jvp_scores, example_loss_fn, (params, s), xs, chunk_size=chunk_size, mesh=mesh)


def weighted_gradient(example_loss_fn: Callable, params: PyTree, xs: PyTree, weights: jax.Array) -> PyTree:
    """`grad sum_i w_i example_loss_fn(params, x_i)`: the body of `mean_gradient` for a caller's own
    function under `jaxal.parallel.sum_chunks` (weights 0 for padding)."""

    def total(p):
        losses = jax.vmap(example_loss_fn, (None, 0))(p, xs)
        return jnp.sum(weights.astype(losses.dtype) * losses)

    return jax.grad(total)(params)


def _weighted_gradient(example_loss_fn, params, chunk):
    xs, weights = chunk
    return weighted_gradient(example_loss_fn, params, xs, weights)


def mean_gradient(example_loss_fn: Callable, params: PyTree, data: PyTree, *,
                  chunk_size: int | None = None, mesh=None) -> PyTree:
    """`grad (1/n) sum_i example_loss_fn(params, z_i)` over `data` (e.g. `grad L(R)` of a reference
    set, ISAL's `v`), in chunks of `chunk_size` to bound memory (split over the devices of a `mesh`);
    padded examples get weight zero, so the result is the exact mean for any chunking."""
    total = parallel.sum_chunks(_weighted_gradient, example_loss_fn, params, data, chunk_size=chunk_size, mesh=mesh)
    return tree_scale(total, 1.0 / parallel.num_examples(data))
