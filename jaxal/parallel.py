"""Device meshes and the pool mapper that every scoring strategy goes through.

`map_chunks(fn, static, consts, xs, chunk_size=..., mesh=...)` applies `fn(static, consts, chunk)` to
fixed-size chunks of the pool and concatenates the results:
  - one compiled program for all chunks and all cycles: `fn` is a module-level function, `static`
    a hashable tuple of settings (the Flax model hashes by value), and the trained variables come in
    as `consts`, a traced argument, so new weights in a new cycle compile nothing;
  - the last chunk is padded by repeating its last example and the padding is dropped from the
    result, so a padded sample can never be ranked or selected;
  - with a mesh, each chunk is sharded over the `data` axis (the chunk size is rounded up to a
    multiple of the device count) and `consts` are replicated: the compiler splits the work.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

PyTree = Any


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (all of them by default), axis `data`."""
    devices = jax.devices()
    count = len(devices) if num_devices is None else num_devices
    if not 1 <= count <= len(devices):
        raise ValueError(f"asked for {count} devices, {len(devices)} available")
    return Mesh(np.array(devices[:count]), (DATA_AXIS,))


def mesh_size(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.devices.size


def replicate(tree: PyTree, mesh: Optional[Mesh]) -> PyTree:
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: PyTree, mesh: Optional[Mesh]) -> PyTree:
    """Place arrays with a leading example axis split over the mesh's `data` axis."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P(DATA_AXIS)))


def num_examples(xs: PyTree) -> int:
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(xs)}
    if len(sizes) != 1:
        raise ValueError(f"pool arrays disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    return jax.jit(fn, static_argnums=0)


def _pad_to(chunk: PyTree, size: int) -> PyTree:
    def pad(leaf):
        missing = size - leaf.shape[0]
        if missing == 0:
            return leaf
        return jnp.concatenate([jnp.asarray(leaf), jnp.repeat(jnp.asarray(leaf)[-1:], missing, axis=0)])

    return jax.tree.map(pad, chunk)


def map_chunks(fn: Callable, static: Any, consts: PyTree, xs: PyTree, *, chunk_size: int,
               mesh: Optional[Mesh] = None) -> PyTree:
    """Concatenation over the pool of `fn(static, consts, chunk)` (see the module docstring).
    `fn` must return arrays with a leading example axis."""
    n = num_examples(xs)
    if n == 0:
        raise ValueError("cannot score an empty pool")
    # Always the full chunk size, even for a small pool: one shape, hence one compilation, every cycle.
    size = round_up(chunk_size, mesh_size(mesh))
    compiled = _compiled(fn)
    consts = replicate(consts, mesh)
    outputs = []
    for start in range(0, n, size):
        chunk = jax.tree.map(lambda leaf: leaf[start:start + size], xs)
        real = num_examples(chunk)
        out = compiled(static, consts, shard_batch(_pad_to(chunk, size), mesh))
        outputs.append(jax.tree.map(lambda leaf: leaf[:real], out))
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *outputs)
