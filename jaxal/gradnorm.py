"""Per-example gradient norms: the engine behind exp-gn, ent-gn, LPLgrad and EGL.

The score of an example x is a norm of `g(x) = grad_theta loss(theta, x)`, computed for every example of
the pool with `jax.vmap(jax.grad(loss))` inside one jitted function, with the model in inference mode
(BatchNorm running averages, no dropout), as the reference codes score each sample alone in eval mode.
Two reductions (docs/design.md, section 1):
  - "global": the L2 norm of the whole flattened gradient (what the theory's bound uses);
  - "layer_sum": the sum over parameter tensors of each tensor's L2 norm (what the reference codes rank by,
    `sum(p.grad.norm() for p in model.parameters())`).

`method="ghost"` computes the same norms without materialising per-example gradients: one batched forward
and backward pass with respect to the layer outputs gives each layer's input `a` and output gradient `d`
per example, and each layer's per-example weight gradient is `sum_t a_t d_t^T` over its positions t
(pixels for a convolution, via patches), whose squared norm is taken directly or, where cheaper, as
`sum_{t,s} (a_t . a_s)(d_t . d_s)` ("ghost norm"). The choice is made per layer from its shapes (T
positions, K inputs and F outputs per position): `method="ghost"` takes the one with fewer multiply-adds
(the (K, F) gradient costs T*K*F, the two Gram matrices T*T*(K+F)); `method="auto"` takes the one with the
smaller per-example intermediate, the mixed ghost clipping rule of Bu, Mao & Xu (NeurIPS 2022): the Gram
matrices where 2*T^2 <= K*F, the per-example gradient elsewhere (`layer_engines` lists the choices). It
supports models built from flax Dense, Conv, BatchNorm and GroupNorm; a Dense, Conv or GroupNorm may be
applied several times in one forward pass (a detector's head, once per pyramid level): its per-example
gradient is the sum over the calls, i.e. over the positions of all calls together. `method="vmap"` works
for any loss and is the reference the tests compare against. The
ghost pass honours the parameter subset: only the layers that own a selected parameter get an output
perturbation and have their inputs recorded, so the backward pass stops at the earliest of them (a
"last_layer" subset costs a forward pass and the head's backward). `method="mixed"` scores some layers
(`ghost_layers`) by ghost factors and the others by `vmap(grad)`, in one vmapped pass: a convolution over
many positions holds less as its (K, F) per-example gradient than as its patches, a wide dense layer less
as its input and output gradient than as its (K, F) gradient. `layer_costs` measures each layer both ways
with XLA's memory analysis, and `choose_engine` weighs vmap, ghost and mixed against a memory budget.

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
METHODS = ("vmap", "ghost", "auto")
# and the per-layer mixture of the two: a library engine and a candidate of `choose_engine` (the budget);
# not a `--gradnorm.method` of its own, as its layers come from compiling programs (`layer_costs`)
ENGINES = METHODS + ("mixed",)
LAYERWISE_METHODS = ("ghost", "auto")  # the methods that run the per-layer (ghost) engine

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
    labeled: bool = False

    def __call__(self, params, example) -> jax.Array:
        return self.batch_losses(params, jax.tree.map(lambda a: a[None], example))[0]

    def batch_losses(self, params, examples) -> jax.Array:
        """Losses of a batch from one forward pass; equal to per-example calls in inference mode."""
        xs, ys = examples if self.labeled else (examples, None)
        logits = self.apply_fn(params, xs).logits
        if self.labeled:
            return jax.vmap(self.loss_of_logits)(logits, ys)
        return jax.vmap(self.loss_of_logits)(logits)


def example_loss(apply_fn: Callable, loss_of_logits: Callable, *, labeled: bool = False) -> ExampleLoss:
    """`loss_fn(params, x) = loss_of_logits(apply_fn(params, x[None]).logits[0])`."""
    return ExampleLoss(apply_fn, loss_of_logits, labeled)


# --------------------------------------------------------------------------- reductions and subsets


def _check(norm: str, params_filter: ParamsFilter, method: str = "vmap") -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    if not callable(params_filter) and params_filter not in PARAM_SUBSETS:
        raise ValueError(f"unknown parameter subset {params_filter!r}; choose one of: {', '.join(PARAM_SUBSETS)}"
                         " or pass a callable params -> boolean mask")
    if method not in ENGINES:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(ENGINES)}")


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
    loss_fn, layers, method = static
    return _ghost_squares_jit(loss_fn, params, chunk, layers, method)


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


def uses_gram(t: int, k: int, f: int, method: str) -> bool:
    """Whether a layer of T positions, K inputs and F outputs per position gets its per-example norm from
    the Gram matrices (ghost norm) rather than from its materialised (K, F) gradient. "ghost": whichever
    needs fewer multiply-adds (T*T*(K+F) against T*K*F); "auto": whichever holds less per example (2*T^2
    against K*F), Bu et al.'s mixed ghost clipping rule (their code: `use_gc = 2*T**2 <= d*p`)."""
    if method == "auto":
        return 2 * t * t <= k * f
    return t * k * f > t * t * (k + f)


