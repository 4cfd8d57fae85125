"""Fidelity to the reference codes' training protocols (docs/design.md, section 2), each against an
independent computation:

- warm start: a fresh optimizer every cycle, so the first step of a cycle is torch's SGD from zero
  momentum on the kept weights (torch.optim.SGD's update written in NumPy), and the loop hands cycle 1
  the weights cycle 0 ended with and zero momentum;
- learning rates: the model's follow torch's MultiStepLR as each code steps it (simulated as a scheduler
  object, not the closed form); the loss module's stays at --lr without `lossnet.lr_decay` (LPLgrad);
- preprocessing: pad-then-crop on the stored uint8 pixels (black padding, torchvision's offsets 0..2p),
  and what the model's first operation sees on a white image is exactly black and white under the
  reference's constants;
- the LL4AL/LPLgrad joint step: its update equals jax.grad of cross-entropy + weight x a ranking loss
  written as a plain Python loop over pairs, with the block features detached after `detach_epoch`
  (the reference's `epoch > epoch_loss`) and not before, and the loss module updated;
- the ISAL presets: how many samples train and what R is.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import loop, tasks, train
from jaxal.config import build_config
from jaxal.data import load_dataset
from jaxal.models import MLP, LossNet, ModelOutput, SmallCNN, adapt
from jaxal.train import TrainOptions, create_train_state, fresh_optimizer, learning_rates, train_step

from conftest import to64  # tests/conftest.py

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def leaves(tree) -> list[np.ndarray]:
    return [np.array(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def cross_entropy(logits, labels):
    """Per-example CE written out (not jaxal.losses): logsumexp minus the true logit."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def step(state, x, y, lr, *, model, lossnet=None, options, detach=False):
    lr = {part: np.float64(value) for part, value in lr.items()}
    return train_step(state, x, y, jax.random.key(0), lr, np.asarray(detach), model=model, lossnet=lossnet,
                      options=options)


# ---- warm start: a fresh optimizer every cycle ------------------------------------------------------------


class TorchSGD:
    """torch.optim.SGD(lr, momentum, weight_decay) in NumPy: d = g + wd * p; buf = d on the first step, else
    momentum * buf + d; p -= lr * buf. `reset()` is what building a new optimizer does."""

    def __init__(self, params: list[np.ndarray]):
        self.params, self.buffers = [p.copy() for p in params], None

    def reset(self):
        self.buffers = None

    def step(self, grads: list[np.ndarray], lr: float):
        directions = [g + WEIGHT_DECAY * p for g, p in zip(grads, self.params)]
        if self.buffers is None:
            self.buffers = directions
        else:
            self.buffers = [MOMENTUM * b + d for b, d in zip(self.buffers, directions)]
        self.params = [p - lr * b for p, b in zip(self.params, self.buffers)]


def test_a_fresh_optimizer_steps_like_a_new_torch_sgd_on_the_kept_weights(x64):
    model = MLP(num_classes=3, hidden=(6,), dropout_rate=0.0)
    options = TrainOptions(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, augmentation="none")
    state = to64(create_train_state(model, None, jax.random.key(1), (2, 2, 1), options))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 2, 2, 1)), rng.integers(0, 3, 8).astype(np.int32)

    treedef = jax.tree.structure(state.params["model"])

    def grads(params: list[np.ndarray]) -> list[np.ndarray]:
        loss = lambda p: jnp.mean(cross_entropy(model.apply({"params": p}, x).logits, y))  # noqa: E731
        return leaves(jax.grad(loss)(jax.tree.unflatten(treedef, params)))

    torch_sgd = TorchSGD(leaves(state.params["model"]))
    for lr, fresh in [(0.1, False), (0.1, False), (0.05, False), (0.05, True), (0.05, False)]:
        if fresh:  # a new cycle: the weights kept, the optimizer new
            carried = step(jax.tree.map(jnp.copy, state), x, y, {"model": lr, "lossnet": lr}, model=model,
                           options=options)[0]
            state = fresh_optimizer(state, TrainOptions(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))
            torch_sgd.reset()
        torch_sgd.step(grads(torch_sgd.params), lr)
        state = step(state, x, y, {"model": lr, "lossnet": lr}, model=model, options=options)[0]
        for got, want in zip(leaves(state.params["model"]), torch_sgd.params):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
        if fresh:  # the momentum that a carried-over optimizer would have added is not negligible
            gap = max(np.abs(a - b).max() for a, b in zip(leaves(carried.params["model"]), torch_sgd.params))
            assert gap > 1e-4
    assert int(state.step) == 2  # counted from the fresh optimizer


