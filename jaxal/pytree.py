"""Parameter subsets and pytree vector arithmetic shared by the gradient and influence engines.

A subset is chosen by name, or by a function `params -> mask` (a pytree of bools, True where a tensor
belongs to the subset: e.g. a detector's three head kernels), of which the names are instances:
  - "all": every parameter (the reference codes of Wang et al. and LPLgrad);
  - "weights": tensors of rank > 1, i.e. no biases and no BatchNorm scales/offsets (ISAL);
  - "last_layer": the classifier layer, the subtree named `head` (see `jaxal.models`).
To differentiate with respect to a subset only, `partition` splits the parameters into the selected
leaves and the rest (the other side holds None), and `combine` puts them back together.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PARAM_SUBSETS = ("all", "weights", "last_layer")

PyTree = Any


def subset_mask(params: PyTree, subset: str | Callable[[PyTree], PyTree]) -> PyTree:
    """A pytree of bools, True where a parameter belongs to `subset` (a name, or a function of the
    parameters returning that mask)."""
    if callable(subset):
        return subset(params)
    if subset == "all":
        return jax.tree.map(lambda _: True, params)
    if subset == "weights":
        return jax.tree.map(lambda p: p.ndim > 1, params)
    if subset == "last_layer":
        if "head" not in params:
            raise ValueError("last_layer subset needs a top-level parameter group named 'head'")
        return {k: jax.tree.map(lambda _: k == "head", v) for k, v in params.items()}
    raise ValueError(f"unknown parameter subset {subset!r}; choose one of: {', '.join(PARAM_SUBSETS)}")


def partition(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """(selected, rest): the same structure twice, with None where a leaf belongs to the other side."""
    selected = jax.tree.map(lambda m, p: p if m else None, mask, params)
    rest = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return selected, rest


def combine(selected: PyTree, rest: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: b if a is None else a, selected, rest, is_leaf=lambda x: x is None)


def restrict(fn: Callable, params: PyTree, subset: str | Callable[[PyTree], PyTree]) -> tuple[Callable, PyTree]:
    """`(fn_of_subset, selected)` where `fn_of_subset(selected, *args) == fn(params, *args)`:
    the function to differentiate when only a subset of the parameters counts."""
    selected, rest = partition(params, subset_mask(params, subset))
    return (lambda sel, *args: fn(combine(sel, rest), *args)), selected


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(tree_dot(a, a))


def tree_add_scaled(a: PyTree, b: PyTree, scale) -> PyTree:
    """a + scale * b"""
    return jax.tree.map(lambda x, y: x + scale * y, a, b)


def tree_scale(a: PyTree, scale) -> PyTree:
    return jax.tree.map(lambda x: scale * x, a)


def tree_size(a: PyTree) -> int:
    return sum(x.size for x in jax.tree.leaves(a))
