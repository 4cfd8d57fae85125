"""VAAL: Variational Adversarial Active Learning (Sinha, Ebrahimi & Darrell, ICCV 2019), and the
adversarial machinery that SRAAL (`jaxal.strategies.sraal`) shares with it.

Each cycle a beta-VAE and a discriminator on its latent means are built afresh and trained on the
labelled images and the candidates (the reference code creates both for every split; here they are
rebuilt from the cycle's strategy key, so a resumed run trains exactly what an uninterrupted one
trains and nothing extra goes into the checkpoint). One training iteration, as the code's `Solver.train`:

  - `vae_steps` VAE updates, each on a new (labelled, unlabelled) pair of batches: the VAE loss of both
    batches plus `adversary_weight` x the discriminator's cross-entropy against "labelled" for both (the
    VAE learns to make the unlabelled images look labelled);
  - `discriminator_steps` discriminator updates on the latent means of the last pair (the VAE frozen):
    cross-entropy against "labelled" (1) for labelled images and "unlabelled" (0) for the candidates.

VAE loss: `reconstruction_weight * MSE(reconstruction, image) + beta * KL(q(z|x) || N(0, I))`, the KL
summed over the batch and the latent dimensions (VAAL's code; SRAAL's takes the batch mean). Adam with
lr 5e-4 for both networks. Selection: the candidates the discriminator is most sure are unlabelled (the
lowest output; ranked by its logit, which orders them as the probability does without the float32
saturation ties of the sigmoid).

Architecture (the code's model.py): encoder of four 4x4 stride-2 convolutions with 128, 256, 512 and
1024 channels (`width` doubled per stage), BatchNorm and ReLU, two dense heads for the latent mean and
log-variance; decoder from a dense layer to a (side/8)^2 x 1024 map and three 4x4 stride-2 transposed
convolutions back to the full size, then a 1x1 transposed convolution to the image channels.
Discriminator: `discriminator_layers` dense ReLU layers of 512, then one logit. Initialisation as the
code leaves it: Kaiming-normal convolutions and dense layers of the Sequentials, PyTorch's default
uniform for the latent heads and the transposed convolutions (the code's `weight_init` never reaches
them), BatchNorm as PyTorch (momentum 0.1, eps 1e-5).

Image sizes. The reference is for 32x32: four halvings down to 2x2, the decoder up from 4x4. jaxal pads
the normalised images with zeros (the mean pixel) to a square side that is a multiple of 16 (at least
16) and reconstructs only the real pixels: 32x32 CIFAR is the reference exactly, 28x28 Fashion-MNIST
becomes 32x32, 8x8 digits become 16x16 (encoded to 1x1x1024, decoded from 2x2).

BatchNorm at selection: the codes never call `vae.eval()`, so the candidates are encoded in training
mode, each batch normalised by its own statistics. jaxal does the same over consecutive chunks of
`batch_size` candidates (the padding of the last chunk masked out of the statistics); with
`selection_batch_norm="running"` the running averages are used instead. Differences from the codes:
the task model is the loop's (VAAL's code trains its own VGG-16 inside the same iterations), the
candidates are the loop's scored subset, and the images are scored as stored (the codes score through
their training dataset objects, i.e. randomly flipped or cropped).

Parallelism: the train state is replicated over the mesh and each step's batches are split over its
`data` axis (the compiler all-reduces the gradients and the BatchNorm statistics), as the task model's
training; the candidates are scored through `parallel.map_chunks`. The iteration is one jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxal import parallel
from jaxal.config import Config, VAALOptions
from jaxal.data import crop_padding
from jaxal.tasks import AUGMENTATIONS, augment_images
from jaxal.train import epoch_batches
from jaxal.strategies.base import Scores, StrategyContext, register_scorer

SELECTION_BATCH_NORMS = ("batch", "running")
KL_REDUCTIONS = ("sum", "batch_mean")


# ---- initialisers: PyTorch's, as the reference codes leave them ---------------------------------------


def kaiming_normal():
    """`torch.nn.init.kaiming_normal_` (fan in, ReLU gain, untruncated): the codes' `kaiming_init`."""
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_default_kernel(mode: str = "fan_in"):
    """PyTorch's default U(+-1/sqrt(fan_in)); a transposed convolution's fan in is its output channels x
    kernel area, the "fan_out" of Flax's (kh, kw, in, out) kernel."""
    return nn.initializers.variance_scaling(1.0 / 3.0, mode, "uniform")


