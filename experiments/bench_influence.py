"""Benchmark of the influence engine (measured, never asserted).

For the digits CNN (`create_model('cnn', 10)`, 8x8x1) and ResNet-18 on CIFAR-shaped inputs
(`create_model('resnet18', 10)`, 32x32x3), with ISAL's parameter subset ("weights") and the pseudo-label
loss, it times:
  - pool scoring, samples/s: `influence_scores` (one jvp per chunk) vs the per-example loop of ISAL's
    code (a jitted batch-size-1 grad + dot, one call per example) vs one inference forward pass (the
    floor; same chunks);
  - one LiSSA step (a lissa of depth D, one chain, batch size 1, divided by D) vs one jitted `hvp` call
    at batch size 1;
  - a full ISAL `s_test` with the defaults (depth 250, 4 chains, damping 0.01, scale 1e4, batch 1) on
    the digits models; on ResNet-18 extrapolated from the measured step time (1000 steps).
The MLP on flattened digits is a control without convolutions. On XLA:CPU, convolutions inside a
while loop (the LiSSA scan) whose dimension numbers are not NHWC/HWIO -- the input- and weight-
gradient convolutions of the backward pass -- miss the Eigen fast path, because the CPU pass that
canonicalises them (xla/service/cpu/conv_canonicalization.cc) visits only the entry computation;
`jaxal.influence` rewrites them in the loop bodies (see `_canonical_convs`), without which a LiSSA
step cost 2.7x (digits CNN) and 3.5-5x (ResNet-18) an hvp call on this CPU.
Compilation is excluded (each function runs once before timing) and reported separately.
The LAST line printed is one JSON object with the ratios.

    python experiments/bench_influence.py            # a few minutes on 2 CPU cores
    python experiments/bench_influence.py --quick    # smaller sizes
    python experiments/bench_influence.py --models cnn
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import influence
from jaxal.models import create_model, inference_apply, init_variables
from jaxal.pytree import restrict, tree_dot

SHAPES = {"mlp": (8, 8, 1), "cnn": (8, 8, 1), "resnet18": (32, 32, 3)}
KEYS = {"mlp": "digits_mlp", "cnn": "digits_cnn", "resnet18": "resnet18"}


def block(tree):
    return jax.block_until_ready(tree)


def timed(fn, reps):
    """(compile + first run seconds, best of `reps` seconds) of `fn()`, blocking on its result."""
    start = time.perf_counter()
    block(fn())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - start)
    return first, best


def bench_model(name, args, results):
    shape = SHAPES[name]
    sizes = args.sizes[name]
    model = create_model(name, 10)
    variables = init_variables(model, jax.random.key(0), shape)
    apply = inference_apply(model, variables["batch_stats"])
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.normal(size=(sizes["pool"], *shape)), jnp.float32)
    labelled = (jnp.asarray(rng.normal(size=(sizes["labelled"], *shape)), jnp.float32),
                jnp.asarray(rng.integers(0, 10, size=sizes["labelled"]), jnp.int32))

    # ISAL: parameters of rank > 1; pool scored at the pseudo-label, the labelled set at true labels.
    pseudo_loss, params = restrict(influence.example_loss(apply, pseudo_label=True), variables["params"], "weights")
    true_loss, _ = restrict(influence.example_loss(apply), variables["params"], "weights")
    loss_fn = influence.mean_loss(true_loss)
    full_params = variables["params"]
    s = influence._normal_like(jax.random.key(1), params)
    chunk = sizes["chunk"]
    n_pool = sizes["pool"]
    print(f"\n== {name}: input {shape}, {sum(x.size for x in jax.tree.leaves(params)):,} weights "
          f"(subset 'weights'), pool {n_pool}, chunk {chunk}, loop {sizes['loop']}, reps {args.reps}")

    # Pool scoring.
    first, t_jvp = timed(lambda: influence.influence_scores(pseudo_loss, params, pool, s, chunk_size=chunk), args.reps)
    forward = jax.jit(lambda p, xs: apply(p, xs).logits)

    def forward_pool():
        return [forward(full_params, pool[i:i + chunk]) for i in range(0, n_pool, chunk)]

    first_fwd, t_fwd = timed(forward_pool, args.reps)
    grad_dot = jax.jit(lambda p, x, s: tree_dot(s, jax.grad(pseudo_loss)(p, x)))
    n_loop = sizes["loop"]

    def loop():
        return [grad_dot(params, pool[i], s) for i in range(n_loop)]

    first_loop, t_loop = timed(loop, max(1, args.reps // 2))
    rate_jvp, rate_fwd, rate_loop = n_pool / t_jvp, n_pool / t_fwd, n_loop / t_loop
    print(f"influence_scores (jvp):      {rate_jvp:10.1f} samples/s   (compile+first {first:.1f}s)")
    print(f"inference forward (floor):   {rate_fwd:10.1f} samples/s   (compile+first {first_fwd:.1f}s)")
    print(f"per-example grad+dot loop:   {rate_loop:10.1f} samples/s   (compile+first {first_loop:.1f}s)")
    key = KEYS[name]
    results[f"{key}_speedup_vs_loop"] = rate_jvp / rate_loop
    results[f"{key}_cost_vs_inference_forward"] = rate_fwd / rate_jvp

    # One LiSSA step vs one hvp call, batch size 1.
    one = jax.tree.map(lambda a: a[:1], labelled)
    hvp = jax.jit(influence.hvp, static_argnums=0)
    n_hvp = sizes["hvp_calls"]

    def hvp_calls():
        return [hvp(loss_fn, params, one, s) for _ in range(n_hvp)]

    first_hvp, t_hvp = timed(hvp_calls, args.reps)
    t_hvp /= n_hvp
    depth = sizes["lissa_depth"]

    def lissa(d, r):
        return influence.lissa(loss_fn, params, labelled, s, rng=jax.random.key(0), depth=d, repeats=r,
                               batch_size=1, return_diagnostics=True)

    first_lissa, t_lissa = timed(lambda: lissa(depth, 1), sizes["lissa_reps"])
    t_step = t_lissa / depth
    print(f"hvp call (batch 1):          {1e3 * t_hvp:10.3f} ms          (compile+first {first_hvp:.1f}s)")
    print(f"LiSSA step (depth {depth}):     {1e3 * t_step:10.3f} ms          (compile+first {first_lissa:.1f}s)")
    results[f"{key}_lissa_step_vs_hvp"] = t_step / t_hvp

    # ISAL's s_test with the defaults (4 chains x 250 steps, damping 0.01, scale 1e4, batch size 1).
    if sizes["isal"]:
        first_isal, t_isal = timed(lambda: lissa(250, 4), 1)
        result = lissa(250, 4)
        print(f"ISAL s_test, defaults (4 x 250 steps): {t_isal:.2f} s  (compile+first {first_isal:.1f}s); "
              f"cosine(s_test, v) = {float(result.cosine_to_v):.6f}")
        results[f"{key}_isal_s_test_seconds"] = t_isal
    else:
        print(f"ISAL s_test, defaults (4 x 250 steps), extrapolated from the step time: {1000 * t_step:.1f} s "
              f"(at hvp-call speed it would be {1000 * t_hvp:.1f} s)")
        results[f"{key}_isal_s_test_seconds_extrapolated"] = 1000 * t_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,resnet18",
                        help="mlp (no convolutions) is the control for the LiSSA-step ratio")
    parser.add_argument("--quick", action="store_true", help="smaller pools, fewer loop examples and steps")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    q = args.quick
    args.sizes = {
        "mlp": dict(pool=2048 if q else 8192, chunk=256, loop=200 if q else 500, labelled=1000, hvp_calls=200,
                    lissa_depth=250, lissa_reps=args.reps, isal=True),
        "cnn": dict(pool=2048 if q else 8192, chunk=256, loop=200 if q else 500, labelled=1000, hvp_calls=200,
                    lissa_depth=250, lissa_reps=args.reps, isal=True),
        "resnet18": dict(pool=128 if q else 256, chunk=64, loop=8 if q else 16, labelled=1000,
                         hvp_calls=5 if q else 10, lissa_depth=5 if q else 10, lissa_reps=1, isal=False),
    }
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)), float32")
    results = {}
    for name in args.models.split(","):
        bench_model(name.strip(), args, results)
    steps = [v for k, v in results.items() if k.endswith("lissa_step_vs_hvp")]
    if steps:
        results["lissa_step_vs_hvp_worst"] = max(steps)
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
