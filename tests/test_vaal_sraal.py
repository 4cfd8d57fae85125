"""VAAL and SRAAL: the architecture against the reference's layer sizes, the losses and SRAAL's online
uncertainty indicator against NumPy transcriptions of the codes' formulas, the selections given fixed
discriminator outputs, the batch statistics of a padded chunk, and the k-center initial set against a
plain farthest-first loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal.config import Config, build_config
from jaxal.data import load_dataset
from jaxal.models import adapt, create_model
from jaxal.strategies import StrategyContext, get_strategy, sraal, vaal
from jaxal.train import TrainOptions, create_train_state, model_variables

TINY = dict(width=4, latent_dim=8, iterations=3, batch_size=16, discriminator_width=16)


def parameter_count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def init_shapes(module, *args):
    return jax.eval_shape(lambda key: module.init(key, *args), jax.random.key(0))


def torch_vae_parameters(latent, channels=3, decoded=None, classes=0):
    """The reference model.py's parameter count at 32x32, layer by layer (conv weights k*k*in*out)."""
    decoded = latent if decoded is None else decoded
    encoder = sum(16 * a * b for a, b in ((channels, 128), (128, 256), (256, 512), (512, 1024)))
    encoder += 2 * (128 + 256 + 512 + 1024)  # BatchNorm weight and bias
    heads = 2 * (4096 * latent + latent)  # fc_mu, fc_logvar
    decoder = decoded * 16384 + 16384 + sum(16 * a * b for a, b in ((1024, 512), (512, 256), (256, 128)))
    decoder += 2 * (512 + 256 + 128) + 128 * channels + channels
    classifier = (decoded * 1024 + 1024 + 1024 * 256 + 256 + 256 * classes + classes) if classes else 0
    return encoder + heads + decoder + classifier


def test_the_vae_and_discriminator_at_32x32_are_the_references():
    vae = vaal.VAE((32, 32, 3), 32, 128)
    assert parameter_count(init_shapes(vae, jnp.zeros((2, 32, 32, 3)), jax.random.key(1))["params"]) == \
        torch_vae_parameters(32)
    sraal_vae = vaal.VAE((32, 32, 3), 200, 128, decoder_layout="sraal", num_classes=100)
    assert parameter_count(init_shapes(sraal_vae, jnp.zeros((2, 32, 32, 3)), jax.random.key(1))["params"]) == \
        torch_vae_parameters(200, decoded=100, classes=100)
    # Discriminators: VAAL 32-512-512-1, SRAAL 200-512-512-512-512-1.
    assert parameter_count(init_shapes(vaal.Discriminator(512, 2), jnp.zeros((1, 32)))) == \
        32 * 512 + 512 + 512 * 512 + 512 + 512 + 1
    assert parameter_count(init_shapes(vaal.Discriminator(512, 4), jnp.zeros((1, 200)))) == \
        200 * 512 + 512 + 3 * (512 * 512 + 512) + 512 + 1


@pytest.mark.parametrize("shape,side", [((8, 8, 1), 16), ((28, 28, 1), 32), ((32, 32, 3), 32), ((20, 36, 3), 48)])
def test_the_vae_reconstructs_every_image_size(shape, side):
    assert vaal.padded_side(shape) == side
    vae = vaal.VAE(shape, 8, 4)
    out, variables = jax.eval_shape(lambda k: vae.init_with_output(k, jnp.zeros((3, *shape), jnp.uint8), k),
                                    jax.random.key(0))
    assert out.reconstruction.shape == out.target.shape == (3, *shape)
    assert out.mu.shape == out.logvar.shape == (3, 8) and out.class_logits is None
    # The encoder ends at side/16 (1024-channel maps at width 128: 4 * 2^3 = 32 here).
    assert variables["params"]["encoder"]["fc_mu"]["kernel"].shape == ((side // 16) ** 2 * 32, 8)


def test_vae_loss_is_the_codes(x64):
    rng = np.random.default_rng(0)
    recon, target, mu, logvar = (rng.normal(size=s) for s in ((4, 3, 3, 1), (4, 3, 3, 1), (4, 5), (4, 5)))
    out = vaal.VAEOutput(*(jnp.asarray(a) for a in (recon, target, mu, logvar)), None)
    mse = np.mean((recon - target) ** 2)
    kld_vaal = -0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar))  # VAAL's solver.py: summed over the batch
    kld_sraal = np.mean(0.5 * np.sum(np.exp(logvar) + mu**2 - 1.0 - logvar, 1))  # SRAAL's: batch mean
    assert float(vaal.vae_loss(out, Config().vaal)) == pytest.approx(mse + kld_vaal, rel=1e-12)
    assert float(vaal.vae_loss(out, Config().sraal)) == pytest.approx(5 * mse + kld_sraal, rel=1e-12)
    logits, targets = rng.normal(size=7) * 3, rng.uniform(size=7)
    p = 1 / (1 + np.exp(-logits))
    bce = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p))  # torch's BCELoss of the sigmoid
    assert float(vaal.binary_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) == pytest.approx(bce, rel=1e-12)