def torch_default_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _batch_norm(train: bool, x, mask):
    norm = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    return norm(x, mask=None if mask is None else jnp.broadcast_to(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape))


# ---- networks -----------------------------------------------------------------------------------------


def padded_side(image_shape) -> int:
    """The square side the VAE works at: the image's larger side rounded up to a multiple of 16, at least 16."""
    return max(16, parallel.round_up(max(image_shape[:2]), 16))


class Encoder(nn.Module):
    width: int
    latent_dim: int

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        for stage in range(4):
            x = nn.Conv(self.width * 2**stage, (4, 4), (2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                        kernel_init=kaiming_normal())(x)
            x = nn.relu(_batch_norm(train, x, mask))
        h = x.reshape((x.shape[0], -1))
        head = functools.partial(nn.Dense, self.latent_dim, kernel_init=torch_default_kernel(),
                                 bias_init=torch_default_bias(h.shape[-1]))
        return head(name="fc_mu")(h), head(name="fc_logvar")(h)


class Decoder(nn.Module):
    width: int
    side: int
    channels: int
    layout: str = "vaal"  # "sraal": SRAAL's code orders the first two stages' BatchNorm and ReLU differently

    @nn.compact
    def __call__(self, z, train: bool, mask=None):
        start = self.side // 8
        h = nn.Dense(8 * self.width * start * start, kernel_init=kaiming_normal(), bias_init=nn.initializers.zeros)(z)
        h = h.reshape((-1, start, start, 8 * self.width))
        for stage in range(3):
            # torch's ConvTranspose2d(k=4, s=2, p=1) doubles the size: padding k - 1 - p = 2 of the dilated input.
            h = nn.ConvTranspose(self.width * 2 ** (2 - stage), (4, 4), (2, 2), padding=((2, 2), (2, 2)),
                                 use_bias=False, kernel_init=torch_default_kernel("fan_out"))(h)
            if self.layout == "sraal" and stage == 0:
                h = _batch_norm(train, h, mask)  # SRAAL's model.py: BatchNorm, no ReLU
            elif self.layout == "sraal" and stage == 1:
                h = nn.relu(_batch_norm(train, nn.relu(h), mask))  # ReLU, BatchNorm, ReLU
            else:
                h = nn.relu(_batch_norm(train, h, mask))
        return nn.ConvTranspose(self.channels, (1, 1), kernel_init=torch_default_kernel("fan_out"),
                                bias_init=torch_default_bias(self.channels))(h)


class Classifier(nn.Module):
    """SRAAL's supervised branch on half of the latent code (1024 and 256 hidden units at width 128)."""

    width: int
    num_classes: int

    @nn.compact
    def __call__(self, z):
        dense = functools.partial(nn.Dense, kernel_init=kaiming_normal(), bias_init=nn.initializers.zeros)
        h = nn.relu(dense(8 * self.width)(z))
        h = nn.relu(dense(2 * self.width)(h))
        return dense(self.num_classes)(h)


class VAEOutput(NamedTuple):
    reconstruction: jax.Array  # of the real pixels (the padding cropped off), normalised units
    target: jax.Array  # the normalised images
    mu: jax.Array
    logvar: jax.Array
    class_logits: Optional[jax.Array]  # SRAAL's supervised branch; None without one


class VAE(nn.Module):
    """A beta-VAE reading stored pixels (normalised and padded on the device; see the module docstring).
    With `num_classes` > 0 the latent sample is split in two halves (SRAAL): the first is decoded, the
    second classified."""

    image_shape: tuple[int, ...]
    latent_dim: int
    width: int = 128
    normalization: Any = None  # a `jaxal.data.Normalization`; None: the values are the inputs
    decoder_layout: str = "vaal"
    num_classes: int = 0

    def setup(self):
        self.encoder = Encoder(self.width, self.latent_dim)
        self.decoder = Decoder(self.width, padded_side(self.image_shape), self.image_shape[-1], self.decoder_layout)
        self.classifier = Classifier(self.width, self.num_classes) if self.num_classes else None

    def _inputs(self, x):
        x = jnp.asarray(x, jnp.float32) if self.normalization is None else self.normalization(x)
        side, (height, width) = padded_side(self.image_shape), self.image_shape[:2]
        top, left = (side - height) // 2, (side - width) // 2
        return x, jnp.pad(x, ((0, 0), (top, side - height - top), (left, side - width - left), (0, 0)))

    def encode(self, x, train: bool = False, mask=None):
        """(mu, logvar) of stored pixels `x`; `mask` leaves rows out of training-mode BatchNorm statistics."""
        return self.encoder(self._inputs(x)[1], train, mask)

    def __call__(self, x, noise_rng, train: bool = False) -> VAEOutput:
        target, padded = self._inputs(x)
        mu, logvar = self.encoder(padded, train)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(noise_rng, mu.shape, mu.dtype)
        half = self.latent_dim // 2
        decoded = self.decoder(z[:, :half] if self.classifier else z, train)
        top, left = (padded.shape[1] - target.shape[1]) // 2, (padded.shape[2] - target.shape[2]) // 2
        reconstruction = decoded[:, top:top + target.shape[1], left:left + target.shape[2]]
        logits = self.classifier(z[:, half:]) if self.classifier else None
        return VAEOutput(reconstruction, target, mu, logvar, logits)


class Discriminator(nn.Module):
    """Dense ReLU layers on a latent code, one logit out (the codes' final Sigmoid is in the loss)."""

    width: int = 512
    layers: int = 2

    @nn.compact
    def __call__(self, z):
        dense = functools.partial(nn.Dense, kernel_init=kaiming_normal(), bias_init=nn.initializers.zeros)
        for _ in range(self.layers):
            z = nn.relu(dense(self.width)(z))
        return dense(1)(z)[:, 0]


# ---- training -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdversarialSpec:
    """Everything the compiled iteration depends on (hashable: a static argument)."""

    vae: VAE
    discriminator: Discriminator
    options: VAALOptions
    labeled_target: float  # the discriminator's target for labelled images: 1 (VAAL) or 0 (SRAAL)
    adversarial: bool = True  # False: the VAE alone on the unlabelled batches (SRAAL's initial set)


@flax.struct.dataclass
class AdversarialState:
    vae: Any  # parameters
    batch_stats: Any  # the VAE's BatchNorm running averages
    discriminator: Any
    vae_opt: Any
    discriminator_opt: Any


def adam() -> optax.GradientTransformation:
    """torch.optim.Adam's moments (betas 0.9, 0.999, eps 1e-8) without the learning rate: the rate is an
    argument of the step, so a decaying rate compiles nothing new."""
    return optax.scale_by_adam()


def initialization_key(key: jax.Array) -> jax.Array:
    """An "rbg" key (XLA's RngBitGenerator) derived from a threefry `key`, for initialising parameters:
    it draws as reproducibly, and its initialisers compile several times faster on CPU than threefry's
    (seconds per parameter tensor under load). Training keeps threefry, whose draws do not depend on
    how an array is split over devices."""
    data = np.asarray(jax.random.key_data(key), np.uint32)
    return jax.random.wrap_key_data(np.concatenate([data, data ^ np.uint32(0x9E3779B9)]), impl="rbg")


@functools.partial(jax.jit, static_argnames=("spec",))
def init_adversarial_state(key, spec: AdversarialSpec) -> AdversarialState:
    """A fresh VAE, discriminator and Adam state; `key` is an `initialization_key`."""
    vae_key, noise_key, disc_key = jax.random.split(key, 3)
    variables = spec.vae.init(vae_key, jnp.zeros((1, *spec.vae.image_shape)), noise_key)
    discriminator = spec.discriminator.init(disc_key, jnp.zeros((1, spec.vae.latent_dim)))["params"]
    return AdversarialState(variables["params"], variables["batch_stats"], discriminator,
                            adam().init(variables["params"]), adam().init(discriminator))


def binary_cross_entropy(logits, targets):
    """torch's BCELoss of sigmoid(logits) (each log clamped at -100), averaged; from the logits for stability."""
    return -jnp.mean(targets * jnp.maximum(jax.nn.log_sigmoid(logits), -100.0)
                     + (1.0 - targets) * jnp.maximum(jax.nn.log_sigmoid(-logits), -100.0))


def vae_loss(out: VAEOutput, options: VAALOptions):
    mse = jnp.mean((out.reconstruction - out.target) ** 2)
    kl_terms = -0.5 * jnp.sum(1.0 + out.logvar - out.mu**2 - jnp.exp(out.logvar), axis=1)
    kl = jnp.sum(kl_terms) if options.kl_reduction == "sum" else jnp.mean(kl_terms)
    return options.reconstruction_weight * mse + options.beta * kl


def _adam_update(params, opt_state, grads, lr):
    updates, opt_state = adam().update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state


def _vae_step(state: AdversarialState, batch, key, lr, spec: AdversarialSpec):
    options = spec.options
    labeled_key, unlabeled_key = jax.random.split(key)

    def loss_fn(params):
        def forward(x, noise_key, stats):
            out, updates = spec.vae.apply({"params": params, "batch_stats": stats}, x, noise_key, train=True,
                                          mutable=["batch_stats"])
            return out, updates["batch_stats"]

        stats, metrics = state.batch_stats, {}
        if spec.adversarial:  # the two batches go through separately, as in the code (BatchNorm per batch)
            labeled, stats = forward(batch["labeled"], labeled_key, stats)
        unlabeled, stats = forward(batch["unlabeled"], unlabeled_key, stats)
        loss = vae_loss(unlabeled, options)
        if spec.adversarial:
            loss = loss + vae_loss(labeled, options)
            discriminate = functools.partial(spec.discriminator.apply, {"params": state.discriminator})
            fool = (binary_cross_entropy(discriminate(labeled.mu), 1.0)
                    + binary_cross_entropy(discriminate(unlabeled.mu), 1.0))
            loss = loss + options.adversary_weight * fool
            metrics["adversarial_loss"] = fool
            if labeled.class_logits is not None:
                ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(labeled.class_logits),
                                                   batch["labels"][:, None], axis=1))
                loss = loss + options.classifier_weight * ce
                metrics["classifier_loss"] = ce
        metrics["vae_loss"] = loss
        return loss, (stats, metrics)

    grads, (stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.vae)
    params, opt_state = _adam_update(state.vae, state.vae_opt, grads, lr)
    return state.replace(vae=params, batch_stats=stats, vae_opt=opt_state), metrics


