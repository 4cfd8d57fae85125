"""Memory of the influence solvers against the labelled-set size, as XLA counts it (measured, never asserted).

For ResNet-18 on CIFAR-shaped inputs (`create_model('resnet18', 10)`, 32x32x3) and ISAL's parameter subset
("weights", 11.2M parameters; "last_layer" for the exact solver, 5130), it compiles each solver program for
a padded labelled set of n rows and prints XLA's count of its temporaries (`memory_analysis().
temp_size_in_bytes`: everything the program allocates beyond its inputs and outputs) and of its inputs:

  - cg, exact and lissa as ISAL compiles them (`jaxal.strategies.isal._solve`, ISAL's defaults: LiSSA with
    4 chains of minibatches of 1, chunks of 256 labelled examples per Hessian-vector product);
  - full-batch LiSSA and power iteration (`jaxal.influence`);
  - one Hessian-vector product over the whole set in one batch, what the solvers did before every
    product became a sum over chunks (`influence.hvp` on all n rows): the 31 GB of the issue's report.

Nothing runs: the programs are lowered from shapes and compiled (seconds each on a CPU; the counts are
the CPU backend's, a GPU's buffer assignment differs a little). The LAST line printed is one JSON object.

    python experiments/bench_memory.py                      # n = 256, 1900, 4096; about 3 minutes on 2 cores
    python experiments/bench_memory.py --sizes 512,20000    # the presets' largest labelled set
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

from jaxal import influence
from jaxal.config import build_config
from jaxal.models import create_model, inference_apply, init_variables
from jaxal.pytree import restrict, tree_size
from jaxal.strategies import isal
from jaxal.tasks import create_task

SHAPE = (32, 32, 3)
CLASSIFICATION = create_task("classification", 10)
MIB = 2**20


def labeled(n):
    return ((jax.ShapeDtypeStruct((n, *SHAPE), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32)),
            jax.ShapeDtypeStruct((n,), jnp.float32))


def memory(fn, *args):
    """(temp bytes, argument bytes, compile seconds) of `jax.jit(fn)` on these shapes."""
    start = time.perf_counter()
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes, analysis.argument_size_in_bytes, time.perf_counter() - start


def programs(model, variables):
    """name -> (parameter subset, f(n) -> memory of the program on n labelled rows)."""
    subset_of = lambda subset: restrict(lambda p: p, variables["params"], subset)[1]  # noqa: E731

    def loss_and_params(variables, subset="weights"):
        apply = inference_apply(model, variables["batch_stats"])
        loss, selected = restrict(influence.cross_entropy_example_loss(apply), variables["params"], subset)
        return influence.weighted_mean_loss(loss), selected

    def isal_solver(solver, subset):
        opts = build_config(influence=dict(solver=solver, params=subset)).influence
        static = isal.SolverSettings(model, CLASSIFICATION, subset, solver, opts.depth, opts.repeats,
                                     opts.batch_size, opts.cg_maxiter, opts.hvp_chunk_size,
                                     opts.exact_block_size, "highest", None)
        body = functools.partial(isal._solve_body, static)
        return lambda n: memory(body, variables, labeled(n), n, subset_of(subset), jax.random.key(0), 0.01, 1e4,
                                1e-6, 0.0)

    def full_batch_lissa(variables, data, v):
        loss, selected = loss_and_params(variables)
        return influence._lissa_chains(loss, selected, data, v, jax.random.key(0), 0.01, 1e4, depth=250, repeats=4,
                                       batch_size=None)

    def power(variables, data):
        loss, selected = loss_and_params(variables)
        return influence._power_iteration_body(loss, selected, data, jax.random.key(0), iters=50)

    def whole_set_hvp(variables, data, v):
        loss, selected = loss_and_params(variables)
        return influence.hvp(loss, selected, data, v)

    weights = subset_of("weights")
    return {
        "cg (isal)": ("weights", isal_solver("cg", "weights")),
        "lissa (isal defaults)": ("weights", isal_solver("lissa", "weights")),
        "exact (isal)": ("last_layer", isal_solver("exact", "last_layer")),
        "lissa full batch": ("weights", lambda n: memory(full_batch_lissa, variables, labeled(n), weights)),
        "power iteration": ("weights", lambda n: memory(power, variables, labeled(n))),
        "one whole-set hvp (before)": ("weights", lambda n: memory(whole_set_hvp, variables, labeled(n), weights)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1900,4096", help="labelled-set sizes, comma-separated")
    parser.add_argument("--only", default=None, help="comma-separated program names (default: all)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model = create_model("resnet18", 10)
    variables = jax.eval_shape(lambda key: init_variables(model, key, SHAPE), jax.random.key(0))
    print(f"ResNet-18, CIFAR shapes, {jax.default_backend()} backend; labelled sizes {sizes}; MiB of XLA temporaries "
          f"(inputs in brackets)")
    results = {}
    for name, (subset, measure) in programs(model, variables).items():
        if args.only and name not in args.only.split(","):
            continue
        size = tree_size(restrict(lambda p: p, variables["params"], subset)[1])
        row = {}
        cells = []
        for n in sizes:
            temp, arguments, seconds = measure(n)
            row[n] = temp
            cells.append(f"n={n}: {temp / MIB:9.1f} ({arguments / MIB:.0f})")
        ratio = row[sizes[-1]] / row[sizes[0]]
        print(f"{name:28s} [{subset}, P={size:,}]  " + "  ".join(cells) + f"  ratio {ratio:.2f}", flush=True)
        results[name] = {"subset": subset, "temp_bytes": {str(n): row[n] for n in sizes},
                         f"ratio_{sizes[-1]}_to_{sizes[0]}": ratio}
    print(json.dumps({"backend": jax.default_backend(), "sizes": sizes, "programs": results}))


if __name__ == "__main__":
    main()