def indicator_of_the_code(probs: np.ndarray, ddof: int = 1) -> np.ndarray:
    """SRAAL's resnet.uncertainty_score, line by line (torch.var is unbiased: ddof 1)."""
    classes = probs.shape[1]
    maximum = probs.max(1)
    pp1 = 1 / classes - (1 - maximum) / (classes - 1)
    pp1 = (classes - 1) * pp1**2
    pp2 = (1 / classes - maximum) ** 2
    pp3 = (1 / classes) * (pp1 + pp2)
    var = probs.var(1, ddof=ddof)
    return 1 - maximum * pp3 / var


def test_online_uncertainty_indicator_is_the_codes(x64):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(10, 0.3), size=50)
    probs[0] = np.eye(10)[3]  # certain: the code gives 1/C, the population variant 0
    probs[1] = np.full(10, 0.1) + np.r_[0.05, -0.05, np.zeros(8)]
    np.testing.assert_allclose(sraal.online_uncertainty(jnp.asarray(probs)), indicator_of_the_code(probs),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sraal.online_uncertainty(jnp.asarray(probs), "population"),
                               indicator_of_the_code(probs, ddof=0), rtol=1e-10, atol=1e-12)
    assert float(sraal.online_uncertainty(jnp.asarray(probs[:1]))[0]) == pytest.approx(0.1, abs=1e-12)
    # A uniform prediction (0/0 in the code) gets the limit of p_min = p.
    uniform = sraal.online_uncertainty(jnp.full((1, 10), 0.1), "population")
    assert float(uniform[0]) == pytest.approx(0.9, abs=1e-12)


# ---- the strategies, with the training replaced by fixed discriminator outputs ------------------------


@pytest.fixture(scope="module")
def digits_context():
    data = load_dataset("digits")
    model = adapt(create_model("cnn", 10), data.normalization)
    state = create_train_state(model, None, jax.random.key(0), data.image_shape, TrainOptions())
    config = build_config(vaal=TINY, sraal=TINY, eval_batch_size=16)
    return StrategyContext(model=model, variables=model_variables(state), pool_x=data.x_train[100:137],
                           labeled_x=data.x_train[:40], labeled_y=data.y_train[:40], num_classes=10,
                           config=config, rng=jax.random.key(1))