def _discriminator_step(state: AdversarialState, batch, lr, spec: AdversarialSpec):
    def encode(x, stats):  # training mode, the running averages updated, as the code's no_grad vae(x)
        (mu, _), updates = spec.vae.apply({"params": state.vae, "batch_stats": stats}, x, train=True,
                                          method=VAE.encode, mutable=["batch_stats"])
        return jax.lax.stop_gradient(mu), updates["batch_stats"]

    labeled_mu, stats = encode(batch["labeled"], state.batch_stats)
    unlabeled_mu, stats = encode(batch["unlabeled"], stats)

    def loss_fn(params):
        discriminate = functools.partial(spec.discriminator.apply, {"params": params})
        return (binary_cross_entropy(discriminate(labeled_mu), spec.labeled_target)
                + binary_cross_entropy(discriminate(unlabeled_mu), batch["targets"]))

    loss, grads = jax.value_and_grad(loss_fn)(state.discriminator)
    params, opt_state = _adam_update(state.discriminator, state.discriminator_opt, grads, lr)
    return state.replace(discriminator=params, batch_stats=stats, discriminator_opt=opt_state), loss


def _augment(batch, key, spec: AdversarialSpec):
    mode = spec.options.augmentation
    if mode == "none":
        return batch
    padding = crop_padding(mode, spec.vae.image_shape)
    images = [name for name in ("labeled", "unlabeled") if name in batch]
    keys = jax.random.split(key, len(images))
    return {**batch, **{name: augment_images(k, batch[name], mode, padding) for name, k in zip(images, keys)}}