def _outer_sum_squares(a: jax.Array, d: jax.Array, method: str = "ghost") -> jax.Array:
    """Per-example `||sum_t a_t d_t^T||_F^2` for a (N, T, K), d (N, T, F): materialise the (K, F) gradient
    or use the Gram matrices, as `uses_gram` decides for this layer."""
    _, t, k = a.shape
    f = d.shape[-1]
    if not uses_gram(t, k, f, method):
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
        type(module) in (nn.Dense, nn.BatchNorm) or (type(module) is nn.Conv and _is_plain_conv(module, x))
        or (type(module) is nn.GroupNorm and _is_plain_group_norm(module)))


def _is_plain_group_norm(module: nn.GroupNorm) -> bool:
    """GroupNorm over all of one example's axes (flax's default), by `num_groups`, one device."""
    return (module.reduction_axes is None and module.group_size is None and module.axis_name is None
            and module.num_groups is not None)


def _group_norm_xhat(module: nn.GroupNorm, x: jax.Array) -> jax.Array:
    """The normalised input of a GroupNorm (flax `GroupNorm.__call__`: statistics per example and group over
    all other axes; `use_fast_variance`: E[x^2] - E[x]^2 clipped at 0), so that y = xhat * scale + bias."""
    groups = module.num_groups
    g = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = jnp.mean(g, axes, keepdims=True)
    if module.use_fast_variance:
        var = jnp.maximum(jnp.mean(jnp.square(g), axes, keepdims=True) - jnp.square(mean), 0)
    else:
        var = jnp.mean(jnp.square(g - mean), axes, keepdims=True)
    return ((g - mean) * jax.lax.rsqrt(var + module.epsilon)).reshape(x.shape)


class _Layer(NamedTuple):
    """What the ghost path records about one layer while tracing (static facts only)."""

    kind: str  # "dense" (Dense, or Conv as a Dense on patches), "batch_norm" or "group_norm"
    names: tuple[str, ...]  # its parameters
    feature_axes: tuple[int, ...] = ()


def _layer_inputs(params, xs, loss: ExampleLoss, eps, layers: dict, wanted: Optional[frozenset] = None):
    """Batched forward pass with `eps[path]` added to the output of every Dense/Conv/BatchNorm layer in
    `wanted` (None: every one), so that the gradient with respect to eps is each example's output
    gradient. Returns (sum of losses, inputs), where inputs[path] is what the layer's parameter gradient
    is formed from: the Dense input, the Conv patches, or the normalised BatchNorm/GroupNorm input, one
    entry per CALL of the layer (a Dense, Conv or GroupNorm applied several times with the same weights,
    as FCOS's head once per pyramid level, has several; eps[path] is a list with one array per call).
    Fills `layers` with static facts at trace time. Layers outside `wanted` run unchanged and record
    nothing."""
    inputs = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        key = "/".join(module.path)
        if not _supported(context, args[0] if args else None) or (wanted is not None and key not in wanted):
            return next_fun(*args, **kwargs)
        if key in inputs and type(module) is nn.BatchNorm:
            raise ValueError(f"method='ghost' needs each BatchNorm called once per forward pass; {key} is shared: "
                             "use method='vmap'")
        x = args[0]
        calls = inputs.setdefault(key, [])
        if type(module) is nn.Dense:
            calls.append(x.reshape(x.shape[0], -1, x.shape[-1]))
            layers[key] = _Layer("dense", ("kernel",) + (("bias",) if module.use_bias else ()))
        elif type(module) is nn.Conv:
            calls.append(_conv_patches(module, x))
            layers[key] = _Layer("dense", ("kernel",) + (("bias",) if module.use_bias else ()))
        elif type(module) is nn.GroupNorm:
            calls.append(_group_norm_xhat(module, x))
            names = (("scale",) if module.use_scale else ()) + (("bias",) if module.use_bias else ())
            layers[key] = _Layer("group_norm", names, (x.ndim - 1,))
        else:
            xhat, axes = _batch_norm_xhat(module, x, args[1:], kwargs)
            calls.append(xhat)
            names = (("scale",) if module.use_scale else ()) + (("bias",) if module.use_bias else ())
            layers[key] = _Layer("batch_norm", names, axes)
        y = next_fun(*args, **kwargs)
        return y if eps is None else y + eps[key][len(calls) - 1]

    with nn.intercept_methods(interceptor):
        losses = loss.batch_losses(params, xs)
    return jnp.sum(losses), inputs


