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
When torch is importable (`--torch-site`), ISAL's released code itself (dragonlzm/ISAL, classification/src/
utils.py; `experiments/torch_reference.py`) is timed on the torch twin of the same model holding jaxal's
weights, in eval mode, on the same inputs and the same parameters (rank > 1):
  - its influence loop, one unlabelled example at a time: the gradient of the cross-entropy at the
    pseudo-label, flattened, dotted with s_test, moved to the host (vs jaxal's one jvp per chunk);
  - its s_test step: a double-backprop Hessian-vector product on one labelled example and the update
    `h = v + (1 - damp) h - Hv / scale` with its per-tensor NaN test (vs jaxal's LiSSA step).
Before timing, the torch and jaxal Hessian-vector products on one labelled example and the scores of a
few pool examples are compared (float32 tolerance; TF32 on a GPU: `timing.check_rtol`), so both time the same computation. The MLP has no
torch twin.
The MLP on flattened digits is a control without convolutions. On XLA:CPU, convolutions inside a
while loop (the LiSSA scan) whose dimension numbers are not NHWC/HWIO -- the input- and weight-
gradient convolutions of the backward pass -- miss the Eigen fast path, because the CPU pass that
canonicalises them (xla/service/cpu/conv_canonicalization.cc) visits only the entry computation;
`jaxal.influence` rewrites them in the loop bodies (see `_canonical_convs`), without which a LiSSA
step cost 2.7x (digits CNN) and 3.5-5x (ResNet-18) an hvp call on this CPU.
Compilation is excluded (each function runs once before timing) and reported separately; the repeats of
what is compared are interleaved, so that load from other processes hits both alike.
The LAST line printed is one JSON object with the ratios (the torch keys only where torch ran, and
"torch": null when it did not).

    python experiments/bench_influence.py            # a few minutes on 2 CPU cores
    python experiments/bench_influence.py --quick    # smaller sizes
    python experiments/bench_influence.py --models cnn
    python experiments/bench_influence.py --torch-site /path/to/venv/lib/python3.11/site-packages

torch is not a dependency of jaxal: install it into a separate virtualenv and pass that venv's
site-packages with `--torch-site` (appended to `sys.path`). On a CUDA machine the torch code runs on the GPU.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import influence
from jaxal.models import create_model, inference_apply, init_variables
from jaxal.pytree import restrict, tree_dot
from timing import check_rtol, import_torch_reference, time_runs

SHAPES = {"mlp": (8, 8, 1), "cnn": (8, 8, 1), "resnet18": (32, 32, 3)}
KEYS = {"mlp": "digits_mlp", "cnn": "digits_cnn", "resnet18": "resnet18"}
TORCH_TWINS = ("cnn", "resnet18")
CHECK_SAMPLES = 8

hvp = jax.jit(influence.hvp, static_argnums=0)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


class TorchISAL:
    """ISAL's reference code on the torch twin of a jaxal model, with a jaxal vector `s` (over the "weights"
    subset) as its s_test / LiSSA vector; `check` compares it with jaxal before anything is timed."""

    def __init__(self, reference, name, variables, shape, s):
        self.reference, self.name, self.shape = reference, name, shape
        self.model = reference.twin(name, variables, shape)
        self.names, self.params = reference.weight_parameters(self.model)
        self.s = self.vector(s)
        self.s_flat = reference.flat(self.s)

    def vector(self, tree) -> list:
        """A jaxal pytree over the "weights" subset as torch tensors in the order of `self.params`."""
        state = self.reference.torch_state(self.name, tree, self.shape)
        if set(state) != set(self.names):
            raise ValueError(f"jaxal's 'weights' subset and ISAL's rank > 1 parameters differ: "
                             f"{sorted(set(state) ^ set(self.names))}")
        return self.reference.tensors(state, self.names)

    def check(self, loss_fn, params, s, one, pseudo_loss, pool, chunk) -> dict:
        """Relative differences (torch vs jaxal) of the HVP on one labelled example and of the scores of
        the first pool examples; raises beyond `check_rtol()`."""
        r = self.reference
        with r.full_float32():
            return self._check(loss_fn, params, s, one, pseudo_loss, pool, chunk)

    def _check(self, loss_fn, params, s, one, pseudo_loss, pool, chunk) -> dict:
        r = self.reference
        loss = r.labeled_loss(self.model, r.images(one[0]), r.labels(one[1]))
        torch_hv = r.flat(r.hessian_vector_product(loss, self.params, self.s)).cpu().numpy()
        jax_hv = r.flat(self.vector(hvp(loss_fn, params, one, s))).cpu().numpy()
        xs = pool[:CHECK_SAMPLES]
        torch_scores = r.influence_scores(self.model, self.params, self.s_flat, r.images(xs))
        jax_scores = np.asarray(influence.influence_scores(pseudo_loss, params, xs, s, chunk_size=chunk))
        errors = {"hvp": relative_error(torch_hv, jax_hv), "scores": relative_error(torch_scores, jax_scores)}
        for what, err in errors.items():
            if not err <= check_rtol():
                raise RuntimeError(f"torch (ISAL's code) and jaxal {what} differ by {err:.2e} (relative to the "
                                   f"largest entry) on {self.name}")
        return errors


def bench_model(name, args, reference, results):
    shape = SHAPES[name]
    sizes = args.sizes[name]
    model = create_model(name, 10)
    variables = init_variables(model, jax.random.key(0), shape)
    apply = inference_apply(model, variables["batch_stats"])
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.normal(size=(sizes["pool"], *shape)), jnp.float32)
    labeled = (jnp.asarray(rng.normal(size=(sizes["labeled"], *shape)), jnp.float32),
                jnp.asarray(rng.integers(0, 10, size=sizes["labeled"]), jnp.int32))

    # ISAL: parameters of rank > 1; pool scored at the pseudo-label, the labelled set at true labels.
    pseudo_loss, params = restrict(influence.cross_entropy_example_loss(apply, pseudo_label=True), variables["params"], "weights")
    true_loss, _ = restrict(influence.cross_entropy_example_loss(apply), variables["params"], "weights")
    loss_fn = influence.mean_loss(true_loss)
    full_params = variables["params"]
    s = influence._normal_like(jax.random.key(1), params)
    chunk = sizes["chunk"]
    n_pool = sizes["pool"]
    n_loop = sizes["loop"]
    depth = sizes["lissa_depth"]
    one = jax.tree.map(lambda a: a[:1], labeled)
    key = KEYS[name]
    print(f"\n== {name}: input {shape}, {sum(x.size for x in jax.tree.leaves(params)):,} weights "
          f"(subset 'weights'), pool {n_pool}, chunk {chunk}, loop {n_loop}, reps {args.reps}")

    isal = None
    if reference is not None and name in TORCH_TWINS:
        isal = TorchISAL(reference, name, variables, shape, s)
        errors = isal.check(loss_fn, params, s, one, pseudo_loss, pool, chunk)
        print(f"checked: ISAL's torch code and jaxal agree on the HVP of one labelled example ({errors['hvp']:.1e}) "
              f"and the scores of {CHECK_SAMPLES} pool examples ({errors['scores']:.1e}), relative to the largest "
              f"entry (tolerance {check_rtol():g})")
        results[f"{key}_torch_check_max_rel_err"] = max(errors.values())
    elif reference is not None:
        print("(no torch twin of this model: torch not timed)")

    # Pool scoring.
    forward = jax.jit(lambda p, xs: apply(p, xs).logits)
    grad_dot = jax.jit(lambda p, x, s: tree_dot(s, jax.grad(pseudo_loss)(p, x)))
    timings = time_runs({
        "jvp": lambda: influence.influence_scores(pseudo_loss, params, pool, s, chunk_size=chunk),
        "forward": lambda: [forward(full_params, pool[i:i + chunk]) for i in range(0, n_pool, chunk)],
    }, args.reps)
    loops = {"loop": lambda: [grad_dot(params, pool[i], s) for i in range(n_loop)]}
    if isal is not None:
        torch_pool = reference.images(pool[:n_loop])
        loops["torch"] = lambda: reference.influence_scores(isal.model, isal.params, isal.s_flat, torch_pool)
    timings.update(time_runs(loops, max(1, args.reps // 2)))
    rate = {k: (n_loop if k in loops else n_pool) / t.best for k, t in timings.items()}
    for what, label in (("jvp", "influence_scores (jvp):"), ("forward", "inference forward (floor):"),
                        ("loop", "per-example grad+dot loop:")):
        print(f"{label:<29}{rate[what]:10.1f} samples/s   (compile+first {timings[what].first:.1f}s)")
    results[f"{key}_speedup_vs_loop"] = rate["jvp"] / rate["loop"]
    results[f"{key}_cost_vs_inference_forward"] = rate["forward"] / rate["jvp"]
    if isal is not None:
        print(f"ISAL's torch loop ({reference.DEVICE}):  {rate['torch']:10.1f} samples/s   -> jaxal jvp is "
              f"{rate['jvp'] / rate['torch']:.1f}x faster, the JAX loop {rate['loop'] / rate['torch']:.1f}x")
        results[f"{key}_torch_scoring_samples_per_s"] = rate["torch"]
        results[f"{key}_scoring_speedup_vs_torch"] = rate["jvp"] / rate["torch"]
        results[f"{key}_jax_loop_speedup_vs_torch"] = rate["loop"] / rate["torch"]

    # One LiSSA step vs one hvp call, batch size 1 (and ISAL's torch step).
    n_hvp = sizes["hvp_calls"]
    t_hvp = time_runs({"hvp": lambda: [hvp(loss_fn, params, one, s) for _ in range(n_hvp)]}, args.reps)["hvp"]

    def lissa(d, r):
        return influence.lissa(loss_fn, params, labeled, s, rng=jax.random.key(0), depth=d, repeats=r,
                               batch_size=1, return_diagnostics=True)

    steps = {"lissa": lambda: lissa(depth, 1)}
    if isal is not None:
        torch_xs, torch_ys = reference.images(labeled[0][:depth]), reference.labels(labeled[1][:depth])
        steps["torch"] = lambda: reference.lissa_steps(isal.model, isal.params, isal.s, torch_xs, torch_ys)
    t_steps = time_runs(steps, sizes["lissa_reps"])
    hvp_ms, step = 1e3 * t_hvp.best / n_hvp, {k: t.best / depth for k, t in t_steps.items()}
    print(f"hvp call (batch 1):          {hvp_ms:10.3f} ms          (compile+first {t_hvp.first:.1f}s)")
    print(f"LiSSA step (depth {depth}):     {1e3 * step['lissa']:10.3f} ms          "
          f"(compile+first {t_steps['lissa'].first:.1f}s)")
    results[f"{key}_lissa_step_vs_hvp"] = 1e3 * step["lissa"] / hvp_ms
    if isal is not None:
        print(f"ISAL's torch step ({reference.DEVICE}):  {1e3 * step['torch']:10.3f} ms          "
              f"-> jaxal's LiSSA step is {step['torch'] / step['lissa']:.1f}x faster")
        results[f"{key}_torch_lissa_step_ms"] = 1e3 * step["torch"]
        results[f"{key}_lissa_step_speedup_vs_torch"] = step["torch"] / step["lissa"]
        results[f"{key}_torch_isal_s_test_seconds_extrapolated"] = 1000 * step["torch"]

    # ISAL's s_test with the defaults (4 chains x 250 steps, damping 0.01, scale 1e4, batch size 1).
    if sizes["isal"]:
        t_isal = time_runs({"isal": lambda: lissa(250, 4)}, 1)["isal"]
        result = lissa(250, 4)
        print(f"ISAL s_test, defaults (4 x 250 steps): {t_isal.best:.2f} s  (compile+first {t_isal.first:.1f}s); "
              f"cosine(s_test, v) = {float(result.cosine_to_v):.6f}")
        results[f"{key}_isal_s_test_seconds"] = t_isal.best
    else:
        print(f"ISAL s_test, defaults (4 x 250 steps), extrapolated from the step time: {1000 * step['lissa']:.1f} s "
              f"(at hvp-call speed it would be {hvp_ms:.1f} s)")
        results[f"{key}_isal_s_test_seconds_extrapolated"] = 1000 * step["lissa"]
    if isal is not None:
        print(f"ISAL's torch s_test, extrapolated from its step time: {1000 * step['torch']:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,resnet18",
                        help="mlp (no convolutions) is the control for the LiSSA-step ratio")
    parser.add_argument("--quick", action="store_true", help="smaller pools, fewer loop examples and steps")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="skip ISAL's PyTorch code")
    parser.add_argument("--torch-site", default=None,
                        help="a site-packages directory holding torch, appended to sys.path (see the docstring)")
    args = parser.parse_args()
    q = args.quick
    args.sizes = {
        "mlp": dict(pool=2048 if q else 8192, chunk=256, loop=200 if q else 500, labeled=1000, hvp_calls=200,
                    lissa_depth=250, lissa_reps=args.reps, isal=True),
        "cnn": dict(pool=2048 if q else 8192, chunk=256, loop=200 if q else 500, labeled=1000, hvp_calls=200,
                    lissa_depth=250, lissa_reps=args.reps, isal=True),
        "resnet18": dict(pool=128 if q else 256, chunk=64, loop=8 if q else 16, labeled=1000,
                         hvp_calls=5 if q else 10, lissa_depth=5 if q else 10, lissa_reps=1, isal=False),
    }
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)), float32")
    reference = import_torch_reference(args.torch_site, args.no_torch)
    if reference is not None:
        print(f"PyTorch: ISAL's code timed with {reference.describe()}")
    results = {}
    for name in args.models.split(","):
        bench_model(name.strip(), args, reference, results)
    steps = [v for k, v in results.items() if k.endswith("lissa_step_vs_hvp")]
    if steps:
        results["lissa_step_vs_hvp_worst"] = max(steps)
    summary = {k: float(f"{v:.3g}") if k.endswith("rel_err") else round(v, 4) for k, v in results.items()}
    summary["torch"] = None if reference is None else reference.describe()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