@functools.partial(jax.jit, static_argnames=("spec", "mesh"), donate_argnames=("state",))
def adversarial_iteration(state: AdversarialState, batches, key, lr, *, spec: AdversarialSpec, mesh=None):
    """One iteration of the code's loop: `vae_steps` VAE updates on batches 0 .. V-1, then
    `discriminator_steps` discriminator updates on batches V-1 .. V+A-2 (the last VAE batch first).
    `batches`: {"labeled", "labels", "unlabeled", "targets"}, each with a leading axis of V+A-1 steps.
    Each kind of step is a `lax.scan` over its batches: compiled once, however many steps."""
    num_vae = spec.options.vae_steps
    augment_key, noise_key = jax.random.split(key)
    # Each batch is augmented once: the discriminator sees the last VAE batch as the VAE saw it (the
    # code's dataset transforms a batch when it is drawn).
    steps = jax.tree.leaves(batches)[0].shape[0]
    batches = jax.vmap(lambda batch, k: _augment(batch, k, spec))(batches, jax.random.split(augment_key, steps))

    def constrained(batch):
        return jax.tree.map(lambda leaf: parallel.constrain_batch(leaf, mesh), batch)

    def vae_body(state, inputs):
        batch, step_key = inputs
        return _vae_step(state, constrained(batch), step_key, lr, spec)

    vae_batches = jax.tree.map(lambda leaf: leaf[:num_vae], batches)
    state, metrics = jax.lax.scan(vae_body, state, (vae_batches, jax.random.split(noise_key, num_vae)))
    metrics = jax.tree.map(lambda m: m[-1], metrics)
    if spec.adversarial:
        last = jax.tree.map(lambda leaf: leaf[num_vae - 1:], batches)
        state, losses = jax.lax.scan(lambda state, batch: _discriminator_step(state, constrained(batch), lr, spec),
                                     state, last)
        metrics["discriminator_loss"] = losses[-1]
    return parallel.constrain_replicated((state, metrics), mesh)


