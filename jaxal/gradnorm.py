"""Per-example gradient norms: the engine behind exp-gn, ent-gn, LPLgrad and EGL.

The score of an example x is a norm of `g(x) = grad_theta loss(theta, x)`, computed for every example of
the pool with `jax.vmap(jax.grad(loss))` inside one jitted function, with the model in inference mode
(BatchNorm running averages, no dropout), as the reference codes score each sample alone in eval mode.
Two reductions (DESIGN.md, "The math", point 1):
  - "global": the L2 norm of the whole flattened gradient (what the theory's bound uses);
  - "layer_sum": the sum over parameter tensors of each tensor's L2 norm (what the reference codes rank by,
    `sum(p.grad.norm() for p in model.parameters())`).

`method="ghost"` computes the same norms without materialising per-example gradients: one batched forward
and backward pass with respect to the layer outputs gives each layer's input `a` and output gradient `d`
per example, and each layer's per-example weight gradient is `sum_t a_t d_t^T` over its positions t
(pixels for a convolution, via patches), whose squared norm is taken directly or, where cheaper, as
`sum_{t,s} (a_t . a_s)(d_t . d_s)` ("ghost norm"). It supports models built from flax Dense, Conv and
BatchNorm; `method="vmap"` works for any loss and is the reference the tests compare against. The
ghost pass honours the parameter subset: only the layers that own a selected parameter get an output
perturbation and have their inputs recorded, so the backward pass stops at the earliest of them (a
"last_layer" subset costs a forward pass and the head's backward).

Losses are functions of the logits of ONE example (shape (C,)). exp-gn as written equals ent-gn
(point 2): with the posterior differentiated, `sum_i p_i CE(z, i) = -sum_i p_i log p_i`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxal import parallel
from jaxal.losses import cross_entropy, entropy_loss, expected_loss  # noqa: F401  (the engine's losses)
from jaxal.pytree import PARAM_SUBSETS, combine, partition, subset_mask

NORMS = ("global", "layer_sum")
METHODS = ("vmap", "ghost")

PyTree = Any
ParamsFilter = str | Callable[[PyTree], PyTree]


# --------------------------------------------------------------------------- the loss of one example


@dataclasses.dataclass(frozen=True)
class ExampleLoss:
    """`loss_fn(params, x)`: the loss of one example from a batched `apply_fn(params, xs) -> ModelOutput`
    (use `jaxal.models.inference_apply`). With `labelled=True` an example is a pair `(x, y)` and the loss
    is `loss_of_logits(logits, y)`. Frozen and hashable, so it is a static argument of the jitted engine;
    the ghost method reads `apply_fn` and `loss_of_logits` from it."""

    apply_fn: Callable
    loss_of_logits: Callable
    labelled: bool = False

    def __call__(self, params, example) -> jax.Array:
        return self.batch_losses(params, jax.tree.map(lambda a: a[None], example))[0]

    def batch_losses(self, params, examples) -> jax.Array:
        """Losses of a batch from one forward pass; equal to per-example calls in inference mode."""
        xs, ys = examples if self.labelled else (examples, None)
        logits = self.apply_fn(params, xs).logits
        if self.labelled:
            return jax.vmap(self.loss_of_logits)(logits, ys)
        return jax.vmap(self.loss_of_logits)(logits)


def example_loss(apply_fn: Callable, loss_of_logits: Callable, *, labelled: bool = False) -> ExampleLoss:
    """`loss_fn(params, x) = loss_of_logits(apply_fn(params, x[None]).logits[0])`."""
    return ExampleLoss(apply_fn, loss_of_logits, labelled)


# --------------------------------------------------------------------------- reductions and subsets


def _check(norm: str, params_filter: ParamsFilter, method: str = "vmap") -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    if not callable(params_filter) and params_filter not in PARAM_SUBSETS:
        raise ValueError(f"unknown parameter subset {params_filter!r}; choose one of: {', '.join(PARAM_SUBSETS)}"
                         " or pass a callable params -> boolean mask")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")


def _mask(params: PyTree, params_filter: ParamsFilter) -> PyTree:
    return params_filter(params) if callable(params_filter) else subset_mask(params, params_filter)


def _check_nonempty(params: PyTree, params_filter: ParamsFilter) -> None:
    if not any(jax.tree.leaves(_mask(params, params_filter))):
        raise ValueError(f"parameter subset {params_filter!r} selects no parameters")


def _reduce(squares: jax.Array, norm: str) -> jax.Array:
    """(..., L) squared norms of the L parameter tensors -> (...) norms. Done outside the jitted engines,
    so that both reductions share one compiled program."""
    if norm == "global":
        return jnp.sqrt(jnp.sum(squares, axis=-1))
    return jnp.sum(jnp.sqrt(squares), axis=-1)


def _leaf_squares(grads: PyTree, batch_ndim: int = 1) -> jax.Array:
    """(*batch, L): squared norm of each of the L leaves over all but its leading `batch_ndim` axes."""
    leaves = jax.tree.leaves(grads)
    return jnp.stack([jnp.sum(jnp.square(g), axis=tuple(range(batch_ndim, g.ndim))) for g in leaves], axis=-1)


# --------------------------------------------------------------------------- chunks
# The engine runs over the pool through `jaxal.parallel.map_chunks` (fixed-size chunks, the last one
# padded and the padding dropped, one compilation); these are its per-chunk functions.


def _vmap_chunk(static, params, chunk):
    loss_fn, params_filter = static
    return _vmap_squares(loss_fn, params, chunk, params_filter=params_filter)


def _ghost_chunk(static, params, chunk):
    loss_fn, layers = static
    return _ghost_squares_jit(loss_fn, params, chunk, layers)


# --------------------------------------------------------------------------- the vmap(grad) path


@functools.partial(jax.jit, static_argnames=("loss_fn", "params_filter"))
def _vmap_squares(loss_fn, params, xs, params_filter):
    """(N, L) squared per-example gradient norms of the L selected tensors, by `vmap(grad)`; only the
    selected parameters are differentiated (a last-layer subset needs no backward pass into the body)."""
    selected, rest = partition(params, _mask(params, params_filter))
    grads = jax.vmap(jax.grad(lambda sel, x: loss_fn(combine(sel, rest), x)), (None, 0))(selected, xs)
    return _leaf_squares(grads)


# --------------------------------------------------------------------------- the ghost path


def _conv_settings(module: nn.Conv):
    kernel_size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    rank = len(kernel_size)
    bcast = lambda v: (1,) * rank if v is None else (v,) * rank if isinstance(v, int) else tuple(v)  # noqa: E731
    padding = nn.linear.canonicalize_padding(module.padding, rank)
    return kernel_size, bcast(module.strides), bcast(module.kernel_dilation), bcast(module.input_dilation), padding


def _is_plain_conv(module: nn.Conv, x: jax.Array) -> bool:
    """Whether `_conv_patches` reproduces this convolution: one batch axis, shared weights, no groups,
    mask, input dilation or circular/reflect/causal padding."""
    kernel_size, _, _, input_dilation, padding = _conv_settings(module)
    return (module.feature_group_count == 1 and module.mask is None and module.shared_weights
            and x.ndim == len(kernel_size) + 2 and set(input_dilation) == {1}
            and padding not in ("CIRCULAR", "REFLECT", "CAUSAL"))


def _conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
    """(N, T, K): the input patch of every output position, so that the convolution is
    `patches @ kernel.reshape(K, F)` up to a permutation of K (which no norm sees)."""
    kernel_size, strides, dilation, _, padding = _conv_settings(module)
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out = [(n - (k - 1) * d - 1) // s + 1 for n, k, d, s in zip(x.shape[1:-1], kernel_size, dilation, strides)]
    # Strided slices, one per kernel offset: a copy of the input, where a convolution with a one-hot kernel
    # (lax.conv_general_dilated_patches) would cost K times the layer's own multiply-adds.
    views = []
    for offset in np.ndindex(*kernel_size):
        start = [0] + [o * d for o, d in zip(offset, dilation)] + [0]
        limit = [x.shape[0]] + [st + (m - 1) * s + 1 for st, m, s in zip(start[1:], out, strides)] + [x.shape[-1]]
        views.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
    patches = jnp.stack(views, axis=-2)  # (N, *out, prod(kernel_size), C)
    return patches.reshape(x.shape[0], math.prod(out), -1)


def _outer_sum_squares(a: jax.Array, d: jax.Array) -> jax.Array:
    """Per-example `||sum_t a_t d_t^T||_F^2` for a (N, T, K), d (N, T, F): materialise the (K, F) gradient
    (cost T*K*F) or use the Gram matrices (cost T*T*(K+F)), whichever is cheaper for this layer."""
    _, t, k = a.shape
    f = d.shape[-1]
    if t * k * f <= t * t * (k + f):
        return jnp.sum(jnp.square(jnp.einsum("ntk,ntf->nkf", a, d)), axis=(1, 2))
    return jnp.sum(jnp.einsum("ntk,nsk->nts", a, a) * jnp.einsum("ntf,nsf->nts", d, d), axis=(1, 2))


def _batch_norm_xhat(module: nn.BatchNorm, x: jax.Array, args, kwargs) -> tuple[jax.Array, tuple[int, ...]]:
    use_running_average = kwargs.get("use_running_average", args[0] if args else None)
    if not nn.merge_param("use_running_average", module.use_running_average, use_running_average):
        raise ValueError(f"method='ghost' needs BatchNorm in inference mode; {'/'.join(module.path)} is in "
                         "train mode")
    axes = (module.axis,) if isinstance(module.axis, int) else module.axis
    feature_axes = tuple(sorted(a % x.ndim for a in axes))
    stats_shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    mean = module.get_variable("batch_stats", "mean").reshape(stats_shape)
    var = module.get_variable("batch_stats", "var").reshape(stats_shape)
    return (x - mean) * jax.lax.rsqrt(var + module.epsilon), feature_axes


def _supported(context, x) -> bool:
    """Layers whose per-example parameter gradients the ghost path forms; the others pass through, and
    any parameter of theirs in the subset is reported missing."""
    module = context.module
    return context.method_name == "__call__" and (
        type(module) in (nn.Dense, nn.BatchNorm) or (type(module) is nn.Conv and _is_plain_conv(module, x)))


class _Layer(NamedTuple):
    """What the ghost path records about one layer while tracing (static facts only)."""

    kind: str  # "dense" (Dense, or Conv as a Dense on patches) or "batch_norm"
    names: tuple[str, ...]  # its parameters
    feature_axes: tuple[int, ...] = ()


def _layer_inputs(params, xs, loss: ExampleLoss, eps, layers: dict, wanted: Optional[frozenset] = None):
    """Batched forward pass with `eps[path]` added to the output of every Dense/Conv/BatchNorm layer in
    `wanted` (None: every one), so that the gradient with respect to eps is each example's output
    gradient. Returns (sum of losses, inputs), where inputs[path] is what the layer's parameter gradient
    is formed from: the Dense input, the Conv patches, or the normalised BatchNorm input. Fills `layers`
    with static facts at trace time. Layers outside `wanted` run unchanged and record nothing."""
    inputs = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        key = "/".join(module.path)
        if not _supported(context, args[0] if args else None) or (wanted is not None and key not in wanted):
            return next_fun(*args, **kwargs)
        if key in inputs:
            raise ValueError(f"method='ghost' needs each layer called once per forward pass; {key} is shared: "
                             "use method='vmap'")
        x = args[0]
        if type(module) is nn.Dense:
            inputs[key] = x.reshape(x.shape[0], -1, x.shape[-1])
            layers[key] = _Layer("dense", ("kernel",) + (("bias",) if module.use_bias else ()))
        elif type(module) is nn.Conv:
            inputs[key] = _conv_patches(module, x)
            layers[key] = _Layer("dense", ("kernel",) + (("bias",) if module.use_bias else ()))
        else:
            inputs[key], axes = _batch_norm_xhat(module, x, args[1:], kwargs)
            names = (("scale",) if module.use_scale else ()) + (("bias",) if module.use_bias else ())
            layers[key] = _Layer("batch_norm", names, axes)
        y = next_fun(*args, **kwargs)
        return y if eps is None else y + eps[key]

    with nn.intercept_methods(interceptor):
        losses = loss.batch_losses(params, xs)
    return jnp.sum(losses), inputs


def _ghost_squares(loss: ExampleLoss, params, xs, wanted: Optional[frozenset] = None
                   ) -> dict[tuple[str, ...], jax.Array]:
    """{parameter path: (N,) squared norms of the per-example gradient} for every parameter of a
    supported layer in `wanted` (layer paths "a/b"; None: every layer), from one batched forward pass
    and one backward pass to the outputs of those layers only. The output perturbations are injected at
    the wanted layers alone, so autodiff stops at the earliest of them: a last-layer subset costs a
    forward pass and the head's backward, not a backward pass through the whole network."""
    layers: dict[str, _Layer] = {}
    shapes = {}

    def output_shapes(p, x):
        # Record the output shapes (for eps) with a forward pass that only has its shapes evaluated.
        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            key = "/".join(context.module.path)
            if _supported(context, args[0] if args else None) and (wanted is None or key in wanted):
                shapes[key] = jax.ShapeDtypeStruct(y.shape, y.dtype)
            return y

        with nn.intercept_methods(interceptor):
            return loss.batch_losses(p, x)

    jax.eval_shape(output_shapes, params, xs)
    eps = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    grad_fn = jax.grad(lambda e: _layer_inputs(params, xs, loss, e, layers, wanted), has_aux=True)
    deltas, inputs = grad_fn(eps)

    squares = {}
    for key, layer in layers.items():
        path, a, d = tuple(key.split("/")), inputs[key], deltas[key]
        n = d.shape[0]
        if layer.kind == "dense":
            d = d.reshape(n, -1, d.shape[-1])
            squares[path + ("kernel",)] = _outer_sum_squares(a, d)
            if "bias" in layer.names:
                squares[path + ("bias",)] = jnp.sum(jnp.square(jnp.sum(d, axis=1)), axis=1)
        else:  # batch norm: y = xhat * scale + bias, summed over the non-feature axes of one example
            other = tuple(i for i in range(1, d.ndim) if i not in layer.feature_axes)
            if "scale" in layer.names:
                squares[path + ("scale",)] = _leaf_squares([jnp.sum(d * a, axis=other)])[:, 0]
            if "bias" in layer.names:
                squares[path + ("bias",)] = _leaf_squares([jnp.sum(d, axis=other)])[:, 0]
    return squares


