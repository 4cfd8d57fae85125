"""Influence predictions against exact retraining (leave-one-out and add-one), float64.

Problem: L2-regularised logistic regression on the digits 1 vs 7 of scikit-learn, pixels / 16, with
training objective `J_S(theta) = (1/n) sum_{j in S} l_j(theta) + (lam/2) ||theta||^2`, n = the size
of the original training set, kept FIXED when a point is removed or added (scikit-learn's
`C = 1/(n lam)` held fixed). Removing point i is then exactly up-weighting it by eps = -1/n and adding
z is eps = +1/n, so Koh & Liang's first-order predictions are, with H the Hessian of J at theta*:

    remove i:  L_test(theta_-i) - L_test(theta*) ~ +(1/n) grad L_test^T H^-1 grad l_i
    add z:     L_R(theta_+z)    - L_R(theta*)    ~ -(1/n) grad L_R^T H^-1 grad l_z = I(z, R) / n

`grad l` is the gradient of the data loss alone (no regulariser). Every retraining is Newton's
method to a gradient norm below 1e-10.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_digits

from jaxal import influence

LAM = 0.01
N_TRAIN, N_POOL = 150, 60
NEWTON_STEPS = 30


pytestmark = pytest.mark.usefixtures("x64")  # every test in float64 (conftest)


def example_loss_fn(params, example):
    """Logistic loss of one example, label in {0, 1}."""
    x, y = example
    z = x @ params["w"] + params["b"]
    return jax.nn.softplus(z) - y * z


def pseudo_label_loss_fn(params, x):
    """ISAL's loss of an unlabelled point: the loss at the predicted class."""
    z = x @ params["w"] + params["b"]
    return example_loss_fn(params, (x, jax.lax.stop_gradient((z > 0).astype(z.dtype))))


def regulariser(params):
    return 0.5 * LAM * (jnp.sum(params["w"] ** 2) + params["b"] ** 2)


def training_loss(params, batch):
    """The mean training loss (what the Hessian is taken of): mean data loss + regulariser."""
    return influence.mean_loss(example_loss_fn)(params, batch) + regulariser(params)


def unravel(theta):
    return {"w": theta[:-1], "b": theta[-1]}


def ravel(params):
    return jnp.concatenate([params["w"], params["b"][None]])


@jax.jit
def fit(xs, ys, mask, theta0):
    """argmin (1/N_TRAIN) sum_j mask_j l_j + reg, by Newton's method from theta0."""

    def objective(theta):
        losses = jax.vmap(example_loss_fn, (None, 0))(unravel(theta), (xs, ys))
        return jnp.sum(mask * losses) / N_TRAIN + regulariser(unravel(theta))

    def step(theta, _):
        return theta - jnp.linalg.solve(jax.hessian(objective)(theta), jax.grad(objective)(theta)), None

    theta = jax.lax.scan(step, theta0, None, length=NEWTON_STEPS)[0]
    return theta, jnp.linalg.norm(jax.grad(objective)(theta))


fit_many = jax.jit(jax.vmap(fit, (None, None, 0, None)))


@pytest.fixture(scope="module")
def problem():
    with jax.enable_x64(True):
        digits = load_digits()
        keep = np.isin(digits.target, [1, 7])
        xs = digits.data[keep] / 16.0
        ys = (digits.target[keep] == 7).astype(np.float64)
        order = np.random.default_rng(0).permutation(len(xs))
        xs, ys = jnp.asarray(xs[order]), jnp.asarray(ys[order])
        train = (xs[:N_TRAIN], ys[:N_TRAIN])
        pool = (xs[N_TRAIN:N_TRAIN + N_POOL], ys[N_TRAIN:N_TRAIN + N_POOL])
        test = (xs[N_TRAIN + N_POOL:], ys[N_TRAIN + N_POOL:])
        theta, grad_norm = fit(*train, jnp.ones(N_TRAIN), jnp.zeros(xs.shape[1] + 1))
        assert grad_norm < 1e-10
        return {"train": train, "pool": pool, "test": test, "params": unravel(theta), "theta": theta}


def test_loss(params, data):
    return influence.mean_loss(example_loss_fn)(params, data)


test_loss.__test__ = False  # a helper, not a test