def _ghost_squares(loss: ExampleLoss, params, xs, wanted: Optional[frozenset] = None, method: str = "ghost"
                   ) -> dict[tuple[str, ...], jax.Array]:
    """{parameter path: (N,) squared norms of the per-example gradient} for every parameter of a
    supported layer in `wanted` (layer paths "a/b"; None: every layer), from one batched forward pass
    and one backward pass to the outputs of those layers only. The output perturbations are injected at
    the wanted layers alone, so autodiff stops at the earliest of them: a last-layer subset costs a
    forward pass and the head's backward, not a backward pass through the whole network. `method`: the
    per-layer rule of `uses_gram`."""
    layers: dict[str, _Layer] = {}
    eps = _zero_perturbations(loss, params, xs, wanted)
    grad_fn = jax.grad(lambda e: _layer_inputs(params, xs, loss, e, layers, wanted), has_aux=True)
    deltas, inputs = grad_fn(eps)
    return _factor_squares(layers, inputs, deltas, method)


def _zero_perturbations(loss: ExampleLoss, params, xs, wanted: Optional[frozenset]) -> dict[str, list]:
    """{layer path: [zeros shaped like the output of each call]} for the supported layers in `wanted`
    (None: every one): the eps of `_layer_inputs`, shaped by a forward pass whose shapes alone are evaluated."""
    shapes = {}

    def output_shapes(p, x):
        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            key = "/".join(context.module.path)
            if _supported(context, args[0] if args else None) and (wanted is None or key in wanted):
                shapes.setdefault(key, []).append(jax.ShapeDtypeStruct(y.shape, y.dtype))
            return y

        with nn.intercept_methods(interceptor):
            return loss.batch_losses(p, x)

    jax.eval_shape(output_shapes, params, xs)
    return {k: [jnp.zeros(s.shape, s.dtype) for s in calls] for k, calls in shapes.items()}


def _factor_squares(layers: dict[str, _Layer], inputs: dict, deltas: dict, method: str
                    ) -> dict[tuple[str, ...], jax.Array]:
    """{parameter path: (N,) squared per-example gradient norms} of the recorded layers, from each layer's
    inputs (`_layer_inputs`) and output gradients (the gradient with respect to its eps); `method`: the
    per-layer rule of `uses_gram`. Shared by the ghost and the mixed engines."""
    squares = {}
    for key, layer in layers.items():
        path = tuple(key.split("/"))
        n = deltas[key][0].shape[0]
        if layer.kind == "dense":
            # A layer applied several times: its per-example gradient sums `a_t d_t^T` over the positions
            # of every call, i.e. over the calls' positions concatenated.
            a = jnp.concatenate(inputs[key], axis=1)
            d = jnp.concatenate([dk.reshape(n, -1, dk.shape[-1]) for dk in deltas[key]], axis=1)
            squares[path + ("kernel",)] = _outer_sum_squares(a, d, method)
            if "bias" in layer.names:
                squares[path + ("bias",)] = jnp.sum(jnp.square(jnp.sum(d, axis=1)), axis=1)
        else:  # batch/group norm: y = xhat * scale + bias, summed over the non-feature axes and the calls
            def summed(term):
                parts = []
                for a, d in zip(inputs[key], deltas[key]):
                    other = tuple(i for i in range(1, d.ndim) if i not in layer.feature_axes)
                    parts.append(jnp.sum(term(a, d), axis=other))
                return sum(parts)

            if "scale" in layer.names:
                squares[path + ("scale",)] = _leaf_squares([summed(lambda a, d: d * a)])[:, 0]
            if "bias" in layer.names:
                squares[path + ("bias",)] = _leaf_squares([summed(lambda a, d: d)])[:, 0]
    return squares


