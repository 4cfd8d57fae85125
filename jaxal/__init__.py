"""jaxal: deep active learning in JAX/Flax.

Gradient-norm (exp-gn, ent-gn, EGL, LPLgrad) and influence-based (ISAL) query strategies, the
baselines they are compared with, and diagnostics of how tight the gradient-norm theory's bounds are.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # `jaxal.ActiveLearner` without importing JAX at `import jaxal` (PEP 562).
    if name == "ActiveLearner":
        from jaxal.learner import ActiveLearner

        return ActiveLearner
    raise AttributeError(f"module 'jaxal' has no attribute {name!r}")