# One program per loss and set of wanted layers (the subset); both norms reduce the same squares.
_ghost_squares_jit = jax.jit(_ghost_squares, static_argnums=(0, 3))


def _wanted_layers(params: PyTree, params_filter: ParamsFilter) -> frozenset:
    """The paths ("a/b") of the layers that own a selected parameter."""
    mask = traverse_util.flatten_dict(_mask(params, params_filter))
    return frozenset("/".join(path[:-1]) for path, m in mask.items() if m)


def _ghost_selection(covered, params: PyTree, params_filter: ParamsFilter) -> list[tuple[str, ...]]:
    """Paths of the selected parameters; raises if the ghost path has no squares for one of them."""
    mask = traverse_util.flatten_dict(_mask(params, params_filter))
    missing = _uncovered(covered, mask)
    if missing:
        raise ValueError("method='ghost' handles flax Dense, Conv (plain: no groups, mask, input dilation or "
                         "circular/reflect/causal padding) and BatchNorm layers only; no per-example gradient for "
                         f"{['/'.join(p) for p in missing]}: use method='vmap' or a subset without them")
    return [path for path, m in mask.items() if m]


def _uncovered(covered, mask: dict) -> list[tuple[str, ...]]:
    return [path for path, m in mask.items() if m and path not in covered]


