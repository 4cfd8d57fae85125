"""The numerical-precision policy: which computations run their matrix products at which precision.

GPUs (NVIDIA Ampere and later) compute float32 matrix products and convolutions in TF32 by default in
JAX: inputs rounded to a 10-bit mantissa, a relative error of about 1e-3 per product. That is what
training wants (it is several times faster and SGD does not notice), but not what a linear solver wants:
CG's residual, LiSSA's recursion, a dense Hessian and its LU factorisation, a k-center distance
`|a|^2 + |b|^2 - 2 a.b` between nearby points, or a bound diagnostic that compares two numbers close to
each other all lose digits that TF32 does not have. The policy (`--precision.*`, `PrecisionOptions`):

- `solvers` (default "highest": true float32 products; on TPUs, six bf16 passes): every Hessian-vector
  product and solve (`jaxal.influence`: cg, lissa, exact, power iteration), the influence jvps that score
  the pool with `s_test` and the mean gradients `v` they start from (ISAL, grad_sim), the pairwise distances
  of coreset and BADGE, and everything `jaxal.diagnostics` computes.
- `training` (default "default", i.e. TF32 on such GPUs): training, evaluation and plain inference (the
  logits of the uncertainty baselines, BALD, LL4AL, the features of coreset and BADGE), and the gradient-
  norm scores of exp_gn/ent_gn/egl/lplgrad, which rank by a norm that a 1e-3 relative error does not
  reorder in any way that matters.

- `training` may also be "bfloat16" (`--precision.training bfloat16`, off by default: the presets reproduce
  the references in float32/TF32): mixed-precision training. The train step computes the model's
  activations, matrix products and convolutions in bfloat16 from bfloat16 copies of the parameters
  (`compute_dtype`, `cast_floating`), while the parameters themselves, their gradients and updates, the
  optimizer state and the BatchNorm statistics stay float32; the logits are cast back to float32 before
  the loss and its softmax. bfloat16 has float32's exponent range, so no loss scaling is needed. Everything
  else that `training` governs (evaluation, plain inference, gradient-norm scores) runs from the float32
  parameters at the backend's default, as with "default"; the solvers keep `solvers`.

How it is applied: the jitted bodies trace their products under `jax.default_matmul_precision(value)`
(`scope` below), which writes the precision into every `dot_general` and `convolution` of the program
(`precision = [HIGHEST, HIGHEST]` in its StableHLO; a test reads it back). The value is a static argument
of the jitted functions, so each precision has its own compiled program. "default" sets the backend's
default explicitly (so solvers at "default" stay there inside a run whose training is at "highest").
CPUs have no TF32: there every setting computes the same numbers.
"""

from __future__ import annotations

PRECISIONS = ("default", "highest")
TRAINING_PRECISIONS = PRECISIONS + ("bfloat16",)  # --precision.training's values
SOLVERS_DEFAULT = "highest"


def check(value: str, flag: str, allowed: tuple[str, ...] = PRECISIONS) -> None:
    if value not in allowed:
        raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def matmul_precision(value: str) -> str:
    """The matrix-product precision of a `--precision.*` value: bfloat16 training leaves the float32
    products outside its train step (evaluation, inference, scores) at the backend's default."""
    return "default" if value == "bfloat16" else value


def compute_dtype(training: str):
    """The dtype the train step computes in under `--precision.training` (None: the parameters' own)."""
    import jax.numpy as jnp

    return jnp.bfloat16 if training == "bfloat16" else None


def cast_floating(tree, dtype):
    """The floating leaves of `tree` as `dtype` (`None`: unchanged). Differentiating through the cast gives
    gradients in the leaves' own dtype, so float32 parameters get float32 gradients."""
    if dtype is None:
        return tree
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def scope(value: str):
    """A context in which traced matrix products take precision `value` (a `--precision.*` value)."""
    check(value, "precision", TRAINING_PRECISIONS)
    import jax

    return jax.default_matmul_precision(matmul_precision(value))
