"""Device meshes, the pool mapper that every scoring strategy goes through, and multi-process set-up.

`map_chunks(fn, static, consts, xs, chunk_size=..., mesh=...)` applies `fn(static, consts, chunk)` to
fixed-size chunks of the pool and concatenates the results:
  - one compiled program for all chunks and all cycles: `fn` is a module-level function, `static`
    a hashable tuple of settings (the Flax model hashes by value), and the trained variables come in
    as `consts`, a traced argument, so new weights in a new cycle compile nothing;
  - the last chunk is padded by repeating its last example and the padding is dropped from the
    result, so a padded sample can never be ranked or selected;
  - with a mesh, each chunk is sharded over the `data` axis (the chunk size is rounded up to a
    multiple of the device count) and `consts` are replicated: the compiler splits the work. The
    results come back replicated and are handed out as process-local arrays.
`sum_chunks` is the same for a sum over the pool (a mean gradient): padding gets weight zero.

Several processes (`jax.distributed.initialize`, see `initialize_distributed`): the mesh spans the
devices of every process. The datasets are in-memory arrays, so every process loads all of them and
holds the same host values; `put` builds the global arrays from that copy, each process filling
only its own devices' shards (`jax.make_array_from_callback`). Results are replicated, so every
process reads the same scores and selects the same samples.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

PyTree = Any


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """`jax.distributed.initialize`, before anything touches a device. With no arguments JAX finds the
    cluster itself (TPU pod slices, SLURM, Open MPI, ...). CPU processes exchange their collectives
    over gloo (TCP), which the multi-process tests on 127.0.0.1 use."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def is_primary() -> bool:
    """Process 0 writes results, plots and the config; every process computes the same."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (all of them by default), axis `data`. With
    several processes the mesh must span every device of every process."""
    devices = jax.devices()
    count = len(devices) if num_devices is None else num_devices
    if not 1 <= count <= len(devices):
        raise ValueError(f"asked for {count} devices, {len(devices)} available")
    if jax.process_count() > 1 and count != len(devices):
        raise ValueError(f"with {jax.process_count()} processes the mesh spans all {len(devices)} devices; "
                         f"drop --num_devices or set it to {len(devices)}")
    return jax.make_mesh((count,), (DATA_AXIS,), (AxisType.Auto,), devices=devices[:count])


def mesh_size(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.devices.size


def describe_mesh(mesh: Optional[Mesh]) -> str:
    devices = jax.devices()
    where = f"{jax.process_count()} process(es)" if jax.process_count() > 1 else "1 process"
    if mesh is None:
        return f"1 {devices[0].platform} device (no mesh; {len(devices)} available), {where}"
    shape = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"{mesh.devices.size} {devices[0].platform} devices, mesh ({shape}), {where}"


def put(tree: PyTree, sharding: Optional[NamedSharding]) -> PyTree:
    """Every leaf placed with `sharding` (None: left as it is). One process: `jax.device_put`. Several:
    each process holds the whole value and fills its own devices' shards from it."""
    if sharding is None:
        return tree
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda leaf: _put_global(leaf, sharding), tree)


def _put_global(leaf, sharding: NamedSharding):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put_global(jax.random.key_data(leaf), sharding),
                                        impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
        return leaf
    host = np.asarray(leaf)  # a replicated global array reads as its (every process's) value
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def local(tree: PyTree) -> PyTree:
    """Process-local copies of replicated (global) arrays, on this process's first device: what the
    host code and the single-device code downstream read."""
    return jax.tree.map(lambda leaf: leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf, tree)


def replicated(mesh: Optional[Mesh]) -> Optional[NamedSharding]:
    return None if mesh is None else NamedSharding(mesh, P())


def data_sharded(mesh: Optional[Mesh]) -> Optional[NamedSharding]:
    return None if mesh is None else NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: PyTree, mesh: Optional[Mesh]) -> PyTree:
    return put(tree, replicated(mesh))


def shard_batch(tree: PyTree, mesh: Optional[Mesh]) -> PyTree:
    """Place arrays with a leading example axis split over the mesh's `data` axis."""
    return put(tree, data_sharded(mesh))


def constrain_batch(tree: PyTree, mesh: Optional[Mesh]) -> PyTree:
    """Inside a jitted function: split a batch over `data` when it has at least one example per
    device and more than one (a single example stays whole); otherwise leave it to the compiler."""
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
    if mesh is None or min(sizes) < max(2, mesh_size(mesh)):
        return tree
    return jax.lax.with_sharding_constraint(tree, data_sharded(mesh))