_FALLBACK_WARNED: set[str] = set()


def ghost_or_vmap(loss_fn: ExampleLoss, params: PyTree, xs: PyTree, params_filter: ParamsFilter = "all") -> str:
    """"ghost" when the ghost path forms the per-example gradient of every selected parameter of this
    model (its layers are flax Dense, plain Conv and BatchNorm, each called once), else "vmap", saying so
    once per process and model with a warning that names the layers. Decided from a shapes-only trace
    on one example of `xs`; the strategies use it so that any model runs (`jaxal.models`)."""
    one = jax.tree.map(lambda a: a[:1], xs)
    try:
        covered = jax.eval_shape(lambda p, x: _ghost_squares(loss_fn, p, x), params, one)
        missing = ["/".join(p) for p in _uncovered(covered, traverse_util.flatten_dict(_mask(params, params_filter)))]
        reason = f"it has no per-example gradient for {missing[:6]}{' ...' if len(missing) > 6 else ''}"
    except ValueError as error:  # a layer called twice per pass (shared weights)
        missing, reason = ["(shared layer)"], str(error)
    if not missing:
        return "ghost"
    message = (f"--gradnorm.method ghost handles flax Dense, plain Conv and BatchNorm layers; {reason}, so the "
               "per-example gradient norms of this model use method 'vmap' (the same norms, more memory per chunk: "
               "lower --gradnorm.chunk_size if it runs out)")
    if message not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return "vmap"


