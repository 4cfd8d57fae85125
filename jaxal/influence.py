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
  A caller whose loss depends on arrays that change (trained weights, BatchNorm statistics) uses the
  entry point instead, `inverse_hvp` (with `reference_gradient` for v): it takes the loss of one example
  as a function of the variables, `example_loss(variables, example)`, and builds the restricted loss
  INSIDE its jitted program from the traced variables, so the program is compiled once per settings
  and shapes, whatever the weights. ISAL (`jaxal.strategies.isal`) and the bound diagnostics
  (`jaxal.diagnostics`) both call it, with the one options type `jaxal.config.SolverOptions`.
- A padded batch (fixed size, so one program serves a growing labelled set) is `(batch, weights)`
  with `weighted_mean_loss`: weights 1 for the real examples, 0 for the padding. `lissa` draws its
  minibatches among the first `num_examples` rows only, and every product over a set stops at them.

Memory: every product over a set is a sum over chunks
-----------------------------------------------------
A Hessian-vector product over n examples of ResNet-18 in one batch holds n examples' activations and
their tangents (31 GB for 1900 CIFAR images). Here every product over a set -- each CG iteration, each
power iteration, each full-batch LiSSA step, every column block of the exact solver's dense Hessian, a
LiSSA minibatch larger than a chunk -- is `set_hvp`: a `lax.fori_loop` over chunks of `chunk_size` rows
(256 by default) inside the same jitted solver, accumulating `sum_chunk H_chunk v`. Its memory is that of
one chunk, whatever n (`tests/test_memory.py` reads XLA's compiled memory of each solver at 256 and 4096
labelled examples on ResNet-18), and the chunking changes no result beyond rounding. The exact solver
assembles its P x P matrix `block_size` rows at a time from these products and is refused above a byte
limit that counts what it allocates (`exact_bytes`: the matrix, its symmetrised copy and LU factors).

The Hessian of the training objective (`l2`)
--------------------------------------------
Training with weight decay wd minimises `CE + wd/2 ||theta||^2`, whose Hessian is `H_CE + wd*I`. Koh &
Liang's code differentiates that total loss (`hessian_vector_product(self.total_loss, ...)` in
influence-release); ISAL's code differentiates the cross-entropy alone (`hessian_vec_prod(loss, ...)` in
`classification/src/utils.py`). Every solver here takes `l2` (default 0, ISAL's choice) and adds `l2*v`
to each product, so `l2=weight_decay` is Koh & Liang's H. For cg/exact it equals adding `l2` to the
damping; for LiSSA it is part of the recursion's Hessian (the fixed point is `(H + l2 I + d s I)^-1 v`).

Precision: the solvers trace their products under `jaxal.precision.scope(precision)`, "highest" by
default (true float32 products on GPUs, not TF32); see `jaxal.precision`.

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
- ONE convention for users (`SolverOptions`, `--influence.*`, `--diag.*`, `solve`, `inverse_hvp`):
  LiSSA's relative damping (Koh & Liang's and ISAL's code), `(H + d*s*I) x = v` for damping d and
  scale s, whatever the solver; with ISAL's defaults d=0.01, s=1e4 that is `(H + 100 I)^-1 v`. The
  absolute term of a weight decay is `l2` (`(H + l2*I + d*s*I) x = v`).
- Inside, `cg(damping=mu)` and `exact_inverse_hvp(damping=mu)` take the absolute shift `mu = d*s`.

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

Per-tensor scales (ISAL's detection code divides each tensor's product by its own scale: 100, 8000 and
5000 for FCOS's classification, regression and centerness kernels). With D the diagonal matrix of the
scales, `h_{t+1} = v + (1 - d) h_t - D^-1 H_t h_t`; the fixed point solves `(d I + D^-1 H) h* = v`, i.e.
`h* = (H + d D)^-1 D v`, and `lissa` returns each tensor of h_T over its own scale, `D^-1 h*` in the limit
(for a single scale, `(H + d s I)^-1 v` as above). The iteration matrix `(1 - d) I - D^-1 H` is
symmetric in the inner product weighted by D, so the recursion contracts when `0 <= D^-1/2 H_t D^-1/2
<= I`, in the norm `sqrt(sum_k s_k ||h_k||^2)`: the norms `lissa` records and checks are that norm over
sqrt(max_k s_k), the plain norm for a single scale, and the bound above holds for them as it stands.
ISAL's detection code also restarts a tensor of the chain from v when its product holds a NaN
(`nan_reset`); it scores with h_T itself rather than `D^-1 h_T` (multiply each tensor of the result by
its scale to get that).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from jaxal import parallel
from jaxal import precision as precision_lib
from jaxal.config import SolverOptions
from jaxal.losses import cross_entropy, pseudo_label_cross_entropy  # noqa: F401  (the engine's losses)
from jaxal.padding import pad_rows
from jaxal.pytree import (PARAM_SUBSETS, partition, restrict, subset_mask, tree_add_scaled, tree_dot, tree_norm,
                          tree_scale, tree_size)

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

SOLVERS = ("lissa", "cg", "exact")
DEFAULT_CHUNK_SIZE = 256  # rows of a set per Hessian-vector product (memory only: never changes a result)
DEFAULT_EXACT_BLOCK_SIZE = 32  # basis vectors per pass of the dense-Hessian assembly
DEFAULT_EXACT_MAX_BYTES = 1 << 30  # what the exact solver may allocate (`exact_bytes`): 1 GiB


# ----------------------------------------------------------------------------- losses


def cross_entropy_example_loss(apply_fn: Callable, *, pseudo_label: bool = False) -> Callable:
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


@dataclasses.dataclass(frozen=True)
class MeanLoss:
    """`loss_fn(params, data)`: the mean of `example_loss_fn` over `data`'s leading axis, or with
    `weighted=True` and `data = (batch, weights)`, `sum_i w_i l_i / sum_i w_i`. The solvers recognise it
    and sum its Hessian-vector products over chunks with per-row weights (so padding and the rows
    beyond `num_examples` weigh nothing). Frozen and hashable: a static argument of the jitted solvers,
    compared by `example_loss_fn`'s identity."""

    example_loss_fn: Callable
    weighted: bool = False

    def split(self, data) -> tuple[PyTree, Optional[jax.Array]]:
        return data if self.weighted else (data, None)

    def __call__(self, params, data) -> jax.Array:
        batch, weights = self.split(data)
        losses = jax.vmap(self.example_loss_fn, (None, 0))(params, batch)
        if weights is None:
            return jnp.mean(losses)
        weights = weights.astype(losses.dtype)
        return jnp.sum(weights * losses) / jnp.sum(weights)

    def weighted_sum(self, params, weighted) -> jax.Array:
        """`sum_i w_i l_i` over a chunk `(batch, w)`: what the chunked HVP differentiates."""
        batch, weights = weighted
        losses = jax.vmap(self.example_loss_fn, (None, 0))(params, batch)
        return jnp.sum(weights.astype(losses.dtype) * losses)


def mean_loss(example_loss_fn: Callable) -> MeanLoss:
    """`loss_fn(params, batch)`: the mean of `example_loss_fn` over the batch's leading axis."""
    return MeanLoss(example_loss_fn)


def weighted_mean_loss(example_loss_fn: Callable) -> MeanLoss:
    """`loss_fn(params, (batch, weights))`: `sum_i w_i l_i / sum_i w_i`. With weights 1 for the real
    examples and 0 for padding it is the mean over the real examples of a padded batch (and exactly
    `mean_loss` on a minibatch drawn among the real rows)."""
    return MeanLoss(example_loss_fn, weighted=True)


# ----------------------------------------------------------------------------- HVP and friends


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """Exact Hessian-vector product `H v` of `loss_fn(., batch)` at `params`, forward-over-reverse, on
    the batch in ONE piece (`set_hvp` is the chunked product over a set)."""
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


# ----------------------------------------------------------------------------- HVP over a set, in chunks


def _num_rows(data: PyTree) -> int:
    leaves = jax.tree.leaves(data)
    return int(np.shape(leaves[0])[0]) if leaves else 0


def _slice_rows(tree: PyTree, start, size: int) -> PyTree:
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size), tree)