# One program per loss and set of wanted layers (the subset); both norms reduce the same squares.
_ghost_squares_jit = jax.jit(_ghost_squares, static_argnums=(0, 3, 4))


# --------------------------------------------------------------------------- the mixed path (engine per layer)
# Each layer scored by the engine that holds less for it (`layer_costs`): vmap for the "vmap" layers (their
# per-example gradient, small for a convolution: K*F), ghost factors for the others (a dense layer's input
# and output gradient, K + F, instead of its K x F per-example gradient). One `vmap` over the chunk's
# examples, each at batch 1 through `_layer_inputs`, differentiated with respect to the vmap layers'
# selected parameters and the ghost layers' output perturbations together.

MIXED_GHOST_RULE = "auto"  # the ghost layers' `uses_gram` rule: the smaller per-example intermediate


def _mask_layers(mask: PyTree, keep: Callable[[str], bool]) -> PyTree:
    """`mask` with False wherever the owning layer's path ("a/b") fails `keep` (same tree structure)."""
    return jax.tree_util.tree_map_with_path(
        lambda keys, m: bool(m) and keep("/".join(str(k.key) for k in keys[:-1])), mask)


def _mixed_squares(loss: ExampleLoss, params, xs, params_filter: ParamsFilter, ghost_layers: frozenset
                   ) -> dict[tuple[str, ...], jax.Array]:
    """{parameter path: (N,) squared per-example gradient norms} of every selected parameter: those of the
    `ghost_layers` from their inputs and output gradients (`_factor_squares`), the others from their
    per-example gradients (`vmap(grad)`), in one vmapped backward pass per example."""
    by_vmap = _mask_layers(_mask(params, params_filter), lambda layer: layer not in ghost_layers)
    selected, rest = partition(params, by_vmap)
    eps = _zero_perturbations(loss, params, jax.tree.map(lambda a: a[:1], xs), ghost_layers)
    layers: dict[str, _Layer] = {}

    def example_squares(example):
        batch = jax.tree.map(lambda a: a[None], example)
        (grads, deltas), inputs = jax.grad(
            lambda sel, e: _layer_inputs(combine(sel, rest), batch, loss, e, layers, ghost_layers),
            argnums=(0, 1), has_aux=True)(selected, eps)
        squares = {path: jnp.sum(jnp.square(g)) for path, g in traverse_util.flatten_dict(grads).items()
                   if g is not None}
        squares.update({path: sq[0] for path, sq in _factor_squares(layers, inputs, deltas,
                                                                    MIXED_GHOST_RULE).items()})
        return squares

    return jax.vmap(example_squares)(xs)


_mixed_squares_jit = jax.jit(_mixed_squares, static_argnums=(0, 3, 4))


def _mixed_chunk(static, params, chunk):
    loss_fn, params_filter, ghost_layers = static
    return _mixed_squares_jit(loss_fn, params, chunk, params_filter, ghost_layers)


def _ghost_supported_layers(loss_fn: ExampleLoss, params: PyTree, one: PyTree, params_filter: ParamsFilter
                            ) -> frozenset:
    """The layers owning a selected parameter whose every selected parameter the ghost path covers, from
    shapes-only traces on one example (layer by layer where the whole model's trace refuses, e.g. a shared
    BatchNorm)."""
    mask = traverse_util.flatten_dict(_mask(params, params_filter))
    wanted = _wanted_layers(params, params_filter)

    def covered_by(layers):
        try:
            return set(jax.eval_shape(lambda p, x: _ghost_squares(loss_fn, p, x, layers), params, one))
        except ValueError:
            return None

    covered = covered_by(wanted)
    if covered is None:
        covered = set().union(*(covered_by(frozenset({layer})) or set() for layer in wanted))
    return frozenset(layer for layer in wanted
                     if all(path in covered for path, m in mask.items() if m and "/".join(path[:-1]) == layer))