def test_adam_steps_like_torch_adam_in_numpy(x64):
    """--optimizer adam (the cryo-ET CPU preset's) against torch.optim.Adam's update written in NumPy: d = g +
    wd * p; m, v = moving averages of d and d^2 (0.9, 0.999); p -= lr * m_hat / (sqrt(v_hat) + 1e-8)."""
    model = MLP(num_classes=3, hidden=(6,), dropout_rate=0.0)
    options = TrainOptions(weight_decay=WEIGHT_DECAY, augmentation="none", optimizer="adam")
    state = to64(create_train_state(model, None, jax.random.key(1), (2, 2, 1), options))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 2, 2, 1)), rng.integers(0, 3, 8).astype(np.int32)
    treedef = jax.tree.structure(state.params["model"])
    params = leaves(state.params["model"])
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    for t, lr in enumerate([1e-2, 1e-2, 3e-3], start=1):
        loss = lambda p: jnp.mean(cross_entropy(model.apply({"params": p}, x).logits, y))  # noqa: E731
        grads = leaves(jax.grad(loss)(jax.tree.unflatten(treedef, params)))
        directions = [g + WEIGHT_DECAY * p for g, p in zip(grads, params)]
        m = [0.9 * a + 0.1 * d for a, d in zip(m, directions)]
        v = [0.999 * a + 0.001 * d * d for a, d in zip(v, directions)]
        params = [p - lr * (a / (1 - 0.9**t)) / (np.sqrt(b / (1 - 0.999**t)) + 1e-8) for p, a, b in zip(params, m, v)]
        state = step(state, x, y, {"model": lr, "lossnet": lr}, model=model, options=options)[0]
        for got, want in zip(leaves(state.params["model"]), params):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("warm_start", [True, False])
def test_the_loop_starts_every_warm_cycle_from_the_kept_weights_and_zero_momentum(tmp_path, monkeypatch,
                                                                                   warm_start):
    calls = []
    real_train_model = loop.train_model

    def recording_train_model(state, *args, **kwargs):
        before = (leaves(state.params), leaves(state.opt_state), int(state.step))
        state, metrics = real_train_model(state, *args, **kwargs)
        calls.append((before, (leaves(state.params), leaves(state.opt_state))))
        return state, metrics

    monkeypatch.setattr(loop, "train_model", recording_train_model)
    config = build_config(strategy="random", model="mlp", initial_size=30, budget=10, cycles=2, epochs=2,
                          batch_size=16, warm_start=warm_start, progress=False)
    loop.run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
    ((_, (params_0, momentum_0)), ((params_1, momentum_1_in, step_1), _)) = calls
    assert any(np.abs(m).max() > 0 for m in momentum_0)  # cycle 0 ends with momentum...
    if warm_start:
        for kept, trained in zip(params_1, params_0):
            np.testing.assert_array_equal(kept, trained)
        assert all(np.all(m == 0) for m in momentum_1_in) and step_1 == 0  # ...which cycle 1 does not inherit
    else:
        assert any(not np.array_equal(a, b) for a, b in zip(params_1, params_0))  # retrained from scratch


# ---- learning rates ----------------------------------------------------------------------------------------


