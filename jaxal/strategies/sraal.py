"""SRAAL: State-Relabeling Adversarial Active Learning (Zhang et al., CVPR 2020).

Followed: the authors' code, Beichen1996/SRAAL (Beichen Zhang is the paper's first author): solver.py,
model.py, resnet.py, arguments.py. SRAAL is VAAL's adversarial structure (`jaxal.strategies.vaal`) with:

  - the supervised branch ("unified representation generator"): the VAE's latent sample is split in two
    halves, the first decoded, the second classified by a dense 1024-256-C network trained with
    cross-entropy on the labelled batch (weight 5 in the code's VAE loss, beside 5 x MSE and the KL
    averaged over the batch);
  - the state relabelling: the discriminator's target is 0 for labelled images and, for each unlabelled
    image, the online uncertainty indicator (OUI) of the task model's prediction p (C classes, m = max p):

        OUI(p) = 1 - m * V(p_min) / V(p),

    p_min being the least varied distribution with the same maximum (m, then (1 - m)/(C - 1) for every
    other class) and V the variance over classes. The code divides the population variance of p_min by
    torch.var(p), the unbiased one, so a one-hot prediction gets 1/C rather than 0; that is the default,
    and `indicator_variance="population"` uses the population variance for both (the two differ by an
    increasing affine map, so they rank alike but give the discriminator different targets). A uniform p
    (both variances 0: 0/0 in the code) gets the limit of p_min = p, a ratio of 1 (times the code's
    (C-1)/C);
  - selection: the highest discriminator output (the state of the most uncertain unlabelled images);
  - discriminator: four hidden layers of 512; Adam 5e-4 for both networks, both rates x0.85 thirty times
    over the 20000 iterations; batch 250; latent 200. The VAE's decoder keeps the code's order of
    BatchNorm and ReLU (see `vaal.Decoder`). The VAE step's adversarial targets are 1 for both batches,
    as in the code.

The indicator's task model: the code trains a ResNet-18 for the purpose (200 epochs, SGD 0.1) on the
labelled set, the same recipe as its task model; jaxal uses the task model the loop has just trained.

Initial set (`initial="kcenter"`): the paper initialises the labelled pool with a k-center-based sampling
instead of a random one; the code loads a saved initial set (results_cifar100/10.npy). jaxal's option:
a VAE of this section's architecture is trained without labels (reconstruction and KL only) on the
images outside the validation split, and greedy k-center (`baselines.greedy_k_center`, first centre at
random as in the k-center code the papers use) on their latent means picks the initial training set. It
replaces the random initial set of the trial, through the loop's `Strategy.initial_set` hook.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxal.config import Config
from jaxal.strategies import vaal
from jaxal.strategies.base import Scores, StrategyContext, register_scorer
from jaxal.strategies.baselines import greedy_k_center
from jaxal.train import predict

INDICATOR_VARIANCES = ("unbiased", "population")
INITIAL_SETS = ("random", "kcenter")


def online_uncertainty(probs: jax.Array, variance: str = "unbiased") -> jax.Array:
    """(n,) OUI of class probabilities (n, C) (see the module docstring)."""
    num_classes = probs.shape[-1]
    top = jnp.max(probs, axis=-1)
    # Population variance of p_min: (C-1) classes at (1-m)/(C-1), one at m, mean 1/C.
    least = ((num_classes - 1) * (1 / num_classes - (1 - top) / (num_classes - 1)) ** 2
             + (1 / num_classes - top) ** 2) / num_classes
    population = jnp.var(probs, axis=-1)
    # V(p_min) <= V(p) always; at (numerically) uniform p both vanish and the ratio is its limit 1.
    varied = population > jnp.finfo(probs.dtype).eps ** 2
    ratio = jnp.where(varied, jnp.clip(least / jnp.where(varied, population, 1.0), 0.0, 1.0), 1.0)
    if variance == "unbiased":
        ratio = ratio * (num_classes - 1) / num_classes  # torch.var divides by C - 1
    return 1.0 - top * ratio


def _check(config: Config) -> None:
    options = config.sraal
    vaal.check_options(options, "sraal")
    if options.latent_dim < 2 or options.latent_dim % 2:
        raise ValueError(f"--sraal.latent_dim must be even (half decoded, half classified), got {options.latent_dim}")
    for field, allowed in (("indicator_variance", INDICATOR_VARIANCES), ("initial", INITIAL_SETS)):
        if getattr(options, field) not in allowed:
            raise ValueError(f"unknown --sraal.{field} {getattr(options, field)!r}; choose one of: {', '.join(allowed)}")


def kcenter_initial_set(config, images, model, mesh, trial_key, labeled: np.ndarray, val: np.ndarray):
    """The `Strategy.initial_set` hook: with `--sraal.initial kcenter`, as many training indices as the
    random initial set has, by greedy k-center on the latent means of a VAE trained without labels on
    every image outside the validation split (see the module docstring); otherwise `labeled` unchanged."""
    options = config.sraal
    if options.initial != "kcenter":
        return labeled
    candidates = np.setdiff1d(np.arange(images.shape[0]), val)
    key = jax.random.fold_in(trial_key, 0x5AA1)  # a stream of its own, apart from the cycles' fold_in(key, c)
    train_key, first_key = jax.random.split(key)
    first_rng = np.random.default_rng(np.asarray(jax.random.key_data(first_key)))
    vae = vaal.VAE(tuple(images.shape[1:]), options.latent_dim, options.width, vaal.pixel_normalization(model),
                   "sraal")
    spec = vaal.AdversarialSpec(vae, vaal.Discriminator(1, 0), options, 0.0, adversarial=False)
    pool = images[candidates]
    state, _ = vaal.train_adversarial(spec, train_key, None, None, pool, np.zeros((len(pool),), np.float32),
                                      vaal.num_iterations(options, len(pool)), mesh)
    means = vaal.latent_means(vae, state, pool, options.batch_size, mesh)
    first = int(first_rng.integers(len(pool)))
    rest = np.asarray(greedy_k_center(means, means[first:first + 1], len(labeled) - 1, mesh))
    return np.sort(candidates[np.concatenate([[first], rest])])


@register_scorer("sraal", check=_check, initial_set=kcenter_initial_set)
def sraal_scores(ctx: StrategyContext):
    """Highest relabelled state from a VAE-adversary pair with a supervised branch (SRAAL, Zhang et al. 2020)."""
    options = ctx.config.sraal
    logits, _ = predict(ctx.model, ctx.variables, ctx.pool_x, ctx.config.eval_batch_size, mesh=ctx.mesh)
    targets = np.asarray(online_uncertainty(jax.nn.softmax(logits), options.indicator_variance), np.float32)
    spec = vaal.adversarial_spec(ctx, options, labeled_target=0.0, decoder_layout="sraal",
                                 num_classes=ctx.num_classes)
    iterations = vaal.num_iterations(options, len(ctx.labeled_x) + len(ctx.pool_x))
    state, losses = vaal.train_adversarial(spec, ctx.rng, np.asarray(ctx.labeled_x), np.asarray(ctx.labeled_y),
                                           np.asarray(ctx.pool_x), targets, iterations, ctx.mesh)
    info = {"vae_iterations": iterations, "mean_indicator": float(np.mean(targets)), **losses}
    return Scores(vaal.discriminator_logits(spec, state, ctx.pool_x, ctx.mesh), info)