def _batch_stream(rng: np.random.Generator, size: int, batch_size: int, multiple: int):
    """Endless batches of indices into `size` examples: a new permutation per pass (the codes cycle their
    shuffled DataLoaders)."""
    while True:
        yield from epoch_batches(rng, np.arange(size), batch_size, multiple)


def num_iterations(options: VAALOptions, num_images: int) -> int:
    if options.iterations is not None:
        return options.iterations
    return max(1, int(options.epochs * num_images) // options.batch_size)


def train_adversarial(spec: AdversarialSpec, key, labeled_x, labeled_y, unlabeled_x, unlabeled_targets,
                      iterations: int, mesh=None) -> tuple[AdversarialState, dict]:
    """A fresh VAE and discriminator trained for `iterations` (host arrays of stored pixels; the batches
    are gathered on the host and split over the mesh). Returns the state and the last iteration's losses."""
    options = spec.options
    init_key, step_key, host_key = jax.random.split(key, 3)
    state = parallel.replicate(init_adversarial_state(initialization_key(init_key), spec), mesh)
    host_rng = np.random.default_rng(np.asarray(jax.random.key_data(host_key)))
    devices = parallel.mesh_size(mesh)
    steps = options.vae_steps + (options.discriminator_steps - 1 if spec.adversarial else 0)
    labeled_stream = _batch_stream(host_rng, len(labeled_x), options.batch_size, devices) if spec.adversarial else None
    unlabeled_stream = _batch_stream(host_rng, len(unlabeled_x), options.batch_size, devices)
    decay_every = max(1, iterations // options.lr_decay_times)
    # The steps' leading axis stays whole; each step's batch is split over the devices.
    stacked = None if mesh is None else NamedSharding(mesh, P(None, parallel.DATA_AXIS))
    metrics = {}
    for iteration in range(iterations):
        unlabeled = np.stack([next(unlabeled_stream) for _ in range(steps)])
        batches = {"unlabeled": unlabeled_x[unlabeled], "targets": unlabeled_targets[unlabeled]}
        if spec.adversarial:
            labeled = np.stack([next(labeled_stream) for _ in range(steps)])
            batches.update(labeled=labeled_x[labeled], labels=labeled_y[labeled])
        lr = np.float32(options.lr * options.lr_decay ** (iteration // decay_every))
        batches = parallel.put(batches, stacked)
        iteration_key, lr = parallel.replicate((jax.random.fold_in(step_key, iteration), lr), mesh)
        state, metrics = adversarial_iteration(state, batches, iteration_key, lr, spec=spec, mesh=mesh)
    metrics = {name: float(value) for name, value in metrics.items()}
    if not all(np.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"the VAE/discriminator training diverged (last losses {metrics}); lower the "
                                 "learning rate of the strategy's section (--vaal.lr / --sraal.lr)")
    return state, metrics


# ---- scoring ------------------------------------------------------------------------------------------


def _discriminator_logits_chunk(static, consts, chunk):
    spec, batch_norm = static
    vae_variables, discriminator = consts
    xs, indices = chunk
    if batch_norm == "batch":
        # map_chunks pads the last chunk by repeating its last row: count each pool index once.
        mask = jnp.concatenate([jnp.ones((1,), bool), indices[1:] != indices[:-1]])
        (mu, _), _ = spec.vae.apply(vae_variables, xs, train=True, mask=mask, method=VAE.encode,
                                    mutable=["batch_stats"])
    else:
        mu, _ = spec.vae.apply(vae_variables, xs, train=False, method=VAE.encode)
    return spec.discriminator.apply({"params": discriminator}, mu)


def discriminator_logits(spec: AdversarialSpec, state: AdversarialState, xs, mesh=None) -> jax.Array:
    """(n,) discriminator logits of the latent means of `xs` ("labelled" is 1 for VAAL, 0 for SRAAL),
    in chunks of `batch_size` (the BatchNorm batches when `selection_batch_norm` is "batch")."""
    options = spec.options
    indices = jnp.arange(xs.shape[0], dtype=jnp.int32)
    consts = ({"params": state.vae, "batch_stats": state.batch_stats}, state.discriminator)
    return parallel.map_chunks(_discriminator_logits_chunk, (spec, options.selection_batch_norm), consts,
                               (xs, indices), chunk_size=options.batch_size, mesh=mesh)


def latent_means(vae: VAE, state: AdversarialState, xs, batch_size: int, mesh=None) -> jax.Array:
    """(n, latent) means of `xs` in inference mode (running averages)."""
    return parallel.map_chunks(_latent_means_chunk, vae, {"params": state.vae, "batch_stats": state.batch_stats},
                               xs, chunk_size=batch_size, mesh=mesh)


def _latent_means_chunk(vae, variables, xs):
    return vae.apply(variables, xs, train=False, method=VAE.encode)[0]


# ---- the strategy -------------------------------------------------------------------------------------


def pixel_normalization(model):
    """The normalisation the (adapted) task model applies to stored pixels; the VAE reads them the same way."""
    return getattr(model, "normalization", None)


def check_options(options: VAALOptions, section: str) -> None:
    positive = ("latent_dim", "vae_steps", "discriminator_steps", "batch_size", "width", "discriminator_width",
                "lr_decay_times")
    for field in positive:
        if getattr(options, field) < 1:
            raise ValueError(f"--{section}.{field} must be at least 1, got {getattr(options, field)}")
    if options.iterations is not None and options.iterations < 1:
        raise ValueError(f"--{section}.iterations must be at least 1 (or none), got {options.iterations}")
    if options.iterations is None and not options.epochs > 0:
        raise ValueError(f"--{section}.epochs must be positive, got {options.epochs}")
    if options.discriminator_layers < 0:
        raise ValueError(f"--{section}.discriminator_layers must be non-negative")
    if not options.lr > 0 or not 0 < options.lr_decay <= 1:
        raise ValueError(f"--{section}.lr must be positive and --{section}.lr_decay in (0, 1]")
    if options.batch_size < 2 and options.selection_batch_norm == "batch":
        raise ValueError(f"--{section}.batch_size must be at least 2 (BatchNorm statistics of a batch)")
    for field, allowed in (("kl_reduction", KL_REDUCTIONS), ("augmentation", AUGMENTATIONS),
                           ("selection_batch_norm", SELECTION_BATCH_NORMS)):
        if getattr(options, field) not in allowed:
            raise ValueError(f"unknown --{section}.{field} {getattr(options, field)!r}; choose one of: "
                             f"{', '.join(allowed)}")


def _check(config: Config) -> None:
    check_options(config.vaal, "vaal")


def adversarial_spec(ctx: StrategyContext, options: VAALOptions, *, labeled_target: float, decoder_layout="vaal",
                     num_classes: int = 0) -> AdversarialSpec:
    vae = VAE(tuple(ctx.pool_x.shape[1:]), options.latent_dim, options.width, pixel_normalization(ctx.model),
              decoder_layout, num_classes)
    return AdversarialSpec(vae, Discriminator(options.discriminator_width, options.discriminator_layers), options,
                           labeled_target)


# Strategies whose models are 2-D image models, refused on volumes before a run (`jaxal.loop.validate`), with
# the reason Wang et al. (AAAI 2022, appendix A.5) give for leaving them out of their cryo-ET experiment.
VOLUME_REFUSAL = ("its VAE (and SRAAL's, with their adversarial discriminators) is built from 2-D convolutions "
                  "for images; as Wang et al. note for the cryo-ET subtomogram task, the VAE/GAN-based baselines "
                  "\"need to be redesigned if using 3D data\", while gradient-norm selection (ent_gn, exp_gn) is "
                  "task-agnostic")
IMAGE_ONLY = ("vaal", "sraal")


@register_scorer("vaal", check=_check)
def vaal_scores(ctx: StrategyContext):
    """Latent codes a VAE-adversary pair judges most surely unlabelled (VAAL, Sinha et al. 2019)."""
    options = ctx.config.vaal
    spec = adversarial_spec(ctx, options, labeled_target=1.0)
    iterations = num_iterations(options, len(ctx.labeled_x) + len(ctx.pool_x))
    targets = np.zeros((len(ctx.pool_x),), np.float32)  # "unlabelled"
    state, losses = train_adversarial(spec, ctx.rng, np.asarray(ctx.labeled_x), np.asarray(ctx.labeled_y),
                                      np.asarray(ctx.pool_x), targets, iterations, ctx.mesh)
    # The lowest "labelled" output first.
    return Scores(-discriminator_logits(spec, state, ctx.pool_x, ctx.mesh), {"vae_iterations": iterations, **losses})