class LayerCost(NamedTuple):
    """XLA's temporary bytes per example of the mixed program with one layer by each engine, every other
    layer by vmap (`layer_costs`)."""

    vmap: int  # this layer by vmap too: the all-vmap program, the same for every layer
    ghost: Optional[int]  # this layer by ghost factors; None: the ghost path does not handle it

    @property
    def engine(self) -> str:
        return "ghost" if self.ghost is not None and self.ghost < self.vmap else "vmap"


def layer_costs(loss_fn: ExampleLoss, params: PyTree, xs: PyTree, params_filter: ParamsFilter = "all",
                norm: str = "global") -> dict[str, LayerCost]:
    """{layer path "a/b": LayerCost} for every layer owning a selected parameter, in the forward pass' order:
    the mixed program with no ghost layer (vmap) and with that layer alone by ghost, each compiled at
    chunks of 1 and 2 examples shaped like `xs`', and the difference of XLA's temporaries read: what
    scoring the layer by ghost factors saves or adds per example where everything else is scored by vmap
    (2 compilations, and 2 per layer the ghost path handles; remembered per loss, shapes and subset by
    `compiled_temp_bytes`). A layer measured within the whole program, not alone: the peak of a program
    is not the sum of its layers' (a program scoring only a convolution by vmap holds its backward pass,
    and the patches a ghost layer records stay live through the whole backward pass of the others). The
    mixed engine scores each layer by its `LayerCost.engine`."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), xs)
    supported = _ghost_supported_layers(loss_fn, params, one, params_filter)
    selected = _wanted_layers(params, params_filter)
    called = [layer for layer in _zero_perturbations(loss_fn, params, one, None) if layer in selected]
    order = called + sorted(selected - set(called))  # the forward pass's order, then the unsupported layers

    def per_example(ghost_layers):
        temps = [compiled_temp_bytes(loss_fn, params, jax.tree.map(
            lambda a, n=n: jax.ShapeDtypeStruct((n, *a.shape[1:]), a.dtype), xs), "mixed", norm=norm,
            params_filter=params_filter, ghost_layers=ghost_layers) for n in (1, 2)]
        return temps[1] - temps[0]

    by_vmap = per_example(frozenset())
    return {layer: LayerCost(by_vmap, per_example(frozenset({layer})) if layer in supported else None)
            for layer in order}


def mixed_ghost_layers(costs: dict[str, LayerCost]) -> frozenset:
    """The layers the mixed engine scores by ghost factors: those where XLA says ghost holds less."""
    return frozenset(layer for layer, cost in costs.items() if cost.engine == "ghost")


def describe_assignment(costs: dict[str, LayerCost]) -> str:
    """"vmap for conv1_1..conv3_2, ghost for fc1, fc2": each engine's layers, runs of three or more
    consecutive layers (in the order of `costs`) written first..last."""
    runs: list[tuple[str, list[str]]] = []
    for layer, cost in costs.items():
        if runs and runs[-1][0] == cost.engine:
            runs[-1][1].append(layer)
        else:
            runs.append((cost.engine, [layer]))
    parts = {}
    for engine, layers in runs:
        text = f"{layers[0]}..{layers[-1]}" if len(layers) >= 3 else ", ".join(layers)
        parts.setdefault(engine, []).append(text)
    return ", ".join(f"{engine} for {', '.join(texts)}" for engine, texts in parts.items())


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
                         "circular/reflect/causal padding), BatchNorm and GroupNorm layers only; no per-example "
                         "gradient for "
                         f"{['/'.join(p) for p in missing]}: use method='vmap' or a subset without them")
    return [path for path, m in mask.items() if m]


def _uncovered(covered, mask: dict) -> list[tuple[str, ...]]:
    return [path for path, m in mask.items() if m and path not in covered]


_FALLBACK_WARNED: set[str] = set()


def ghost_or_vmap(loss_fn: ExampleLoss, params: PyTree, xs: PyTree, params_filter: ParamsFilter = "all",
                  method: str = "ghost") -> str:
    """`method` ("ghost" or "auto") when the ghost path forms the per-example gradient of every selected
    parameter of this model (its layers are flax Dense, plain Conv, GroupNorm and BatchNorm, each BatchNorm
    called once), else "vmap", saying so once per process and model with a warning that names the layers.
    Decided from a shapes-only trace on one example of `xs`; the strategies use it so that any model runs
    (`jaxal.models`)."""
    one = jax.tree.map(lambda a: a[:1], xs)
    try:
        covered = jax.eval_shape(lambda p, x: _ghost_squares(loss_fn, p, x), params, one)
        missing = ["/".join(p) for p in _uncovered(covered, traverse_util.flatten_dict(_mask(params, params_filter)))]
        reason = f"it has no per-example gradient for {missing[:6]}{' ...' if len(missing) > 6 else ''}"
    except ValueError as error:  # a BatchNorm called twice per pass (shared weights)
        missing, reason = ["(shared layer)"], str(error)
    if not missing:
        return method
    message = (f"--gradnorm.method {method} handles flax Dense, plain Conv, BatchNorm and GroupNorm layers; {reason}, "
               "so the "
               "per-example gradient norms of this model use method 'vmap' (the same norms, more memory per chunk: "
               "lower --gradnorm.chunk_size if it runs out)")
    if message not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return "vmap"


# --------------------------------------------------------------------------- public API


def per_example_grad_norms(loss_fn: Callable, params: PyTree, xs: PyTree, *, norm: str = "global",
                           params_filter: ParamsFilter = "all", chunk_size: int | None = None,
                           method: str = "vmap", ghost_layers: Optional[frozenset] = None) -> jax.Array:
    """(N,) norms of `grad_theta loss_fn(params, x)` for every example x of `xs` (a pytree of arrays with
    a leading example axis; `loss_fn` receives one example without it).

    norm: "global" (L2 of the flattened gradient) or "layer_sum" (sum of per-tensor L2 norms).
    params_filter: a subset of `jaxal.pytree.PARAM_SUBSETS` or a callable params -> boolean mask.
    chunk_size: examples per compiled call, to bound memory (per-example gradients are chunk x |theta|).
    method: "vmap" (`vmap(grad)`, any loss), or "ghost" or "auto" (`loss_fn` from `example_loss`, models of
      Dense, Conv and BatchNorm layers in inference mode; no per-example gradient of the whole model is
      materialised; the two differ in the per-layer rule, `uses_gram`), or "mixed": the layers in
      `ghost_layers` (paths "a/b") by the ghost engine, every other selected parameter by vmap, in one pass
      (`_mixed_squares`); `ghost_layers=None`: the layers where XLA's memory analysis finds ghost the
      smaller (`layer_costs`, which compiles programs: pass `ghost_layers` when calling inside jit).
    The parameters are not modified. `loss_fn` is a static argument of the jitted function, so reuse the
    same object to reuse the compiled code.
    """
    _check(norm, params_filter, method)
    if method != "vmap" and not isinstance(loss_fn, ExampleLoss):
        raise ValueError(f"method={method!r} needs the loss built by example_loss(apply_fn, loss_of_logits)")
    if ghost_layers is not None and method != "mixed":
        raise ValueError(f"ghost_layers is an argument of method='mixed', not {method!r}")
    _check_nonempty(params, params_filter)
    if method == "mixed":
        ghost_layers = _checked_ghost_layers(loss_fn, params, xs, params_filter, norm, ghost_layers)
        squares = parallel.map_chunks(_mixed_chunk, (loss_fn, params_filter, ghost_layers), params, xs,
                                      chunk_size=chunk_size)
        selection = [path for path, m in traverse_util.flatten_dict(_mask(params, params_filter)).items() if m]
        return _reduce(jnp.stack([squares[path] for path in selection], axis=-1), norm)
    if method in LAYERWISE_METHODS:
        # Find unsupported layers before any work, from a shapes-only trace on one example.
        one = jax.tree.map(lambda a: a[:1], xs)
        wanted = _wanted_layers(params, params_filter)
        covered = jax.eval_shape(lambda p, x: _ghost_squares(loss_fn, p, x, wanted), params, one)
        selection = _ghost_selection(covered, params, params_filter)
        squares = parallel.map_chunks(_ghost_chunk, (loss_fn, wanted, method), params, xs, chunk_size=chunk_size)
        return _reduce(jnp.stack([squares[path] for path in selection], axis=-1), norm)
    squares = parallel.map_chunks(_vmap_chunk, (loss_fn, params_filter), params, xs, chunk_size=chunk_size)
    return _reduce(squares, norm)


def _checked_ghost_layers(loss_fn: ExampleLoss, params: PyTree, xs: PyTree, params_filter: ParamsFilter,
                          norm: str, ghost_layers: Optional[frozenset]) -> frozenset:
    """The mixed engine's ghost layers: as given (those owning a selected parameter; an unknown or
    unsupported layer is refused), or from XLA's per-layer analysis where None."""
    if ghost_layers is None:
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
            raise ValueError("method='mixed' inside a jitted function needs ghost_layers (mixed_ghost_layers("
                             "layer_costs(...)) computed outside it): choosing them compiles programs")
        return mixed_ghost_layers(layer_costs(loss_fn, params, xs, params_filter, norm))
    if isinstance(ghost_layers, str):
        raise ValueError(f"ghost_layers must be a collection of layer paths, not the string {ghost_layers!r}")
    one = jax.tree.map(lambda a: a[:1], xs)
    wanted = _wanted_layers(params, params_filter)
    unsupported = sorted(set(ghost_layers) - _ghost_supported_layers(loss_fn, params, one, params_filter))
    if unsupported:
        raise ValueError(f"ghost_layers {unsupported} are not layers owning a selected parameter that the ghost "
                         f"path handles (flax Dense, plain Conv, BatchNorm, GroupNorm); the selected layers: "
                         f"{sorted(wanted)}")
    return frozenset(ghost_layers)