def solvers(problem):
    """s_test = H^-1 grad L_test by the three methods, with settings that converge here."""
    params, train = problem["params"], problem["train"]
    v = influence.mean_gradient(example_loss_fn, params, problem["test"])
    lam_max = float(influence.power_iteration(training_loss, params, train, rng=jax.random.key(0), iters=100))
    # Single-example Hessians are p(1-p) x x^T + lam I, at most 0.25 (||x||^2 + 1) + lam.
    scale = 1.1 * max(lam_max, float(0.25 * (jnp.max(jnp.sum(train[0] ** 2, axis=1)) + 1) + LAM))
    return {
        "exact": influence.exact_inverse_hvp(training_loss, params, train, v),
        "cg": influence.cg(training_loss, params, train, v, tol=1e-12, maxiter=500),
        # damping 0: the fixed point is H^-1 v itself; the slowest direction contracts by
        # 1 - lambda_min(H)/scale per step, hence the depth; H^-1 amplifies the minibatch noise along
        # the flat directions (eigenvalue ~ LAM) by 1/LAM, hence 32 chains (about 1% error, see below).
        "lissa": influence.lissa(training_loss, params, train, v, rng=jax.random.key(1), depth=3000, repeats=32,
                                 damping=0.0, scale=scale, batch_size=30),
    }


def test_leave_one_out_matches_prediction(problem):
    params, train, test = problem["params"], problem["train"], problem["test"]
    estimates = solvers(problem)
    predicted = {name: np.asarray(influence.influence_scores(example_loss_fn, params, train, s)) / N_TRAIN
                 for name, s in estimates.items()}
    order = np.argsort(predicted["exact"])
    chosen = np.concatenate([order[:20], order[-20:]])  # 20 most negative and 20 most positive
    masks = jnp.ones((len(chosen), N_TRAIN)).at[jnp.arange(len(chosen)), chosen].set(0.0)
    thetas, grad_norms = fit_many(*train, masks, problem["theta"])
    assert float(jnp.max(grad_norms)) < 1e-10
    base = test_loss(params, test)
    actual = np.array([float(test_loss(unravel(t), test) - base) for t in thetas])
    for name, pred in predicted.items():
        pearson = stats.pearsonr(pred[chosen], actual)[0]
        spearman = stats.spearmanr(pred[chosen], actual)[0]
        assert pearson > 0.9 and spearman > 0.9, (name, pearson, spearman)
    np.testing.assert_allclose(predicted["cg"], predicted["exact"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(predicted["lissa"], predicted["exact"],
                               atol=0.05 * np.max(np.abs(predicted["exact"])))


def test_isal_sign_adding_most_negative_point_lowers_reference_loss(problem):
    """ISAL's score I(z, R) = -grad L(R)^T H^-1 grad l(z), with l at the pseudo-label (z unlabelled).
    The point with the most negative score, added with its (oracle) true label, lowers the reference
    loss, by more than the point of the least negative score; across the pool the predicted change
    I(z, R)/n tracks retraining. Here the model classifies the whole pool correctly, so the pseudo-label
    is the true label and every score is negative (making a correct prediction more confident helps);
    to see the other sign, a point added with a WRONG label has a positive score and raises the loss."""
    params, train, pool, reference = problem["params"], problem["train"], problem["pool"], problem["test"]
    v = influence.mean_gradient(example_loss_fn, params, reference)
    s_test = influence.exact_inverse_hvp(training_loss, params, train, v)
    isal = -np.asarray(influence.influence_scores(pseudo_label_loss_fn, params, pool[0], s_test))
    flipped = (pool[0], 1.0 - pool[1])
    wrong_label = -np.asarray(influence.influence_scores(example_loss_fn, params, flipped, s_test))

    def retrain_with_each(xs_add, ys_add):
        xs = jnp.concatenate([train[0], xs_add])
        ys = jnp.concatenate([train[1], ys_add])
        masks = jnp.concatenate([jnp.ones((len(xs_add), N_TRAIN)), jnp.eye(len(xs_add))], axis=1)
        thetas, grad_norms = fit_many(xs, ys, masks, problem["theta"])
        assert float(jnp.max(grad_norms)) < 1e-10
        base = test_loss(params, reference)
        return np.array([float(test_loss(unravel(t), reference) - base) for t in thetas])

    actual = retrain_with_each(*pool)
    best, least = int(np.argmin(isal)), int(np.argmax(isal))
    predicted_label = float(pool[0][best] @ params["w"] + params["b"] > 0)
    assert predicted_label == float(pool[1][best])  # the pseudo-label is right for the chosen point
    assert isal[best] < 0 and actual[best] < 0
    assert actual[best] < actual[least]
    np.testing.assert_allclose(isal[best] / N_TRAIN, actual[best], rtol=0.3)
    assert stats.pearsonr(isal / N_TRAIN, actual)[0] > 0.9
    assert stats.spearmanr(isal, actual)[0] > 0.9

    harmful = int(np.argmax(wrong_label))
    actual_wrong = retrain_with_each(flipped[0][harmful:harmful + 1], flipped[1][harmful:harmful + 1])
    assert wrong_label[harmful] > 0 and actual_wrong[0] > 0
    np.testing.assert_allclose(wrong_label[harmful] / N_TRAIN, actual_wrong[0], rtol=0.5)