# --------------------------------------------------------------------------- public API


def per_example_grad_norms(loss_fn: Callable, params: PyTree, xs: PyTree, *, norm: str = "global",
                           params_filter: ParamsFilter = "all", chunk_size: int | None = None,
                           method: str = "vmap") -> jax.Array:
    """(N,) norms of `grad_theta loss_fn(params, x)` for every example x of `xs` (a pytree of arrays with
    a leading example axis; `loss_fn` receives one example without it).

    norm: "global" (L2 of the flattened gradient) or "layer_sum" (sum of per-tensor L2 norms).
    params_filter: a subset of `jaxal.pytree.PARAM_SUBSETS` or a callable params -> boolean mask.
    chunk_size: examples per compiled call, to bound memory (per-example gradients are chunk x |theta|).
    method: "vmap" (`vmap(grad)`, any loss) or "ghost" (`loss_fn` from `example_loss`, models of Dense,
      Conv and BatchNorm layers in inference mode; no per-example gradient is materialised).
    The parameters are not modified. `loss_fn` is a static argument of the jitted function, so reuse the
    same object to reuse the compiled code.
    """
    _check(norm, params_filter, method)
    if method == "ghost" and not isinstance(loss_fn, ExampleLoss):
        raise ValueError("method='ghost' needs the loss built by example_loss(apply_fn, loss_of_logits)")
    _check_nonempty(params, params_filter)
    if method == "ghost":
        # Find unsupported layers before any work, from a shapes-only trace on one example.
        one = jax.tree.map(lambda a: a[:1], xs)
        wanted = _wanted_layers(params, params_filter)
        covered = jax.eval_shape(lambda p, x: _ghost_squares(loss_fn, p, x, wanted), params, one)
        selection = _ghost_selection(covered, params, params_filter)
        squares = parallel.map_chunks(_ghost_chunk, (loss_fn, wanted), params, xs, chunk_size=chunk_size)
        return _reduce(jnp.stack([squares[path] for path in selection], axis=-1), norm)
    squares = parallel.map_chunks(_vmap_chunk, (loss_fn, params_filter), params, xs, chunk_size=chunk_size)
    return _reduce(squares, norm)