class LayerEngine(NamedTuple):
    """How the ghost path forms one Dense/Conv layer's per-example kernel norm (`layer_engines`)."""

    positions: int  # T: 1 for a Dense on vectors, the output pixels of a convolution
    inputs: int  # K per position: the Dense input width, the Conv patch size (kernel pixels x channels)
    outputs: int  # F per position
    gram: bool  # True: ghost norm from the two (T, T) Gram matrices; False: the (K, F) gradient itself


def layer_engines(loss_fn: ExampleLoss, params: PyTree, xs: PyTree, method: str = "auto",
                  params_filter: ParamsFilter = "all") -> dict[str, LayerEngine]:
    """{layer path "a/b": LayerEngine} of every Dense/Conv layer the ghost path handles for `method`
    ("ghost" or "auto"), from a shapes-only trace on one example of `xs` (what the benchmark prints)."""
    if method not in LAYERWISE_METHODS:
        raise ValueError(f"layer_engines describes the methods {', '.join(LAYERWISE_METHODS)}, not {method!r}")
    one = jax.tree.map(lambda a: a[:1], xs)
    wanted = _wanted_layers(params, params_filter)
    layers: dict[str, _Layer] = {}
    _, inputs = jax.eval_shape(lambda p, x: _layer_inputs(p, x, loss_fn, None, layers, wanted), params, one)
    flat = traverse_util.flatten_dict(params)
    engines = {}
    for key, layer in layers.items():
        if layer.kind == "dense":
            t = sum(call.shape[1] for call in inputs[key])  # positions of every call of the layer
            k = inputs[key][0].shape[2]
            f = flat[tuple(key.split("/")) + ("kernel",)].shape[-1]
            engines[key] = LayerEngine(t, k, f, uses_gram(t, k, f, method))
    return engines