def set_hvp(loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
            num_examples=None, l2=0.0, mesh=None) -> PyTree:
    """`(H + l2*I) v` with `H` the Hessian of `loss_fn(., data)` over the WHOLE of `data`, computed as a sum
    of Hessian-vector products over chunks of at most `chunk_size` rows inside one loop, so its memory
    is that of one chunk, whatever the number of rows. For use inside jitted functions (every solver
    below calls it); the result does not depend on `chunk_size` beyond rounding.

    - A `MeanLoss` (`mean_loss`, `weighted_mean_loss`): chunk k covers rows `[start, start + c)` with
      `start = min(k*c, n - c)` (the last chunk is shifted back, never padded, so no copy of the set is
      made), each row weighted by its own weight, by 0 if an earlier chunk already covered it or if it
      lies at or beyond `num_examples` (traced: the loop runs only over the chunks that hold real rows),
      and the sum is divided by the total weight.
    - Any other `loss_fn(params, batch)`, by the module's convention the mean over the batch (plus a
      regulariser of the parameters): full chunks weighted by `c/n` and the remaining `r` rows by
      `r/n`, which sums to the whole set's mean (and its regulariser once). `num_examples` needs a
      `MeanLoss`.
    - `data` without rows (None, a loss of the parameters alone): one plain `hvp`.
    With a `mesh`, each chunk is split over its devices when it has at least one row per device.
    `l2` adds the Hessian `l2*I` of the objective's weight decay `l2/2 ||theta||^2`.
    """
    if chunk_size < 1:
        raise ValueError(f"the HVP chunk size must be at least 1, got {chunk_size}")
    n = _num_rows(data)
    if n == 0:
        product = hvp(loss_fn, params, data, v)
    elif isinstance(loss_fn, MeanLoss):
        product = _weighted_chunks_hvp(loss_fn, params, data, v, min(chunk_size, n), num_examples, mesh)
    elif num_examples is not None:
        raise ValueError("num_examples needs a loss from mean_loss or weighted_mean_loss (its rows can be weighted)")
    else:
        product = _mean_chunks_hvp(loss_fn, params, data, v, min(chunk_size, n), mesh)
    return product if isinstance(l2, (int, float)) and l2 == 0 else tree_add_scaled(product, v, l2)


def _weighted_chunks_hvp(loss_fn: MeanLoss, params, data, v, size: int, num_examples, mesh):
    batch, weights = loss_fn.split(data)
    n = _num_rows(batch)
    real = n if num_examples is None else num_examples
    dtype = jax.tree.leaves(v)[0].dtype
    all_rows = jnp.arange(n)
    if weights is None:
        total_weight = jnp.asarray(real, dtype)
    else:
        total_weight = jnp.sum(jnp.where(all_rows < real, weights.astype(dtype), 0))
    chunk_hvp = _loop_hvp(loss_fn.weighted_sum)

    def add_chunk(k, total):
        start = jnp.minimum(k * size, n - size)
        rows = start + jnp.arange(size)
        w = jnp.ones(size, dtype) if weights is None else lax.dynamic_slice_in_dim(weights, start, size).astype(dtype)
        w = jnp.where((rows >= k * size) & (rows < real), w, 0)
        chunk = parallel.constrain_batch((_slice_rows(batch, start, size), w), mesh)
        return jax.tree.map(jnp.add, total, chunk_hvp(params, chunk, v))

    num_chunks = (real + size - 1) // size  # a traced count gives a while loop over the real chunks only
    total = lax.fori_loop(0, num_chunks, add_chunk, jax.tree.map(jnp.zeros_like, v))
    return tree_scale(total, 1 / total_weight)


def _mean_chunks_hvp(loss_fn, params, data, v, size: int, mesh):
    n = _num_rows(data)
    full, rest = divmod(n, size)
    chunk_hvp = _loop_hvp(loss_fn)

    def add_chunk(k, total):
        chunk = parallel.constrain_batch(_slice_rows(data, k * size, size), mesh)
        return jax.tree.map(jnp.add, total, chunk_hvp(params, chunk, v))

    total = tree_scale(lax.fori_loop(0, full, add_chunk, jax.tree.map(jnp.zeros_like, v)), size / n)
    if rest:
        last = parallel.constrain_batch(jax.tree.map(lambda a: a[n - rest:], data), mesh)
        total = tree_add_scaled(total, chunk_hvp(params, last, v), rest / n)
    return total


