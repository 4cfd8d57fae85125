"""Test-wide JAX settings, set once before any test touches a device (as equinox's conftest does):
rank promotion raises, so a silent broadcast is a bug; 8 fake CPU devices, so the mesh code runs
as it would on one host with 8 accelerators. Single-device code simply uses the first of them.
The `x64` fixture runs a test in float64 (the references' precision: tolerances of ~1e-9); a module
whose every test needs it says `pytestmark = pytest.mark.usefixtures("x64")`."""

import gc
import os
from pathlib import Path

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


class count_traces:
    """Counts how often JAX traces `module.name` while the `with` block runs (each trace is a compilation
    of a new shape or static argument), with JAX's public API only: the function is replaced by a
    wrapper that counts its Python calls, which JAX makes once per trace. A plain function (jitted by
    its caller, e.g. `jaxal.parallel.map_chunks`) is wrapped as it is; a `jax.jit`-decorated one is
    re-jitted around the counter with `jit_options` (its own static arguments, which the caller
    repeats). The wrapper is a new function, so JAX's caches start empty for it.

        with count_traces(baselines, "_greedy_k_center", static_argnums=(4, 5, 6)) as traces:
            ...
        assert traces.count == 1
    """

    def __init__(self, module, name: str, **jit_options):
        self.module, self.name, self.jit_options, self.count = module, name, jit_options, 0

    def __enter__(self):
        import functools

        self.original = getattr(self.module, self.name)
        body = self.original.__wrapped__ if self.jit_options else self.original

        @functools.wraps(body)
        def counted(*args, **kwargs):
            self.count += 1
            return body(*args, **kwargs)

        setattr(self.module, self.name, jax.jit(counted, **self.jit_options) if self.jit_options else counted)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)
        return False


from jaxal.data import SHARED_DATA_ENV  # noqa: E402  (the variable jaxal.data reads too)


def shared_data() -> Path:
    """The folder of the project's shared real datasets: $JAXAL_SHARED_DATA, else `shared/data` beside
    the checkout (as CI lays it out), the checkout taken as reached (a symlinked path kept) or resolved."""
    if os.environ.get(SHARED_DATA_ENV):
        return Path(os.environ[SHARED_DATA_ENV])
    checkouts = [Path(os.path.abspath(__file__)).parents[1], Path(__file__).resolve().parents[1]]
    candidates = [root.parent / "shared" / "data" for root in checkouts]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def shared_archive(name: str) -> Path:
    """The path of a shared archive. Absent: the test skips (a user's machine), unless $JAXAL_SHARED_DATA
    names the folder (CI's .ci/run does when shared/ is beside the checkout): then it fails, so that the
    real-data tests cannot silently stop running there."""
    path = shared_data() / name
    if path.is_file():
        return path
    if os.environ.get(SHARED_DATA_ENV):
        pytest.fail(f"${SHARED_DATA_ENV} is {os.environ[SHARED_DATA_ENV]!r}, but {path} is not a file")
    pytest.skip(f"{path} is absent (the shared real datasets; set {SHARED_DATA_ENV} to their folder)")
