"""Test-wide JAX settings, set once before any test touches a device (as equinox's conftest does):
rank promotion raises, so a silent broadcast is a bug; 8 fake CPU devices, so the mesh code runs
as it would on one host with 8 accelerators. Single-device code simply uses the first of them.
The `x64` fixture runs a test in float64 (the references' precision: tolerances of ~1e-9); a module
whose every test needs it says `pytestmark = pytest.mark.usefixtures("x64")`."""

import contextlib
import gc
import types

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="module")
def fresh_compilation_caches():
    """Each test module starts with JAX's caches cleared and leaves them so. XLA:CPU maps each compiled
    executable's code into memory (about 3 mappings a program, measured), and the whole suite compiles
    many thousands of programs in one process: kept all along, they run into the kernel's limit on a
    process's mappings (vm.max_map_count, 65530 by default), and the suite crashed inside XLA's
    compiler near its end (twice, in different tests)."""
    jax.clear_caches()
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def to64(tree):
    """The floating leaves of `tree` as float64 (under `x64`); other leaves unchanged."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


TIMING_FIELDS = ("train_seconds", "evaluate_seconds", "selection_seconds")


def comparable(records):
    """Cycle records without their timings: what a resumed or a sharded run must reproduce exactly."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


# The strategies that train networks of their own (VAAL and SRAAL's VAE and discriminator, the GCNs, QBC's
# committee), at test sizes: their defaults are the reference codes' (SRAAL: 20000 iterations a cycle).
SMALL_VAE = dict(width=4, latent_dim=8, iterations=3, batch_size=16, discriminator_width=16)
SMALL_STRATEGY_NETWORKS = dict(vaal=SMALL_VAE, sraal=SMALL_VAE, gcn=dict(hidden=16, steps=20), qbc=dict(members=3))


@contextlib.contextmanager
def count_traces(owner, name: str):
    """`with count_traces(module, "fn") as traces:` ... `traces.count`: the calls of `owner.name` meanwhile.
    Give it a function that runs only while JAX traces a program (a jitted body, or a function that body
    calls): every call is then one new compilation and a cache hit adds nothing. The public way to check
    "compiled once" (JAX's `_cache_size()` is private)."""
    traces = types.SimpleNamespace(count=0)
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        traces.count += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield traces
    finally:
        setattr(owner, name, original)
