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

How it is applied: the jitted bodies trace their products under `jax.default_matmul_precision(value)`
(`scope` below), which writes the precision into every `dot_general` and `convolution` of the program
(`precision = [HIGHEST, HIGHEST]` in its StableHLO; a test reads it back). The value is a static argument
of the jitted functions, so each precision has its own compiled program. "default" sets the backend's
default explicitly (so solvers at "default" stay there inside a run whose training is at "highest").
CPUs have no TF32: there every setting computes the same numbers.
"""

from __future__ import annotations

PRECISIONS = ("default", "highest")
SOLVERS_DEFAULT = "highest"


def check(value: str, flag: str) -> None:
    if value not in PRECISIONS:
        raise ValueError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {value!r}")


def scope(value: str):
    """A context in which traced matrix products take precision `value`."""
    check(value, "precision")
    import jax

    return jax.default_matmul_precision(value)