def torch_multistep_lrs(base_lr, milestones, epochs, step_before_epoch=False, stepped=True):
    """The lr each epoch trains with, simulating torch's MultiStepLR object (gamma 0.1): construction leaves
    last_epoch 0; each `step()` increments it and multiplies the lr by 0.1 on reaching a milestone. The
    Wang/LPLgrad codes step after each epoch, LL4AL's at the start of each (`step_before_epoch`); LPLgrad
    never steps its loss module's (`stepped=False`)."""
    lr, last_epoch, used = base_lr, 0, []

    def scheduler_step():
        nonlocal lr, last_epoch
        last_epoch += 1
        if stepped and last_epoch in milestones:
            lr *= 0.1

    for _ in range(epochs):
        if step_before_epoch:
            scheduler_step()
        used.append(lr)
        if not step_before_epoch:
            scheduler_step()
    return np.array(used)


def preset_lrs(preset: str, part: str) -> np.ndarray:
    config = build_config(preset)
    return np.array([learning_rates(config.lr, config.lr_milestones, config.lr_gamma, epoch,
                                    config.lossnet.lr_decay)[part] for epoch in range(config.epochs)])


@pytest.mark.parametrize("preset, model_schedule, lossnet_schedule", [
    ("wang2022_cifar10_code", {}, None),
    ("lplgrad_cifar10", {}, dict(stepped=False)),  # only the backbone's scheduler is stepped
    ("yoo2019_ll4al_cifar10", dict(step_before_epoch=True), dict(step_before_epoch=True)),
    ("isal2021_cifar10", {}, None),  # pycls: lr of epoch e = 0.1 * 0.1 ** (e >= 160)
])
def test_presets_learning_rates_follow_the_reference_schedulers(preset, model_schedule, lossnet_schedule):
    np.testing.assert_allclose(preset_lrs(preset, "model"), torch_multistep_lrs(0.1, [160], 200, **model_schedule),
                               rtol=1e-6)
    if lossnet_schedule is not None:
        np.testing.assert_allclose(preset_lrs(preset, "lossnet"),
                                   torch_multistep_lrs(0.1, [160], 200, **lossnet_schedule), rtol=1e-6)


@pytest.mark.parametrize("lr_decay", [False, True])
def test_training_gives_each_epoch_its_learning_rates_and_detaches_after_detach_epoch(monkeypatch, lr_decay):
    seen = []
    real_step = train.train_step

    def recording_step(state, x, y, rng, lr, detach, **kwargs):
        seen.append((float(lr["model"]), float(lr["lossnet"]), bool(detach)))
        return real_step(state, x, y, rng, lr, detach, **kwargs)

    monkeypatch.setattr(train, "train_step", recording_step)
    model, lossnet, options = SmallCNN(3, channels=(2,), hidden=4, dropout_rate=0.0), LossNet(3), TrainOptions()
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(8, 4, 4, 1)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32)
    state = create_train_state(model, lossnet, jax.random.key(0), (4, 4, 1), options)
    train.train_model(state, images, labels, np.arange(8), model=model, lossnet=lossnet, options=options, epochs=4,
                      batch_size=8, lr=0.05, lr_milestones=(1, 3), lr_gamma=0.1, detach_epoch=1, seed=0,
                      lossnet_lr_decay=lr_decay)
    model_lrs = [0.05, 0.005, 0.005, 0.0005]
    assert [s[0] for s in seen] == pytest.approx(model_lrs, rel=1e-6)
    assert [s[1] for s in seen] == pytest.approx(model_lrs if lr_decay else [0.05] * 4, rel=1e-6)
    assert [s[2] for s in seen] == [False, False, True, True]  # epoch > detach_epoch, 0-based epochs


# ---- preprocessing ----------------------------------------------------------------------------------------


def find_crop(out, image, padding):
    """(dy, dx, flipped) such that `out` is the black-padded `image` cropped at (dy, dx), then maybe
    flipped left-right; None if no such crop exists."""
    size = image.shape[0]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))  # zeros: black
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy:dy + size, dx:dx + size]
            for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
                if np.array_equal(out, candidate):
                    return dy, dx, flipped
    return None