def constrain_replicated(tree: PyTree, mesh: Optional[Mesh]) -> PyTree:
    return tree if mesh is None else jax.lax.with_sharding_constraint(tree, replicated(mesh))


def select_row(x: jax.Array, j: jax.Array) -> jax.Array:
    """`x[j]` as a masked sum: exact, and on a pool split over devices it is a local reduction plus
    one small all-reduce, where a dynamic index would gather the whole array."""
    mask = (jnp.arange(x.shape[0]) == j).reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.sum(jnp.where(mask, x, jnp.zeros((), x.dtype)), axis=0)


def num_examples(xs: PyTree) -> int:
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(xs)}
    if len(sizes) != 1:
        raise ValueError(f"pool arrays disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket(n: int, capacity: Optional[int] = None, minimum: int = 256) -> int:
    """The padded size of a set of n rows whose size changes from call to call (a growing labelled set, a
    shrinking pool), so that the jitted programs over it see few shapes: `capacity` when n fits in it
    (one shape, one compilation, for a whole run), else the next power of two, at least `minimum`. The
    caller passes the real count or a mask alongside, so the padding never counts."""
    if capacity is not None and 0 < n <= capacity:
        return capacity
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable, out_sharding: Optional[NamedSharding] = None) -> Callable:
    return jax.jit(fn, static_argnums=0, out_shardings=out_sharding)


def _pad_to(chunk: PyTree, size: int) -> PyTree:
    def pad(leaf):
        missing = size - leaf.shape[0]
        if missing == 0:
            return leaf
        return jnp.concatenate([jnp.asarray(leaf), jnp.repeat(jnp.asarray(leaf)[-1:], missing, axis=0)])

    return jax.tree.map(pad, chunk)


def _chunks(xs: PyTree, chunk_size: Optional[int], mesh: Optional[Mesh]):
    """(chunk padded to the common size, number of real examples in it); `chunk_size=None`: one chunk."""
    n = num_examples(xs)
    if n == 0:
        raise ValueError("cannot score an empty pool")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # Always the full chunk size, even for a small pool: one shape, hence one compilation, every cycle.
    size = round_up(n if chunk_size is None else chunk_size, mesh_size(mesh))
    for start in range(0, n, size):
        chunk = jax.tree.map(lambda leaf: leaf[start:start + size], xs)
        yield _pad_to(chunk, size), num_examples(chunk)


def _call(fn: Callable, static: Any, consts: PyTree, chunk: PyTree, mesh: Optional[Mesh]) -> PyTree:
    out = _compiled(fn, replicated(mesh))(static, consts, shard_batch(chunk, mesh))
    if mesh is None:
        return out
    if mesh.devices.flat[0].platform == "cpu":
        # XLA:CPU runs every device's part of a program on one shared thread pool, and a collective blocks
        # its thread until all devices arrive. With many independent chunks in flight, the blocked parts
        # of later chunks can hold every thread while a device still has to run an earlier chunk: a
        # deadlock (seen with 8 devices on 2 cores). One chunk at a time on CPU meshes; accelerators keep
        # their asynchronous pipeline (their collectives are ordered per device stream).
        jax.block_until_ready(out)
    return local(out)


def map_chunks(fn: Callable, static: Any, consts: PyTree, xs: PyTree, *, chunk_size: Optional[int],
               mesh: Optional[Mesh] = None) -> PyTree:
    """Concatenation over the pool of `fn(static, consts, chunk)` (see the module docstring).
    `fn` must return arrays with a leading example axis. `chunk_size=None`: the pool in one chunk."""
    consts = replicate(consts, mesh)
    outputs = [jax.tree.map(lambda leaf: leaf[:real], _call(fn, static, consts, chunk, mesh))
               for chunk, real in _chunks(xs, chunk_size, mesh)]
    return outputs[0] if len(outputs) == 1 else jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *outputs)


def sum_chunks(fn: Callable, static: Any, consts: PyTree, xs: PyTree, *, chunk_size: Optional[int],
               mesh: Optional[Mesh] = None) -> PyTree:
    """Sum over chunks of `fn(static, consts, (chunk, weights))`, `weights` 1 for real examples and 0
    for padding, so `fn` can return an exact weighted sum (e.g. of per-example gradients)."""
    consts = replicate(consts, mesh)
    total = None
    for chunk, real in _chunks(xs, chunk_size, mesh):
        weights = (np.arange(num_examples(chunk)) < real).astype(np.float32)
        out = _call(fn, static, consts, (chunk, weights), mesh)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    return total