# --------------------------------------------------------------------------- engine and chunk from XLA's memory


class EngineChoice(NamedTuple):
    """`choose_engine`'s answer: the engine and chunk size to score with, and what XLA said of each engine."""

    method: str
    chunk_size: int
    fits: bool  # False: nothing fits the budget; the smallest candidate (chunk 1 of the smaller engine)
    # {method: (temp bytes at chunk 1, extra temp bytes per example, largest chunk under the budget or 0)}
    engines: dict[str, tuple[int, int, int]]
    # with a "mixed" candidate: its ghost layers (`ghost_layers` of the engine) and each layer's bytes
    ghost_layers: frozenset = frozenset()
    layers: Optional[dict[str, LayerCost]] = None

    def describe(self) -> str:
        parts = [f"{m} {base / 2**20:.1f} MiB + {per / 2**20:.2f} MiB/example (chunk {chunk or '-'})"
                 for m, (base, per, chunk) in self.engines.items()]
        verdict = "" if self.fits else ", none fits the budget"
        layers = f"; mixed: {describe_assignment(self.layers)}" if self.layers else ""
        return (f"gradient norms by {self.method}, chunks of {self.chunk_size} (XLA temp memory: {'; '.join(parts)}"
                f"{verdict}{layers})")


def compiled_temp_bytes(loss_fn: ExampleLoss, params: PyTree, xs: PyTree, method: str, *, norm: str = "global",
                        params_filter: ParamsFilter = "all", ghost_layers: Optional[frozenset] = None) -> int:
    """XLA's temporary buffers of the compiled program scoring ONE chunk shaped like `xs` with `method`
    (`memory_analysis().temp_size_in_bytes`; compiled from shapes, nothing runs: arrays or
    `jax.ShapeDtypeStruct`s). Remembered per loss, shapes and options: the program depends on nothing else."""
    leaves, treedef = jax.tree.flatten(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, xs)))
    return _temp_bytes(loss_fn, treedef, tuple(leaves), method, norm, params_filter, ghost_layers)