@pytest.mark.parametrize("mode", ["crop", "crop_flip"])
def test_augmentation_pads_the_stored_pixels_black_with_torchvisions_offsets(mode):
    padding = 2
    images = np.random.default_rng(0).integers(1, 256, (300, 8, 8, 3), dtype=np.uint8)  # no black pixel
    out = np.asarray(tasks.augment_images(jax.random.key(3), jnp.asarray(images), mode, padding))
    assert out.dtype == np.uint8
    found = [find_crop(o, image, padding) for o, image in zip(out, images)]
    assert None not in found
    # torchvision's RandomCrop draws offsets in 0..2p inclusive (randint(0, h - th + 1)); pycls's 0..2p-1.
    assert {f[0] for f in found} == {f[1] for f in found} == set(range(2 * padding + 1))
    assert {f[2] for f in found} == ({False, True} if mode == "crop_flip" else {False})


class InputSpy(nn.Module):
    """Records the per-channel min and max of what it is given (the normalised batch) in batch_stats."""

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False) -> ModelOutput:
        low = self.variable("batch_stats", "input_min", jnp.zeros, (x.shape[-1],))
        high = self.variable("batch_stats", "input_max", jnp.zeros, (x.shape[-1],))
        if train:
            low.value, high.value = jnp.min(x, axis=(0, 1, 2)), jnp.max(x, axis=(0, 1, 2))
        features = jnp.mean(x, axis=(1, 2))
        return ModelOutput(nn.Dense(2, name="head")(features), features, ())


# The constants as the reference codes write them: torchvision Normalize on ToTensor's [0, 1] (Wang,
# LL4AL, LPLgrad), and pycls's on 0..255 pixels (ISAL).
REFERENCE_CONSTANTS = {
    "pytorch_cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "pycls_cifar": (np.array([125.3, 123.0, 113.9]) / 255, np.array([63.0, 62.1, 66.7]) / 255),
}