def _normal_like(rng: jax.Array, tree: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(rng, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _power_iteration_body(loss_fn, params, data, rng, l2=0.0, *, iters, chunk_size=DEFAULT_CHUNK_SIZE,
                          num_examples=None, mesh=None, precision=precision_lib.SOLVERS_DEFAULT):
    with precision_lib.scope(precision):
        v = _normal_like(rng, params)
        v = tree_scale(v, 1.0 / tree_norm(v))
        dtype = jax.tree.leaves(params)[0].dtype

        def body(_, carry):
            v, _ = carry
            hv = set_hvp(loss_fn, params, data, v, chunk_size=chunk_size, num_examples=num_examples, l2=l2, mesh=mesh)
            eigenvalue = tree_dot(v, hv)  # Rayleigh quotient, ||v|| = 1
            norm = tree_norm(hv)
            v = tree_scale(hv, 1.0 / jnp.where(norm > 0, norm, 1.0))
            return v, eigenvalue.astype(dtype)

        return lax.fori_loop(0, iters, body, (v, jnp.zeros((), dtype)))[1]


_power_iteration = jax.jit(_power_iteration_body,
                           static_argnames=("loss_fn", "iters", "chunk_size", "mesh", "precision"))


def power_iteration(loss_fn: LossFn, params: PyTree, data: PyTree, *, rng: jax.Array, iters: int = 50,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, l2: float = 0.0, num_examples=None,
                    precision: str = precision_lib.SOLVERS_DEFAULT) -> jax.Array:
    """Estimate of the largest-MAGNITUDE eigenvalue of the Hessian of `loss_fn(., data)` (plus `l2*I`),
    signed: the Rayleigh quotient of the last iterate. One jitted `fori_loop` of `iters` products
    `set_hvp` over `data` in chunks of `chunk_size`."""
    return _power_iteration(loss_fn, params, data, rng, l2, iters=iters, chunk_size=chunk_size,
                            num_examples=num_examples, precision=precision)


# ----------------------------------------------------------------------------- the dense Hessian


def exact_bytes(num_params: int, itemsize: int = 4, block_size: int = DEFAULT_EXACT_BLOCK_SIZE) -> int:
    """Bytes the exact solver allocates beyond one chunked HVP: two P x P matrices (the assembled
    Hessian, then its symmetrised and shifted copy, which XLA factorises in place; the assembly buffer
    is reused) and a block of `block_size` basis vectors and their products (2 x block x P).
    `tests/test_memory.py` checks it against XLA's count of the compiled program's temporaries."""
    block = min(block_size, num_params)
    return (2 * num_params * num_params + 2 * block * num_params) * itemsize


def check_exact_memory(params: PyTree, *, max_bytes: int = DEFAULT_EXACT_MAX_BYTES,
                       block_size: int = DEFAULT_EXACT_BLOCK_SIZE, flag: str = "max_bytes") -> None:
    """ValueError if the exact solver on `params` (arrays or `jax.ShapeDtypeStruct`s) would allocate more
    than `max_bytes` (see `exact_bytes`); the message gives the size and what to use instead."""
    size = tree_size(params)
    leaves = jax.tree.leaves(params)
    itemsize = np.dtype(leaves[0].dtype).itemsize if leaves else 4
    needed = exact_bytes(size, itemsize, block_size)
    if needed > max_bytes:
        raise ValueError(f"the exact solver builds a dense {size} x {size} Hessian of P = {size:,} parameters and "
                         f"factorises it: {needed / 2**30:.3g} GiB, above the limit of {max_bytes / 2**30:.3g} GiB "
                         f"({flag}); use the cg or lissa solver, a smaller parameter subset (last_layer), or raise "
                         f"the limit")


def _dense_hessian_body(loss_fn, params, data, l2=0.0, *, chunk_size=DEFAULT_CHUNK_SIZE,
                        block_size=DEFAULT_EXACT_BLOCK_SIZE, num_examples=None, mesh=None):
    """The symmetrised (P, P) Hessian, assembled `block_size` rows at a time from `set_hvp`s of the
    basis vectors of those rows (vmapped: they share each chunk's forward pass). Block k writes rows
    `[min(k*b, P - b), +b)`: the last block is shifted back, rewriting rows with the same values."""
    flat, unravel = ravel_pytree(params)
    size = flat.shape[0]
    block = min(block_size, size)

    def product(tangent):
        hv = set_hvp(loss_fn, params, data, unravel(tangent), chunk_size=chunk_size, num_examples=num_examples,
                     l2=l2, mesh=mesh)
        return ravel_pytree(hv)[0]

    def add_block(k, hessian):
        start = jnp.minimum(k * block, size - block)
        basis = ((start + jnp.arange(block))[:, None] == jnp.arange(size)[None, :]).astype(flat.dtype)
        return lax.dynamic_update_slice_in_dim(hessian, jax.vmap(product)(basis).astype(flat.dtype), start, axis=0)

    hessian = lax.fori_loop(0, -(-size // block), add_block, jnp.zeros((size, size), flat.dtype))
    return 0.5 * (hessian + hessian.T)


def _exact_body(loss_fn, params, data, v, damping, l2=0.0, *, chunk_size=DEFAULT_CHUNK_SIZE,
                block_size=DEFAULT_EXACT_BLOCK_SIZE, num_examples=None, mesh=None,
                precision=precision_lib.SOLVERS_DEFAULT):
    with precision_lib.scope(precision):
        flat_v, unravel = ravel_pytree(v)
        hessian = _dense_hessian_body(loss_fn, params, data, l2, chunk_size=chunk_size, block_size=block_size,
                                      num_examples=num_examples, mesh=mesh)
        shifted = hessian + damping * jnp.eye(flat_v.shape[0], dtype=hessian.dtype)
        return unravel(jnp.linalg.solve(shifted, flat_v))


_exact_inverse_hvp = jax.jit(_exact_body, static_argnames=("loss_fn", "chunk_size", "block_size", "mesh",
                                                           "precision"))


def exact_inverse_hvp(loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *, damping: float = 0.0,
                      l2: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE, block_size: int = DEFAULT_EXACT_BLOCK_SIZE,
                      max_bytes: int = DEFAULT_EXACT_MAX_BYTES, num_examples=None, mesh=None,
                      precision: str = precision_lib.SOLVERS_DEFAULT) -> PyTree:
    """`(H + l2*I + damping*I)^-1 v` by a dense solve (absolute damping), the Hessian of `loss_fn` on
    `data` assembled `block_size` rows at a time from HVPs over chunks of `chunk_size` rows. Only for small
    parameter sets: ValueError if `exact_bytes` exceeds `max_bytes` (1 GiB by default)."""
    check_exact_memory(params, max_bytes=max_bytes, block_size=block_size)
    placed = parallel.replicate((params, data, v, num_examples), mesh)
    result = _exact_inverse_hvp(loss_fn, *placed[:3], damping, l2, chunk_size=chunk_size, block_size=block_size,
                                num_examples=placed[3], mesh=mesh, precision=precision)
    return result if mesh is None else parallel.local(result)


# ----------------------------------------------------------------------------- conjugate gradients


class CGResult(NamedTuple):
    solution: PyTree
    residual_norm: jax.Array  # ||v - (H + damping I) x|| (the recursively updated residual)
    iterations: jax.Array
    converged: jax.Array  # residual_norm <= tol * ||v||
    min_curvature: jax.Array  # min over search directions of p^T (H + damping I) p / ||p||^2


def _cg_body(loss_fn, params, data, v, damping, tol, l2=0.0, *, maxiter, chunk_size=DEFAULT_CHUNK_SIZE,
             num_examples=None, mesh=None, precision=precision_lib.SOLVERS_DEFAULT):
    with precision_lib.scope(precision):
        def matvec(x):
            hx = set_hvp(loss_fn, params, data, x, chunk_size=chunk_size, num_examples=num_examples, l2=l2, mesh=mesh)
            return tree_add_scaled(hx, x, damping)

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


_cg = jax.jit(_cg_body, static_argnames=("loss_fn", "maxiter", "chunk_size", "mesh", "precision"))


def cg_flags_remedy(prefix: str, maxiter: int, tol: float) -> str:
    """`check_cg`'s not-converged remedy in a caller's flags `{prefix}cg_maxiter` and `{prefix}cg_tol`."""
    return f"raise {prefix}cg_maxiter (now {maxiter}) or {prefix}cg_tol (now {tol:g})"


def check_cg(result: CGResult, damping: float, *, shift_remedy: str = "increase damping",
             convergence_remedy: str = "raise maxiter or damping", stacklevel: int = 2) -> None:
    """The host checks of `cg` on a `CGResult`: ValueError on non-positive curvature, a RuntimeWarning
    if `tol` was not reached. The remedies say what to change in the caller's user's terms (their flags)."""
    curvature = float(result.min_curvature)
    if not curvature > 0:
        # H itself has curvature `curvature - damping` along that direction: a lower bound on the shift.
        raise ValueError(f"cg: H + damping*I is not positive definite (found curvature {curvature:.3g} <= 0 "
                         f"along a search direction, so the shift must exceed {damping - curvature:.3g} at "
                         f"least; now {damping:.3g}); {shift_remedy}")
    if not bool(result.converged):
        warnings.warn(f"cg stopped after {int(result.iterations)} iterations with residual "
                      f"{float(result.residual_norm):.3g} > tol*||v||; {convergence_remedy}",
                      RuntimeWarning, stacklevel=stacklevel + 1)


def cg(loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *, damping: float = 0.0, l2: float = 0.0,
       maxiter: int = 100, tol: float = 1e-6, chunk_size: int = DEFAULT_CHUNK_SIZE, num_examples=None,
       return_diagnostics: bool = False, mesh=None, precision: str = precision_lib.SOLVERS_DEFAULT):
    """`(H + l2*I + damping*I)^-1 v` by conjugate gradients on the full-set Hessian of `data` (damping is
    the ABSOLUTE shift; LiSSA's `(damping, scale)` corresponds to `damping*scale` here). One jitted
    `lax.while_loop`, one `set_hvp` (chunks of `chunk_size` rows) per iteration, stopping at
    `||r|| <= tol*||v||` or `maxiter`.

    CG needs `H + damping*I` positive definite. The Hessian of a trained non-convex network is
    usually indefinite, so pick a damping above minus its most negative eigenvalue; if a search
    direction with non-positive curvature is met the iteration stops and this raises ValueError.
    Not reaching `tol` within `maxiter` only warns. `return_diagnostics=True` returns a `CGResult`.
    """
    placed = parallel.replicate((params, data, v, num_examples), mesh)
    result = _cg(loss_fn, *placed[:3], damping, tol, l2, maxiter=maxiter, chunk_size=chunk_size,
                 num_examples=placed[3], mesh=mesh, precision=precision)  # each chunk split over `mesh`, if any
    result = result if mesh is None else parallel.local(result)
    check_cg(result, damping, stacklevel=2)
    return result if return_diagnostics else result.solution


# ----------------------------------------------------------------------------- LiSSA


class LissaDivergenceError(RuntimeError):
    """The LiSSA recursion diverged: `scale` is not above the largest Hessian eigenvalue (or
    `damping*scale` not above minus the most negative one)."""


class LissaResult(NamedTuple):
    inverse_hvp: PyTree  # mean over chains of h_T / scale, the estimate of (H + damping*scale*I)^-1 v
    norms: jax.Array  # (repeats, depth + 1): ||h_t|| per chain for t = 0..depth (h_0 = v; `_scaled_norm`)
    cosine_to_v: jax.Array  # cosine between the estimate and v (near 1: the solve is close to a multiple of v)
    nan_resets: jax.Array  # (repeats,): tensors restarted from v after a NaN product (`nan_reset` only)


def chains_split_over_devices(mesh, repeats: int, batch_size: Optional[int]) -> bool:
    """Where LiSSA's work goes on a mesh of D devices: the chains are split over the devices (each runs
    ceil(repeats/D) of them, the extras masked out) unless the recursion is deterministic (`batch_size`
    None: one chain, its chunks split over the devices) or there are fewer chains than devices and each
    minibatch has a row for every device (then each minibatch is split)."""
    devices = parallel.mesh_size(mesh)
    return devices > 1 and batch_size is not None and (repeats >= devices or batch_size < devices)


def tensor_scales(scale, v: PyTree) -> PyTree:
    """LiSSA's scale as one number per tensor of `v`: `scale` itself if it has `v`'s structure (a pytree
    of numbers, None where `v` has None), a number broadcast to every tensor otherwise."""
    if jax.tree.structure(scale) == jax.tree.structure(v):
        return scale
    leaves = jax.tree.leaves(scale)
    if len(leaves) != 1 or np.ndim(leaves[0]) != 0:
        raise ValueError("LiSSA's scale must be a number or a pytree of numbers with the structure of the "
                         f"parameters solved for ({jax.tree.structure(v)}), got {jax.tree.structure(scale)}")
    return jax.tree.map(lambda _: leaves[0], v)


def _scaled_norm(h: PyTree, scales: PyTree) -> jax.Array:
    """`sqrt(sum_k (s_k / max s) ||h_k||^2)`: the norm in which the recursion contracts (see `lissa`);
    the plain norm when every tensor has the same scale."""
    largest = functools.reduce(jnp.maximum, jax.tree.leaves(scales))
    return jnp.sqrt(sum(s / largest * jnp.vdot(x, x) for x, s in zip(jax.tree.leaves(h), jax.tree.leaves(scales))))


def _lissa_chain(loss_fn, params, data, v, damping, scales, l2, num_examples, key, chain=0, *, depth, batch_size,
                 chunk_size, mesh, nan_reset=False, order="random", repeats=1, start=None):
    """One chain: (h_depth, ||h_t|| for t = 0..depth, the number of tensors reset to v). `order="loader"`:
    chain `chain` of `repeats` takes rows chain, chain + repeats, ... (see `lissa`).
    `start=(first_step, (h, resets))` (loader order streamed by blocks, `_loader_block_chains`): `data` holds
    only this chain's rows of the steps first_step, first_step + 1, ... (one per step, the wrap-around
    already applied by the host, `num_examples` the whole set's size); the chain goes on from that carry
    over those steps and returns ((h, resets), ||h_t|| of those steps)."""
    n = _num_rows(data) if num_examples is None else num_examples
    # ISAL's detection code: each of its GPUs walks its shard of the labelled set once, in loader order
    # (torch's DistributedSampler without shuffle, padded by wrapping around), one image per step.
    steps = jnp.minimum(depth, -(-n // repeats)) if order == "loader" else depth

    def updated(v_, h_, hv_, s_):
        h_new = v_ + (1 - damping) * h_ - hv_ / s_
        return jnp.where(jnp.any(jnp.isnan(hv_)), v_, h_new) if nan_reset else h_new  # ISAL's reset: to v

    def update(carry, key, t):
        h, resets = carry
        if batch_size is None:
            batch, real = data, num_examples
        else:  # a fresh minibatch: uniformly with replacement among the real rows, or the loader's next row
            if order == "loader":
                idx = jnp.full((1,), t - start[0] if start is not None else (chain + t * repeats) % n)
            else:
                idx = jax.random.randint(key, (batch_size,), 0, n)
            batch, real = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data), None
        hv = set_hvp(loss_fn, params, batch, h, chunk_size=chunk_size, num_examples=real, l2=l2, mesh=mesh)
        if nan_reset:
            resets = resets + sum(jnp.any(jnp.isnan(x)).astype(jnp.int32) for x in jax.tree.leaves(hv))
        return jax.tree.map(updated, v, h, hv, scales), resets

    def step(carry, inputs):
        key, t = inputs
        if order == "loader":  # the predicate is the same for every chain, so under vmap it stays a cond
            carry = lax.cond(t < steps, lambda c: update(c, key, t), lambda c: c, carry)
        else:
            carry = update(carry, key, t)
        return carry, _scaled_norm(carry[0], scales)

    if start is not None:
        first_step, carry = start
        block = _num_rows(data)
        return lax.scan(step, carry, (jax.random.split(key, block), first_step + jnp.arange(block)))
    inputs = (jax.random.split(key, depth), jnp.arange(depth))
    (h, resets), norms = lax.scan(step, (v, jnp.zeros((), jnp.int32)), inputs)
    return h, jnp.concatenate([_scaled_norm(v, scales)[None].astype(norms.dtype), norms]), resets


LISSA_ORDERS = ("random", "loader")


def _check_order(order: str, batch_size) -> None:
    if order not in LISSA_ORDERS:
        raise ValueError(f"order: unknown LiSSA sampling order {order!r}; choose one of: {', '.join(LISSA_ORDERS)}")
    if order == "loader" and batch_size != 1:
        raise ValueError(f"order: LiSSA's loader order reads one example per step (batch_size 1), got {batch_size}")


def _lissa_chains(loss_fn, params, data, v, rng, damping, scale, l2=0.0, *, depth, repeats, batch_size,
                  chunk_size=DEFAULT_CHUNK_SIZE, mesh=None, num_examples=None,
                  precision=precision_lib.SOLVERS_DEFAULT, nan_reset=False, order="random"):
    # `num_examples` (traced): draw among the first rows only, the rest of `data` being padding.
    settings = dict(depth=depth, batch_size=batch_size, chunk_size=chunk_size, nan_reset=nan_reset, order=order,
                    repeats=repeats)
    keys = jax.random.split(rng, repeats)
    chains = jnp.arange(repeats)
    scales = tensor_scales(scale, v)
    with precision_lib.scope(precision):
        if batch_size is None:  # deterministic: every chain is the same chain, so run one
            h, norms, resets = _lissa_chain(loss_fn, params, data, v, damping, scales, l2, num_examples, keys[0],
                                            mesh=mesh, **settings)
            total, norms = tree_scale(h, repeats), jnp.broadcast_to(norms, (repeats, depth + 1))
            resets = jnp.broadcast_to(resets, (repeats,))
        elif chains_split_over_devices(mesh, repeats, batch_size):
            total, norms, resets = _sharded_chains(loss_fn, params, data, v, damping, scales, l2, num_examples, keys,
                                                   chains, mesh=mesh, **settings)
        else:  # side by side; on a mesh with fewer chains than devices, each minibatch split over them
            chain = functools.partial(_lissa_chain, loss_fn, params, data, v, damping, scales, l2, num_examples,
                                      mesh=mesh, **settings)
            hs, norms, resets = jax.vmap(chain)(keys, chains)
            total = jax.tree.map(lambda x: jnp.sum(x, axis=0), hs)
        estimate, cosine = _chains_estimate(total, v, scales, repeats)
    return LissaResult(estimate, norms, cosine, resets)


def _chains_estimate(total, v, scales, repeats):
    """(the chains' mean h_depth, each tensor over its scale; its cosine to v) from the sum of their h_depth."""
    estimate = jax.tree.map(lambda x, s: x / (repeats * s), total, scales)
    return estimate, tree_dot(estimate, v) / (tree_norm(estimate) * tree_norm(v))


def _sharded_chains(loss_fn, params, data, v, damping, scale, l2, num_examples, keys, chains, *, mesh, **settings):
    """(sum of h_depth over the chains, norms, resets): the chains split over the mesh's devices, padded to a
    multiple of their count by repeating the last key; the padded chains are left out of the sum."""
    repeats = keys.shape[0]
    padded = parallel.round_up(repeats, parallel.mesh_size(mesh))
    keys = keys[jnp.minimum(jnp.arange(padded), repeats - 1)]
    chains = chains[jnp.minimum(jnp.arange(padded), repeats - 1)]
    real = jnp.arange(padded) < repeats

    def local(keys, chains, real, params, data, v, damping, scale, l2, num_examples):
        chain = functools.partial(_lissa_chain, loss_fn, params, data, v, damping, scale, l2, num_examples,
                                  mesh=None, **settings)
        hs, norms, resets = jax.vmap(chain)(keys, chains)
        total = jax.tree.map(lambda x: jnp.sum(jnp.where(real.reshape(-1, *[1] * (x.ndim - 1)), x, 0), axis=0), hs)
        return jax.lax.psum(total, parallel.DATA_AXIS), norms, resets

    # check_vma=False: with JAX 0.10's type check on, the vmapped scans of `local` made every chain
    # draw the same minibatches (their carries start from the unsharded v); the chains are what is split.
    split, whole = P(parallel.DATA_AXIS), P()
    total, norms, resets = jax.shard_map(local, mesh=mesh, in_specs=(split, split, split) + (whole,) * 7,
                                         out_specs=(whole, split, split), check_vma=False)(
        keys, chains, real, params, data, v, damping, scale, l2, num_examples)
    # The host reads every chain's norms and resets.
    return (total, parallel.constrain_replicated(norms[:repeats], mesh),
            parallel.constrain_replicated(resets[:repeats], mesh))


def _loader_block_chains(loss_fn, params, blocks, v, damping, scales, l2, num_examples, carry, first_step, *, depth,
                         repeats, chunk_size, mesh, nan_reset):
    """Loader-order LiSSA over one block of steps: `blocks` holds each chain's rows of the steps first_step,
    first_step + 1, ... (chains on the leading axis, padded to a multiple of the mesh's devices), `carry`
    each chain's (h, resets); returns the carries after those steps and each chain's ||h_t||. The recursion
    is `_lissa_chain`'s; on a mesh the chains are split over its devices (`chains_split_over_devices`:
    batch 1 always splits by chains), and the carries stay there between blocks."""
    settings = dict(depth=depth, batch_size=1, chunk_size=chunk_size, mesh=None, nan_reset=nan_reset, order="loader",
                    repeats=repeats)

    def chains(blocks, carry, params, v, damping, scales, l2, num_examples, first_step):
        def chain(rows, state):
            return _lissa_chain(loss_fn, params, rows, v, damping, scales, l2, num_examples, jax.random.PRNGKey(0),
                                start=(first_step, state), **settings)

        return jax.vmap(chain)(blocks, carry)

    args = (blocks, carry, params, v, damping, scales, l2, num_examples, first_step)
    if mesh is None:
        return chains(*args)
    split, whole = P(parallel.DATA_AXIS), P()
    return jax.shard_map(chains, mesh=mesh, in_specs=(split, split) + (whole,) * 7, out_specs=(split, split),
                         check_vma=False)(*args)


_lissa_jit = jax.jit(_lissa_chains, static_argnames=("loss_fn", "depth", "repeats", "batch_size", "chunk_size", "mesh",
                                                     "precision", "nan_reset", "order"))


def _divergence_bound(v_norm: float, damping: float, depth: int) -> np.ndarray:
    """`||v|| sum_{k<=t} (1 - d)^k`, the largest ||h_t|| of a recursion with PSD minibatch Hessians
    below the scale."""
    t = np.arange(depth + 1, dtype=np.float64)
    if damping > 0:
        return v_norm * (1.0 - (1.0 - damping) ** (t + 1)) / damping
    return v_norm * (t + 1)


def _format_scale(scale) -> str:
    leaves = [float(s) for s in jax.tree.leaves(scale)]
    return f"{leaves[0]:g}" if len(set(leaves)) == 1 else "per tensor [" + ", ".join(f"{s:g}" for s in leaves) + "]"


def _divergence_message(loss_fn, params, data, rng, damping, scale, batch_size, norms, bound,
                        num_examples=None, l2=0.0, chunk_size=DEFAULT_CHUNK_SIZE) -> str:
    finite = np.isfinite(norms)
    if not finite.all():
        step = int(np.argmin(finite.all(axis=0)))
        what = f"||h_t|| became non-finite at step {step}"
    else:
        ratio = norms / np.maximum(bound, np.finfo(np.float64).tiny)
        step = int(np.argmax(ratio.max(axis=0)))
        what = (f"||h_t|| grew from {norms[0, 0]:.3g} to {norms.max():.3g}, {ratio.max():.3g} times the "
                f"bound of a convergent recursion (reached at step {step})")
    n = _num_rows(data) if num_examples is None else int(num_examples)
    k_full, k_mini = jax.random.split(jax.random.fold_in(rng, 1))
    m = min(n, 256)
    subset = jax.tree.map(lambda a: a[:m], data)
    estimate_on = lambda rows, key: float(power_iteration(loss_fn, params, rows, rng=key, iters=30, l2=l2,  # noqa: E731
                                                          chunk_size=chunk_size))
    lam_full = estimate_on(subset, k_full)
    lam_mini = lam_full
    if batch_size is not None and batch_size < m:
        lams = [estimate_on(jax.tree.map(lambda a: a[i * batch_size:(i + 1) * batch_size], subset),
                            jax.random.fold_in(k_mini, i))
                for i in range(min(8, m // batch_size))]
        lam_mini = max(lams, key=abs)
    estimate = max(abs(lam_full), abs(lam_mini))
    return (f"LiSSA diverged: {what}, with scale={_format_scale(scale)}, damping={damping:g}. The recursion "
            f"converges only if scale exceeds the largest eigenvalue of every minibatch Hessian (and "
            f"damping*scale exceeds minus the most negative one). power_iteration estimates the largest-"
            f"magnitude eigenvalue at {lam_full:.4g} on {m} labelled examples and {lam_mini:.4g} on "
            f"minibatches of {batch_size}; try scale >= {2 * estimate:.3g} (2x the estimate).")


def lissa(loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *, rng: jax.Array,
          depth: int = 250, repeats: int = 4, damping: float = 0.01, scale: float | PyTree = 1e4,
          batch_size: int | None = 1, l2: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE, check: bool = True,
          divergence_factor: float = 10.0, return_diagnostics: bool = False, mesh=None,
          num_examples: int | jax.Array | None = None, precision: str = precision_lib.SOLVERS_DEFAULT,
          nan_reset: bool = False, order: str = "random"):
    """LiSSA estimate of `(H + l2*I + damping*scale*I)^-1 v` (Agarwal et al. 2017; Koh & Liang 2017).

    `h_0 = v`, `h_{t+1} = v + (1 - damping) h_t - H_t h_t / scale` for t < depth, where `H_t` is the
    Hessian of `loss_fn` (plus `l2*I`) on `batch_size` examples drawn uniformly with replacement from
    `data` (the labelled set; `batch_size=None` uses all of `data` every step, a deterministic recursion,
    the set summed in chunks of `chunk_size` rows by `set_hvp`); the result is `h_depth / scale`,
    averaged over `repeats` independent chains. See the module docstring for the derivation: the fixed
    point is `(H + damping*scale*I)^-1 v` (with the defaults, ISAL's, `(H + 100 I)^-1 v`), reached only
    if `scale` exceeds the largest eigenvalue of the minibatch Hessians.

    Per-tensor scales (ISAL's detection code: 100, 8000 and 5000 for FCOS's classification, regression
    and centerness kernels): `scale` may be a pytree with one number per tensor of `v` (see
    `tensor_scales`). With D the diagonal matrix holding each tensor's scale on its coordinates, the
    recursion is `h_{t+1} = v + (1 - damping) h_t - D^-1 H_t h_t`, whose fixed point solves
    `(damping I + D^-1 H) h* = v`, i.e. `h* = (H + damping D)^-1 D v`, and the result, each tensor of
    `h_depth` divided by its own scale, converges to `D^-1 (H + damping D)^-1 D v`: for one scale s,
    `(H + damping s I)^-1 v` as above; with several, the damping of each block is its own `damping * s_k`
    and the blocks are reweighted (ISAL's detection code scores with `h_depth` itself, i.e. `D` times
    this result). The recursion contracts when `0 <= D^-1/2 H_t D^-1/2 <= I`, in the norm
    `||h||_D = sqrt(sum_k s_k ||h_k||^2)`; `norms` are that norm over the largest scale's square root
    (the plain norm for one scale), so the divergence bound below holds for them unchanged.

    `nan_reset=True` (ISAL's detection code): at a step where a tensor's Hessian-vector product holds a
    NaN, that tensor of the chain restarts from v (`h_k = v_k`), the others update as usual;
    `LissaResult.nan_resets` counts the restarts of each chain. By default a NaN propagates and the
    check raises `LissaDivergenceError`.

    `order="loader"` (ISAL's detection code, `detection/src/utils.py` `multi_gpu_s_test`, batch 1): chain r
    of the `repeats` takes the rows r, r + repeats, r + 2 repeats, ... of `data` in order (what each of its
    GPUs reads through torch's DistributedSampler without shuffle, wrapping around to pad the last round),
    and stops after min(depth, ceil(n / repeats)) steps (the set read once); `rng` is unused.

    All chains and steps are ONE jitted function: the chains side by side (`jax.vmap`), each a
    `lax.scan` over its steps, compiled once per loss function, shapes and static settings; `rng`, `v`,
    `params`, `data` values, `damping`, `scale` and `l2` can change without recompiling. With
    `batch_size=None` the chains are identical and one is run. With a `mesh`, the chains are split over
    its devices (`chains_split_over_devices`), or the minibatches or chunks when that is what divides.

    `num_examples` (default: all rows): minibatches are drawn among the first `num_examples` rows of
    `data` only, the rest being padding. It is a traced value, so a labelled set padded to a fixed
    size compiles once for every count up to that size, and with the same `rng` the draws are those
    of the unpadded set. With `batch_size=None` the rows past it weigh nothing (a `MeanLoss` is needed).

    With `check=True` (a host sync), raises `LissaDivergenceError` if any ||h_t|| is non-finite or
    exceeds `divergence_factor` times `||v|| sum_{k<=t} (1-damping)^k`, the bound that holds when
    every minibatch Hessian is PSD with eigenvalues below `scale`; the message gives a power-iteration
    estimate of lambda_max and a scale to try. Returns the estimate (a pytree like `v`), or a
    `LissaResult` with the per-step norms and the cosine to `v` if `return_diagnostics=True`.
    """
    if not 0 <= damping < 1:
        raise ValueError(f"lissa needs 0 <= damping < 1, got {damping}")
    _check_order(order, batch_size)
    placed = parallel.replicate((params, data, v, rng, num_examples), mesh)
    result = _lissa_jit(loss_fn, *placed[:4], damping, scale, l2, depth=depth, repeats=repeats, batch_size=batch_size,
                        chunk_size=chunk_size, mesh=mesh, num_examples=placed[4], precision=precision,
                        nan_reset=nan_reset, order=order)
    result = result if mesh is None else parallel.local(result)
    if check:
        check_lissa(result, loss_fn, params, data, rng=rng, damping=damping, scale=scale, batch_size=batch_size,
                    divergence_factor=divergence_factor, num_examples=num_examples, l2=l2, chunk_size=chunk_size)
    return result if return_diagnostics else result.inverse_hvp


def check_lissa(result: LissaResult, loss_fn: LossFn, params: PyTree, data: PyTree, *, rng: jax.Array,
                damping: float, scale: float | PyTree, batch_size: int | None, divergence_factor: float = 10.0,
                num_examples: int | None = None, l2: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
    """The divergence check of `lissa` on a `LissaResult` (a host sync): raises
    `LissaDivergenceError` with a suggested scale. `loss_fn`, `params` and `data` serve only to
    estimate lambda_max for that message (compiled only when it is raised; `data` may be a function
    returning the data, called only then)."""
    norms = np.asarray(result.norms, dtype=np.float64)
    depth = norms.shape[1] - 1
    bound = _divergence_bound(float(norms[0, 0]), damping, depth)
    if not np.isfinite(norms).all() or (norms > divergence_factor * bound).any():
        data = data() if callable(data) else data
        raise LissaDivergenceError(_divergence_message(loss_fn, params, data, rng, damping, scale, batch_size, norms,
                                                       bound, num_examples, l2, chunk_size))


# ----------------------------------------------------------------------------- dispatch


def solve(method: str, loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *,
          rng: jax.Array | None = None, damping: float = 0.01, scale: float = 1e4, depth: int = 250,
          repeats: int = 4, batch_size: int | None = 1, maxiter: int = 100, tol: float = 1e-6, l2: float = 0.0,
          chunk_size: int = DEFAULT_CHUNK_SIZE, block_size: int = DEFAULT_EXACT_BLOCK_SIZE,
          max_bytes: int = DEFAULT_EXACT_MAX_BYTES, num_examples=None, mesh=None,
          precision: str = precision_lib.SOLVERS_DEFAULT) -> PyTree:
    """`(H + l2*I + damping*scale*I)^-1 v` by `method` in SOLVERS, all in LiSSA's damping convention:
    "lissa" samples minibatches of `data`; "cg" and "exact" use the full-set Hessian on `data` with the
    absolute shift `damping*scale` (with ISAL's defaults, 100). `rng` is needed by "lissa" only. Every
    HVP over a set goes through `set_hvp` in chunks of `chunk_size` rows. (A caller whose loss closes
    over trained weights uses `inverse_hvp`, which compiles once per run.)"""
    common = dict(l2=l2, chunk_size=chunk_size, num_examples=num_examples, mesh=mesh, precision=precision)
    if method == "lissa":
        if rng is None:
            raise ValueError("solve('lissa', ...) needs rng")
        return lissa(loss_fn, params, data, v, rng=rng, depth=depth, repeats=repeats, damping=damping,
                     scale=scale, batch_size=batch_size, **common)
    if method == "cg":
        return cg(loss_fn, params, data, v, damping=damping * scale, maxiter=maxiter, tol=tol, **common)
    if method == "exact":
        return exact_inverse_hvp(loss_fn, params, data, v, damping=damping * scale, block_size=block_size,
                                 max_bytes=max_bytes, **common)
    raise ValueError(f"unknown influence solver {method!r}; choose one of: {', '.join(SOLVERS)}")


def solve_traced(method: str, loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *,
                 rng: jax.Array | None = None, damping=0.01, scale=1e4, depth: int = 250, repeats: int = 4,
                 batch_size: int | None = 1, maxiter: int = 100, tol=1e-6, l2=0.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, block_size: int = DEFAULT_EXACT_BLOCK_SIZE,
                 num_examples=None, mesh=None, precision: str = precision_lib.SOLVERS_DEFAULT,
                 nan_reset: bool = False, order: str = "random"):
    """The body of `solve` for use INSIDE a caller's jitted function, whose loss may close over traced
    arrays (the trained variables): no jit of its own (it is traced into the caller's program) and no
    host checks. Returns the `LissaResult` ("lissa"), the `CGResult` ("cg") or the solution
    ("exact"); on the host, check them with `check_lissa` / `check_cg` (and `check_exact_memory`
    beforehand). `damping`, `scale`, `tol`, `l2` and `num_examples` may be traced; the rest is static.
    `scale` may hold one number per tensor for "lissa" only (`lissa`); `nan_reset` and `order` are LiSSA's."""
    common = dict(chunk_size=chunk_size, num_examples=num_examples, mesh=mesh, precision=precision)
    if method == "lissa":
        return _lissa_chains(loss_fn, params, data, v, rng, damping, scale, l2, depth=depth, repeats=repeats,
                             batch_size=batch_size, nan_reset=nan_reset, order=order, **common)
    if jax.tree.structure(scale).num_leaves != 1:
        raise ValueError(f"per-tensor scales are LiSSA's: the {method} solver takes one scale (its shift is "
                         f"damping * scale)")
    if method == "cg":
        return _cg_body(loss_fn, params, data, v, damping * scale, tol, l2, maxiter=maxiter, **common)
    if method == "exact":
        return _exact_body(loss_fn, params, data, v, damping * scale, l2, block_size=block_size, **common)
    raise ValueError(f"unknown influence solver {method!r}; choose one of: {', '.join(SOLVERS)}")


# ----------------------------------------------------------------------------- per-example products


def jvp_scores(example_loss_fn: Callable, params: PyTree, s: PyTree, xs: PyTree, *, has_aux: bool = False):
    """`s . grad example_loss_fn(params, x_i)` for every row of `xs`: ONE forward-mode product. The
    body of `influence_scores` for a caller's own (jitted, chunked) function. `has_aux`: the loss returns
    `(loss, aux)` and the result is `(scores, aux)` (per-example facts of the same forward pass)."""
    per_example = lambda p: jax.vmap(example_loss_fn, (None, 0))(p, xs)  # noqa: E731
    if has_aux:
        _, scores, aux = jax.jvp(per_example, (params,), (s,), has_aux=True)
        return scores, aux
    return jax.jvp(per_example, (params,), (s,))[1]


def _jvp_scores(static, consts, xs):
    example_loss_fn, precision = static
    params, s = consts
    with precision_lib.scope(precision):
        return jvp_scores(example_loss_fn, params, s, xs)


def influence_scores(example_loss_fn: Callable, params: PyTree, xs: PyTree, s: PyTree, *,
                     chunk_size: int | None = None, mesh=None, precision: str = precision_lib.SOLVERS_DEFAULT
                     ) -> jax.Array:
    """`s . grad_params example_loss_fn(params, x_i)` for every example i of `xs`, shape (n,).

    One forward-mode product per chunk, `jvp(lambda p: vmap(example_loss_fn)(p, xs), (params,), (s,))`
    — about the cost of a forward pass and its tangent, never per-example gradients. With
    `chunk_size`, examples go through in chunks of exactly that size (the last padded), so one compiled
    function serves any pool size; with a `mesh`, each chunk is split over its devices
    (`jaxal.parallel.map_chunks`). ISAL's score is `-influence_scores(...)` with `s = s_test`.
    """
    return parallel.map_chunks(_jvp_scores, (example_loss_fn, precision), (params, s), xs, chunk_size=chunk_size,
                               mesh=mesh)


def weighted_gradient(example_loss_fn: Callable, params: PyTree, xs: PyTree, weights: jax.Array) -> PyTree:
    """`grad sum_i w_i example_loss_fn(params, x_i)`: the body of `mean_gradient` for a caller's own
    function under `jaxal.parallel.sum_chunks` (weights 0 for padding)."""

    def total(p):
        losses = jax.vmap(example_loss_fn, (None, 0))(p, xs)
        return jnp.sum(weights.astype(losses.dtype) * losses)

    return jax.grad(total)(params)


class _OfParams(NamedTuple):
    """`example_loss_fn(params, example)` as an `example_loss(variables, example)` of the entry point."""

    example_loss_fn: Callable

    def __call__(self, variables, example):
        return self.example_loss_fn(variables["params"], example)


def mean_gradient(example_loss_fn: Callable, params: PyTree, data: PyTree, *,
                  chunk_size: int | None = None, mesh=None, precision: str = precision_lib.SOLVERS_DEFAULT) -> PyTree:
    """`grad (1/n) sum_i example_loss_fn(params, z_i)` over `data` (e.g. `grad L(R)` of a reference
    set, ISAL's `v`): `reference_gradient` for a loss of the parameters alone, in chunks of `chunk_size`
    (default: the whole set in one) split over the devices of a `mesh`; padded examples get weight zero,
    so the result is the exact mean for any chunking."""
    return reference_gradient(_OfParams(example_loss_fn), {"params": params}, data, subset="all",
                              chunk_size=chunk_size, mesh=mesh, precision=precision)


# ----------------------------------------------------------------------------- the entry point
# What ISAL (`jaxal.strategies.isal`), the bound diagnostics (`jaxal.diagnostics`) and any other caller
# use: one options type (`SolverOptions`), one check of it, one compiled solve per run, one reference-
# gradient sum. The caller supplies `example_loss(variables, example) -> scalar`, the training loss of ONE
# example (a classifier's CE at its label, a detector's loss of one image), as a hashable object (a
# module-level function, or a NamedTuple of hashable settings with a `__call__`): it is a static setting
# of the compiled programs, and it receives the trained variables as TRACED arguments, so new weights
# every cycle compile nothing and are never baked into a program as constants.


def check_solver_options(options: SolverOptions, flags: str = "--influence.") -> None:
    """ValueError naming the caller's flag (`{flags}name`) for a setting the solve cannot run with."""
    if options.solver not in SOLVERS:
        raise ValueError(f"{flags}solver: unknown solver {options.solver!r}; choose one of: {', '.join(SOLVERS)}")
    if not callable(options.params) and options.params not in PARAM_SUBSETS:
        raise ValueError(f"{flags}params: unknown parameter subset {options.params!r}; choose one of: "
                         f"{', '.join(PARAM_SUBSETS)}")
    for name in ("depth", "repeats", "cg_maxiter", "chunk_size", "hvp_chunk_size", "exact_block_size"):
        if getattr(options, name) < 1:
            raise ValueError(f"{flags}{name} must be at least 1, got {getattr(options, name)}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ValueError(f"{flags}batch_size must be at least 1 (or none: the whole set), got {options.batch_size}")
    try:
        _check_order(options.order, options.batch_size)
    except ValueError as error:
        raise ValueError(f"{flags}{error}") from None
    # `not x > 0` also rejects NaN, which every ordered comparison lets through.
    if not (math.isfinite(options.damping) and 0 <= options.damping < 1):
        raise ValueError(f"{flags}damping must be in [0, 1) (it is relative: the shift is damping x scale), "
                         f"got {options.damping}")
    for name in ("scale", "exact_max_gib"):
        if not (math.isfinite(getattr(options, name)) and getattr(options, name) > 0):
            raise ValueError(f"{flags}{name} must be a finite number > 0, got {getattr(options, name)}")
    if not (math.isfinite(options.cg_tol) and options.cg_tol >= 0):
        raise ValueError(f"{flags}cg_tol must be a finite number >= 0, got {options.cg_tol}")


def select(params: PyTree, subset) -> PyTree:
    """The tensors of `subset` (a name of `jaxal.pytree.PARAM_SUBSETS` or a function `params -> mask`),
    None elsewhere: the structure of `v`, of the solution and of per-tensor scales."""
    return partition(params, subset_mask(params, subset))[0]


def _subset_loss(example_loss: Callable, subset, variables: dict) -> tuple[Callable, PyTree]:
    """(the loss of one example as a function of the subset's tensors, those tensors), the other
    parameters and the other collections (BatchNorm statistics) held at `variables`."""
    return restrict(lambda params, example: example_loss({**variables, "params": params}, example),
                    variables["params"], subset)


def _gradient_chunk(static, variables, chunk):
    """`sum_i w_i grad example_loss(z_i)` over a chunk of the reference set (`parallel.sum_chunks`)."""
    example_loss, subset, precision = static
    examples, weights = chunk
    with precision_lib.scope(precision):
        loss, selected = _subset_loss(example_loss, subset, variables)
        return weighted_gradient(loss, selected, examples, weights)


def reference_gradient(example_loss: Callable, variables: dict, data: PyTree, *, subset, chunk_size: Optional[int],
                       reduce: str = "mean", mesh=None, precision: str = precision_lib.SOLVERS_DEFAULT) -> PyTree:
    """`v = sum_j grad example_loss(z_j)` over the reference set `data` (rows on the leading axis) with
    respect to the tensors of `subset`, divided by the set's size with `reduce="mean"` (ISAL's
    classification code, Koh & Liang's `grad L(R)`) or not with `reduce="sum"` (ISAL's detection code and
    the bound diagnostics sum). The set goes through in chunks of `chunk_size` rows (None: one chunk),
    the last one padded with weight 0 (`jaxal.parallel.sum_chunks`): one compiled program for every set
    size, and the memory of one chunk whatever the size of the set. (The chunks are a host loop of one
    compiled program, so the set itself never has to fit on the device.)"""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    total = parallel.sum_chunks(_gradient_chunk, (example_loss, subset, precision), variables, data,
                                chunk_size=chunk_size, mesh=mesh)
    return total if reduce == "sum" else tree_scale(total, 1.0 / parallel.num_examples(data))


class _Settings(NamedTuple):
    """The static settings of `_solve` (hashable): one compiled program per value and shapes."""

    example_loss: Callable
    subset: Any
    solver: str
    depth: int
    repeats: int
    batch_size: Optional[int]
    maxiter: int
    chunk_size: int  # rows per Hessian-vector product
    block_size: int  # exact: basis vectors per assembly pass
    precision: str
    mesh: Any
    nan_reset: bool
    order: str = "random"


def _solve_body(static: _Settings, variables, data, num_examples, v, rng, damping, scale, tol, l2):
    """The solver's result (`LissaResult`, `CGResult` or the solution) on the padded labelled set
    `data = (examples, weights)`, the loss built from the traced variables."""
    loss, selected = _subset_loss(static.example_loss, static.subset, variables)
    return solve_traced(static.solver, weighted_mean_loss(loss), selected, data, v, rng=rng, damping=damping,
                        scale=scale, depth=static.depth, repeats=static.repeats, batch_size=static.batch_size,
                        maxiter=static.maxiter, tol=tol, l2=l2, chunk_size=static.chunk_size,
                        block_size=static.block_size, num_examples=num_examples, mesh=static.mesh,
                        precision=static.precision, nan_reset=static.nan_reset, order=static.order)


_solve = jax.jit(_solve_body, static_argnums=0)


class LoaderRows(NamedTuple):
    """A labelled set the solve reads from the host, block by block (`inverse_hvp` with LiSSA's loader
    order): `read(rows)` returns the examples of `rows` (host int64 indices into the set, in that order,
    possibly repeated) as a pytree of NumPy arrays with `len(rows)` rows, e.g. images read from disk."""

    num_rows: int
    read: Callable[[np.ndarray], PyTree]


# Loader-order LiSSA steps per block read from the host (each block holds repeats x this many examples).
DEFAULT_LOADER_BLOCK_STEPS = 8


class _BlockSettings(NamedTuple):
    """The static settings of `_loader_block` (hashable)."""

    example_loss: Callable
    subset: Any
    depth: int
    repeats: int
    chunk_size: int
    precision: str
    mesh: Any
    nan_reset: bool


def _loader_block_body(static: _BlockSettings, variables, blocks, num_examples, v, carry, first_step, damping, scale,
                       l2):
    """One block of loader-order LiSSA steps (`_loader_block_chains`), the loss built from the traced
    variables; `blocks = (examples, weights)` with the chains on the leading axis."""
    loss, selected = _subset_loss(static.example_loss, static.subset, variables)
    with precision_lib.scope(static.precision):
        return _loader_block_chains(weighted_mean_loss(loss), selected, blocks, v, damping, tensor_scales(scale, v),
                                    l2, num_examples, carry, first_step, depth=static.depth, repeats=static.repeats,
                                    chunk_size=static.chunk_size, mesh=static.mesh, nan_reset=static.nan_reset)


_loader_block = jax.jit(_loader_block_body, static_argnums=0)


def loader_block_rows(num_rows: int, repeats: int, first_step: int, block_steps: int, steps: int) -> np.ndarray:
    """(repeats, real steps) row indices of a block: chain r at step t reads row (r + t repeats) mod n (what
    `_lissa_chain` reads from the whole set in loader order), for the block's steps before `steps`."""
    t = np.arange(first_step, min(first_step + block_steps, steps))
    return (np.arange(repeats)[:, None] + t[None, :] * repeats) % num_rows


def _read_block(rows: LoaderRows, index: np.ndarray, block_steps: int, chains: int):
    """`(examples, weights)` of a block, shaped (chains, block_steps, ...): the rows of `index` (repeats, real
    steps) read in one call; the steps past the real ones (skipped by the recursion) and the chains past
    `repeats` (padding for the mesh, left out of the result) repeat the last ones."""
    repeats, real = index.shape
    examples = rows.read(index.reshape(-1))
    take_steps = np.minimum(np.arange(block_steps), real - 1)
    take_chains = np.minimum(np.arange(chains), repeats - 1)

    def shape(a):
        a = np.asarray(a).reshape(repeats, real, *np.shape(a)[1:])  # a view: no copy of a full block
        return a if (repeats, real) == (chains, block_steps) else a[take_chains][:, take_steps]

    return jax.tree.map(shape, examples), np.ones((chains, block_steps), np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _streamed_estimate(repeats, precision, hs, v, scale):
    """(estimate, cosine to v, ||v|| in the chains' norm) from the chains' h_depth (the padded ones dropped)."""
    scales = tensor_scales(scale, v)
    with precision_lib.scope(precision):
        total = jax.tree.map(lambda x: jnp.sum(x[:repeats], axis=0), hs)
        return (*_chains_estimate(total, v, scales, repeats), _scaled_norm(v, scales))


def _streamed_lissa(static: _BlockSettings, variables, rows: LoaderRows, v, damping, scale, l2, block_steps: int):
    """LiSSA in loader order over a labelled set read from the host one block of `block_steps` steps at a
    time: device memory holds one block (chains x block_steps examples) and the chains' carries, whatever
    the set's size; the result is `_lissa_chains`' (the same recursion, `_lissa_chain`, the same steps)."""
    n, repeats, depth, mesh = rows.num_rows, static.repeats, static.depth, static.mesh
    steps = min(depth, -(-n // repeats))
    chains = parallel.round_up(repeats, parallel.mesh_size(mesh)) if mesh is not None else repeats
    variables, v = parallel.replicate((variables, v), mesh)
    scale = parallel.replicate(scale, mesh)
    carry = jax.tree.map(lambda x: jnp.broadcast_to(x, (chains, *x.shape)), (v, jnp.zeros((), jnp.int32)))
    carry = parallel.shard_batch(carry, mesh)
    block_norms = []
    for first in range(0, steps, block_steps):
        index = loader_block_rows(n, repeats, first, block_steps, steps)
        blocks = parallel.shard_batch(_read_block(rows, index, block_steps, chains), mesh)
        carry, norms = _loader_block(static, variables, blocks, n, v, carry, first, damping, scale, l2)
        # The device runs this block while the host reads the next one; waiting for the previous block here
        # keeps at most two blocks alive (without it the host would read every block ahead of the device).
        if block_norms:
            jax.block_until_ready(block_norms[-1][0])
        block_norms.append((norms, index.shape[1]))
    # the chains' h (the size of v each) and norms, split over the mesh: replicated, then read on this process
    gather = (lambda x: x) if mesh is None else jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))
    hs, resets = parallel.local(gather(carry))
    estimate, cosine, first_norm = _streamed_estimate(repeats, static.precision, hs, *parallel.local((v, scale)))
    done = np.concatenate([np.asarray(parallel.local(gather(norms)))[:repeats, :real] for norms, real in block_norms],
                          axis=1)
    # the steps past the set's end change nothing (`_lissa_chain`'s cond): their norms are the last one's
    norms = np.concatenate([np.full((repeats, 1), np.asarray(first_norm), done.dtype), done,
                            np.repeat(done[:, -1:], depth - steps, axis=1)], axis=1)
    return LissaResult(estimate, norms, cosine, np.asarray(resets)[:repeats])


class InverseHVP(NamedTuple):
    solution: PyTree  # s, with the structure of `v` (the subset's tensors, None elsewhere)
    info: dict  # JSON-able: the solver's own numbers (LiSSA's norms and resets, CG's iterations and residual)


def inverse_hvp(example_loss: Callable, variables: dict, data: PyTree, v: PyTree, *, options: SolverOptions,
                rng: jax.Array, l2: float = 0.0, scale=None, subset=None, capacity: Optional[int] = None,
                mesh=None, precision: str = precision_lib.SOLVERS_DEFAULT, flags: str = "--influence.",
                block_steps: int = DEFAULT_LOADER_BLOCK_STEPS) -> InverseHVP:
    """`s = (H + l2*I + damping*scale*I)^-1 v` by `options.solver`, H the Hessian of the mean of
    `example_loss(variables, z)` over the labelled set `data` (rows on the leading axis, e.g. `(x, y)`)
    with respect to the tensors of `subset` (default `options.params`; a name or a function
    `params -> mask`), the other parameters and collections held at `variables`.

    - Damping: ONE convention for every solver, LiSSA's (Koh & Liang's and ISAL's code): `damping` is
      relative and the shift is `damping * scale`; `l2` (absolute) adds the Hessian of a weight decay
      `l2/2 ||theta||^2` (the training objective's, `hessian_weight_decay`).
    - `scale` (default `options.scale`): for LiSSA, a number, a pytree with one number per tensor of the
      subset (the structure of `select(variables["params"], subset)`), or a function `(path, tensor) ->
      number` mapped over those tensors; see `lissa` for what per-tensor scales converge to.
    - `options.nan_reset`: LiSSA's restart of a tensor from v after a NaN product (`lissa`).
    - The labelled set is padded on the host (`jaxal.padding.pad_rows`) to `jaxal.parallel.bucket(n,
      capacity)` rows with weight 0, and the solvers run over the real rows only (LiSSA draws among
      them, with the same draws as on the unpadded set): with `capacity` the run's largest labelled set,
      the solve compiles once per run whatever the weights and the set's size. Every product over the
      set is a sum over chunks of `options.hvp_chunk_size` rows (`set_hvp`).
    - `data` may be a `LoaderRows` (LiSSA in loader order only): the set stays on the host and is read
      `block_steps` steps at a time (repeats x block_steps examples, in the order the chains read them),
      each block run by one compiled program that carries the chains from block to block
      (`_streamed_lissa`): the device holds one block whatever the set's size, for the same result.
    - Host checks after the solve: LiSSA's divergence (`LissaDivergenceError`), CG's curvature
      (ValueError) and tolerance (a warning), worded in the caller's flags (`flags` + field name).
    Returns `InverseHVP(solution, info)`."""
    check_solver_options(options, flags)
    subset = options.params if subset is None else subset
    selected = select(variables["params"], subset)
    if not jax.tree.leaves(selected):
        raise ValueError(f"{flags}params: the parameter subset {subset!r} selects no parameters")
    scale = options.scale if scale is None else scale
    scale = jax.tree_util.tree_map_with_path(scale, selected) if callable(scale) else tensor_scales(scale, selected)
    if options.solver != "lissa" and len(set(float(s) for s in jax.tree.leaves(scale))) > 1:
        raise ValueError(f"per-tensor scales are LiSSA's: {flags}solver {options.solver} takes one scale "
                         f"(its shift is damping x scale)")
    if options.solver == "exact":
        check_exact_memory(selected, max_bytes=int(options.exact_max_gib * 2**30), block_size=options.exact_block_size,
                           flag=f"{flags}exact_max_gib")
    if options.solver != "lissa":
        scale = float(jax.tree.leaves(scale)[0])
    if isinstance(data, LoaderRows):
        if options.solver != "lissa" or options.order != "loader":
            raise ValueError(f"a labelled set read by blocks (LoaderRows) needs {flags}solver lissa with "
                             f"{flags}order loader, got {options.solver} with order {options.order}")
        if data.num_rows < 1 or block_steps < 1:
            raise ValueError(f"the streamed solve needs at least one labelled example and one step per block, got "
                             f"{data.num_rows} and {block_steps}")
        n = data.num_rows
        static = _BlockSettings(example_loss, subset, options.depth, options.repeats, options.hvp_chunk_size,
                                precision, mesh, options.nan_reset)
        result = _streamed_lissa(static, variables, data, v, options.damping, scale, l2, block_steps)
        sample = min(n, 32)  # read (from the host) only to word a divergence error
        padded = lambda: (data.read(np.arange(sample)), np.ones(sample, np.float32))  # noqa: E731
    else:
        n = parallel.num_examples(data)
        padded = pad_rows(data, parallel.bucket(n, capacity))
        static = _Settings(example_loss, subset, options.solver, options.depth, options.repeats, options.batch_size,
                           options.cg_maxiter, options.hvp_chunk_size, options.exact_block_size, precision, mesh,
                           options.nan_reset, options.order)
        result = _solve(static, *parallel.replicate((variables, padded, n, v, rng), mesh), options.damping,
                        parallel.replicate(scale, mesh), options.cg_tol, l2)
        result = result if mesh is None else parallel.local(result)
    info = {}
    if options.solver == "lissa":
        loss, _ = _subset_loss(example_loss, subset, variables)  # for the divergence message only
        check_lissa(result, weighted_mean_loss(loss), selected, padded, rng=rng, damping=options.damping,
                    scale=scale, batch_size=options.batch_size, num_examples=None if callable(padded) else n,
                    l2=l2, chunk_size=options.hvp_chunk_size)
        norms = np.asarray(result.norms, np.float64)
        info.update(lissa_final_norm=float(norms[:, -1].mean()), lissa_max_norm=float(norms.max()),
                    lissa_depth=int(options.depth), lissa_repeats=int(options.repeats))
        if options.nan_reset:
            info.update(lissa_nan_resets=int(np.sum(result.nan_resets)))
        return InverseHVP(result.inverse_hvp, info)
    if options.solver == "cg":
        shift = options.damping * scale
        check_cg(result, shift + l2, stacklevel=3,
                 shift_remedy=f"raise {flags}damping or {flags}scale (CG's shift is damping x scale = "
                              f"{options.damping:g} x {scale:g})",
                 convergence_remedy=cg_flags_remedy(flags, options.cg_maxiter, options.cg_tol))
        info.update(cg_iterations=int(result.iterations), cg_residual_norm=float(result.residual_norm))
        return InverseHVP(result.solution, info)
    return InverseHVP(result, info)