@functools.lru_cache(maxsize=512)  # the programs of `layer_costs` too: 2 per layer
def _temp_bytes(loss_fn, treedef, leaves, method, norm, params_filter, ghost_layers) -> int:
    def program(p, x):
        return per_example_grad_norms(loss_fn, p, x, norm=norm, params_filter=params_filter, method=method,
                                      ghost_layers=ghost_layers)

    analysis = jax.jit(program).lower(*jax.tree.unflatten(treedef, leaves)).compile().memory_analysis()
    if analysis is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis to choose an engine from")
    return int(analysis.temp_size_in_bytes)


def choose_engine(loss_fn: ExampleLoss, params: PyTree, xs: PyTree, budget_bytes: float, *,
                  methods: tuple[str, ...] = ("vmap", "ghost"), max_chunk: int = 256, norm: str = "global",
                  params_filter: ParamsFilter = "all") -> EngineChoice:
    """The engine of `methods` and the chunk size to score examples like `xs` with under `budget_bytes` of
    XLA temporaries. A chunk's temporaries are affine in its size (the per-example buffers scale with it,
    the rest does not), so each engine is compiled at chunks of 1 and 2 (shapes of `xs`' examples), the
    largest chunk up to `max_chunk` within the budget follows, and that chunk is compiled to confirm it
    (halved until it fits). The choice: the larger chunk (fewer compiled calls over a pool); equal chunks,
    the engine with the fewer bytes per example; still equal, the earlier of `methods`. Where no engine
    fits a chunk of 1: chunk 1 of the engine with the fewer bytes, `fits=False`.

    "mixed" among `methods`: each layer by the engine XLA finds smaller for it (`layer_costs`, reported in
    `EngineChoice.layers`), then the combined program like the others; dropped where the ghost path
    handles none of the selected layers (it would be vmap)."""
    def chunk_of(n):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape[1:]), a.dtype), xs)

    costs, ghost_layers = None, frozenset()
    if "mixed" in methods:
        costs = layer_costs(loss_fn, params, xs, params_filter, norm)
        ghost_layers = mixed_ghost_layers(costs)
        if all(cost.ghost is None for cost in costs.values()):
            methods, costs = tuple(m for m in methods if m != "mixed"), None

    def temp(method, n):
        return compiled_temp_bytes(loss_fn, params, chunk_of(n), method, norm=norm, params_filter=params_filter,
                                   ghost_layers=ghost_layers if method == "mixed" else None)

    engines = {}
    for method in methods:
        one, two = temp(method, 1), temp(method, 2)
        per_example = max(two - one, 1)
        chunk = 0 if one > budget_bytes else int(min(max_chunk, 1 + (budget_bytes - one) // per_example))
        while chunk > 2 and temp(method, chunk) > budget_bytes:  # confirm the extrapolation
            chunk //= 2
        engines[method] = (one, per_example, chunk)
    best = max(methods, key=lambda m: (engines[m][2], -engines[m][1]))
    mixed = dict(ghost_layers=ghost_layers if costs else frozenset(), layers=costs)
    if engines[best][2] == 0:
        smallest = min(methods, key=lambda m: engines[m][0])
        return EngineChoice(smallest, 1, False, engines, **mixed)
    return EngineChoice(best, engines[best][2], True, engines, **mixed)