@pytest.mark.parametrize("normalization", sorted(REFERENCE_CONSTANTS))
def test_the_model_sees_black_padding_and_white_pixels_under_the_reference_constants(tmp_path, normalization):
    white = np.full((16, 8, 8, 3), 255, np.uint8)
    labels = np.arange(16) % 2
    np.savez(tmp_path / "white.npz", x_train=white, y_train=labels, x_test=white[:2], y_test=labels[:2])
    data = load_dataset(str(tmp_path / "white.npz"), normalization=normalization, augmentation="crop")
    mean, std = (np.asarray(c, np.float64) for c in REFERENCE_CONSTANTS[normalization])
    np.testing.assert_allclose(data.normalization.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.normalization.std, std, rtol=1e-12)
    model = adapt(InputSpy(), data.normalization)
    options = loop.train_options(build_config(), data)
    assert (options.augmentation, options.crop_padding) == ("crop", 1)
    state = create_train_state(model, None, jax.random.key(0), data.image_shape, options)
    state, _ = train_step(state, data.x_train, data.y_train, jax.random.key(1), learning_rates(0.1, (), 0.1, 0),
                          np.asarray(False), model=model, lossnet=None, options=options)
    # Black (0) padding normalised, and the white pixels: padding after normalisation would give 0 instead.
    np.testing.assert_allclose(state.batch_stats["input_min"], (0.0 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(state.batch_stats["input_max"], (1.0 - mean) / std, rtol=1e-6)


# ---- the LL4AL / LPLgrad joint step ----------------------------------------------------------------------


def ranking_loss_loop(predicted, target, margin):
    """LossPredLoss of the LL4AL code, one pair at a time: example i against n-1-i, sign +1 where the
    target loss of i is larger, else -1 (2 * sign(clamp(diff, min=0)) - 1); mean over the n // 2 pairs."""
    n = len(target)
    total = 0.0
    for i in range(n // 2):
        j = n - 1 - i
        sign = 1.0 if target[i] - target[j] > 0 else -1.0
        total = total + jnp.maximum(margin - sign * (predicted[i] - predicted[j]), 0.0)
    return total / (n // 2)


@pytest.mark.parametrize("detach", [False, True])
def test_joint_step_equals_grad_of_cross_entropy_plus_a_ranking_loss_loop(x64, detach):
    model = SmallCNN(3, channels=(2, 3), hidden=4, dropout_rate=0.0)
    lossnet = LossNet(3)
    weight, margin, lr = 0.7, 0.5, {"model": 0.1, "lossnet": 0.03}
    options = TrainOptions(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, augmentation="none",
                           lossnet_margin=margin, lossnet_weight=weight)
    state = to64(create_train_state(model, lossnet, jax.random.key(2), (4, 4, 1), options))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 4, 4, 1)), rng.integers(0, 3, 6).astype(np.int32)
    params = jax.tree.map(np.array, state.params)
    target = np.asarray(cross_entropy(model.apply({"params": params["model"]}, x).logits, y))

    def objective(p, with_ranking=True):
        output = model.apply({"params": p["model"]}, x)
        loss = jnp.mean(cross_entropy(output.logits, y))
        if not with_ranking:
            return loss
        blocks = [jax.lax.stop_gradient(b) for b in output.blocks] if detach else list(output.blocks)
        predicted = lossnet.apply({"params": p["lossnet"]}, blocks)
        return loss + weight * ranking_loss_loop(predicted, target, margin)

    def sgd_first_step(p, g, part):  # torch SGD from a new optimizer: p - lr * (g + wd * p)
        return jax.tree.map(lambda a, b: a - lr[part] * (b + WEIGHT_DECAY * a), p[part], g[part])

    grads = jax.grad(objective)(params)
    new_state, metrics = step(state, x, y, lr, model=model, lossnet=lossnet, options=options, detach=detach)
    for part in ("model", "lossnet"):
        for got, want in zip(leaves(new_state.params[part]), leaves(sgd_first_step(params, grads, part))):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    predicted = np.asarray(lossnet.apply({"params": params["lossnet"]}, model.apply({"params": params["model"]},
                                                                                     x).blocks))
    assert float(metrics["ranking_loss"]) == pytest.approx(float(ranking_loss_loop(predicted, target, margin)),
                                                           rel=1e-12)
    # The loss module learns; the backbone receives the ranking loss's gradient only before detach_epoch.
    assert max(np.abs(a - b).max() for a, b in zip(leaves(new_state.params["lossnet"]),
                                                   leaves(params["lossnet"]))) > 1e-4
    ce_only = leaves(jax.grad(objective)(params, with_ranking=False)["model"])
    differences = [np.abs(a - b).max() for a, b in zip(leaves(grads["model"]), ce_only)]
    if detach:
        assert max(differences) == 0.0
    else:
        assert max(differences) > 1e-6


# ---- ISAL's presets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, trained, leak_warning", [("isal2021_cifar10", 27, False),
                                                           ("isal2021_cifar10_code", 30, True)])
def test_isal_presets_train_on_what_their_docstring_says(tmp_path, monkeypatch, recwarn, preset, trained,
                                                          leak_warning):
    """The presets scaled to digits (initial 30, val split 3 where the preset has one: 100 of 1000)."""
    sizes = []
    real_train_model = loop.train_model

    def recording_train_model(state, images, labels, labeled, **kwargs):
        sizes.append(len(labeled))
        return real_train_model(state, images, labels, labeled, **kwargs)

    monkeypatch.setattr(loop, "train_model", recording_train_model)
    preset_config = build_config(preset)
    config = build_config(preset, dataset="digits", model="cnn", normalization="dataset", augmentation="none",
                          initial_size=30, val_size=3 if preset_config.val_size else 0, budget=10, cycles=2,
                          trials=1, epochs=1, batch_size=16, eval_batch_size=64, progress=False,
                          influence=dict(depth=4, repeats=1))
    assert (preset_config.initial_size, preset_config.val_size) == ((1000, 100) if trained == 27 else (1000, 0))
    records = loop.run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
    assert sizes == [trained, trained + 10]
    assert [r["num_labeled"] for r in records] == [30, 40]
    assert records[0]["strategy_info"]["reference"] == ("test" if leak_warning else "val")
    warned = any("TEST LABELS" in str(w.message) for w in recwarn.list)
    assert warned == leak_warning