@pytest.mark.parametrize("name", ["vaal", "sraal"])
def test_selection_given_fixed_discriminator_outputs(digits_context, monkeypatch, name):
    ctx = digits_context
    outputs = np.random.default_rng(2).normal(size=37).astype(np.float32)
    trained = {}

    def fake_train(spec, key, labeled_x, labeled_y, unlabeled_x, targets, iterations, mesh=None):
        trained.update(spec=spec, targets=targets, labels=labeled_y, iterations=iterations)
        return None, {}

    monkeypatch.setattr(vaal, "train_adversarial", fake_train)
    monkeypatch.setattr(vaal, "discriminator_logits", lambda spec, state, xs, mesh=None: jnp.asarray(outputs))
    chosen = np.asarray(get_strategy(name).select(ctx, 6).chosen)
    if name == "vaal":  # the lowest "labelled" outputs: torch.topk(-preds)
        assert chosen.tolist() == np.argsort(outputs)[:6].tolist()
        assert trained["spec"].labeled_target == 1.0 and not trained["targets"].any()
        assert trained["iterations"] == 3  # the configured count
    else:  # the highest state: torch.topk(preds); the unlabelled targets are the task model's indicator
        assert chosen.tolist() == np.argsort(-outputs)[:6].tolist()
        assert trained["spec"].labeled_target == 0.0
        logits = np.asarray(ctx.model.apply(ctx.variables, ctx.pool_x, train=False).logits, np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        np.testing.assert_allclose(trained["targets"], indicator_of_the_code(probs), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(trained["labels"], ctx.labeled_y)
        assert trained["spec"].vae.num_classes == 10 and trained["spec"].discriminator.layers == 4


@pytest.mark.parametrize("name", ["vaal", "sraal"])
def test_iterations_per_cycle_are_the_codes(digits_context, monkeypatch, name):
    """The count a cycle trains for, at the reference defaults: VAAL's solver.py trains num_images *
    train_epochs // batch_size iterations (num_images counting labelled and unlabelled: here 40 + 37,
    100 epochs, batch 128: 7700 // 128 = 60); SRAAL's arguments.py fixes train_iterations = 20000."""
    counts = []
    monkeypatch.setattr(vaal, "train_adversarial", lambda *args, **kwargs: counts.append(args[6]) or (None, {}))
    monkeypatch.setattr(vaal, "discriminator_logits", lambda spec, state, xs, mesh=None: jnp.zeros(len(xs)))
    reference = dataclasses.replace(digits_context, config=Config())  # the codes' options, not a preset's
    get_strategy(name).select(reference, 6)
    assert counts == [{"vaal": 60, "sraal": 20000}[name]]


def test_batch_statistics_of_a_padded_chunk_leave_the_padding_out(digits_context):
    """13 candidates in chunks of 8: the last chunk has 5 real rows and 3 of padding; its BatchNorm
    statistics must be those of the 5 rows alone."""
    ctx = digits_context
    options = build_config(vaal={**TINY, "batch_size": 8}).vaal
    spec = vaal.adversarial_spec(ctx, options, labeled_target=1.0)
    state = vaal.init_adversarial_state(vaal.initialization_key(jax.random.key(3)), spec)
    # Non-trivial running averages, so that "batch" and "running" differ.
    state = state.replace(batch_stats=jax.tree.map(lambda s: s + 0.3, state.batch_stats))
    xs = np.asarray(ctx.pool_x[:13])
    scores = np.asarray(vaal.discriminator_logits(spec, state, xs))
    variables = {"params": state.vae, "batch_stats": state.batch_stats}

    def direct(rows):  # the rows as one training-mode batch, no padding anywhere
        (mu, _), _ = spec.vae.apply(variables, rows, train=True, method=vaal.VAE.encode, mutable=["batch_stats"])
        return np.asarray(spec.discriminator.apply({"params": state.discriminator}, mu))

    np.testing.assert_allclose(scores[:8], direct(xs[:8]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores[8:], direct(xs[8:]), rtol=1e-5, atol=1e-6)
    running = vaal.discriminator_logits(dataclass_replace(spec, selection_batch_norm="running"), state, xs)
    mu, _ = spec.vae.apply(variables, xs, train=False, method=vaal.VAE.encode)
    np.testing.assert_allclose(running, spec.discriminator.apply({"params": state.discriminator}, mu), rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(running, scores, atol=1e-3)


def dataclass_replace(spec, **options):
    import dataclasses

    return dataclasses.replace(spec, options=dataclasses.replace(spec.options, **options))


def farthest_first(points: np.ndarray, first: int, k: int) -> list:
    """Greedy k-center from one centre, a plain loop (the reference kCenterGreedy with one selected)."""
    chosen = [first]
    distance = np.linalg.norm(points - points[first], axis=1)
    for _ in range(k - 1):
        j = int(np.argmax(distance))
        chosen.append(j)
        distance = np.minimum(distance, np.linalg.norm(points - points[j], axis=1))
    return chosen


def test_kcenter_initial_set_is_farthest_first_on_the_latent_means(monkeypatch):
    """The hook with the VAE training replaced by fixed latent means: a random first centre, then the
    farthest point each time, all outside the validation split; "random" keeps the given set."""

    images = np.random.default_rng(4).integers(0, 17, size=(60, 8, 8, 1)).astype(np.uint8)
    means = np.random.default_rng(5).normal(size=(60, 3)).astype(np.float32)
    val = np.array([2, 7, 11])
    candidates = np.setdiff1d(np.arange(60), val)
    monkeypatch.setattr(vaal, "train_adversarial", lambda *args, **kwargs: (None, {}))
    monkeypatch.setattr(vaal, "latent_means", lambda vae, state, xs, batch_size, mesh=None: jnp.asarray(means[candidates]))
    config = build_config(sraal={**TINY, "initial": "kcenter"})
    labeled = np.arange(20, 30)
    chosen = sraal.kcenter_initial_set(config, images, None, None, jax.random.key(7), labeled, val)
    assert len(chosen) == 10 and not np.intersect1d(chosen, val).size
    # The first centre is the hook's random draw: recover it as the one not explained by farthest-first.
    matches = [f for f in range(len(candidates))
               if sorted(candidates[farthest_first(means[candidates], f, 10)]) == chosen.tolist()]
    assert matches, "no first centre makes farthest-first select this set"
    again = sraal.kcenter_initial_set(config, images, None, None, jax.random.key(7), labeled, val)
    np.testing.assert_array_equal(chosen, again)
    assert sraal.kcenter_initial_set(build_config(), images, None, None, jax.random.key(7), labeled, val) is labeled
