"""Is the simulated subtomogram task learnable at the CPU size? Every training volume labelled, no selection.

Trains the model from scratch on ALL of `train` simulated volumes (the run's optimizer, augmentation and
dropout: `jaxal.train.train_model`, as a cycle of the loop does), and prints the test accuracy after each
block of epochs, per SNR, with wall and CPU seconds. An active-learning comparison can only separate
strategies where this curve leaves chance (1/classes) within the labelled counts and epochs it uses.

Beside it, without a CNN, whether the classes can be told apart at all: a logistic regression on each
volume's rotation-invariant radial power spectrum (log of |F|^2 averaged over shells of |k|; the wedge
makes it only nearly invariant), trained on the same volumes.

    python experiments/cryoet_learnability.py --snr none,0.5,0.1 --train 500 --epochs 30 --every 5
    python experiments/cryoet_learnability.py --preset cryoet_simulated_cpu --snr none --train 200 --epochs 8 --every 1
    python experiments/cryoet_learnability.py --preset cryoet_simulated_cpu --snr 0.1 --train 120 --epochs 16 \
        --every 2 --diagnose     # why the test accuracy falls back to exactly 1/classes (README, "Volumes")

`--diagnose` adds, after each block: the share of test volumes given the most frequent class; the spread of
the mean logit over classes against the standard deviation of the logits across test volumes (a network
that puts every volume in one class has the first much larger than the second); and, for a model with
BatchNorm, the test accuracy with the BatchNorm statistics recomputed on all training volumes with the
final weights (population statistics in place of the running averages, which lag the weights).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxal import tasks
from jaxal.config import build_config
from jaxal.data import load_dataset
from jaxal.loop import train_options
from jaxal.models import adapt, create_model
from jaxal.train import create_train_state, evaluate, model_variables, train_model


def diagnosis(model, variables, data, task) -> str:
    """One line: how concentrated the test predictions are, and what population BatchNorm statistics change."""
    logits = np.concatenate([np.asarray(model.apply(variables, data.x_test[i:i + 100]).logits)
                             for i in range(0, len(data.x_test), 100)])
    share = np.bincount(logits.argmax(1), minlength=logits.shape[1]).max() / len(logits)
    line = (f"most frequent test class {100 * share:.0f}%, mean-logit spread over classes "
            f"{np.ptp(logits.mean(0)):.2f} vs logit std across volumes {logits.std(0).mean():.2f}")
    if variables.get("batch_stats"):
        # Statistics of ONE batch holding every training volume: BatchNorm precedes the dropout, so the
        # dropout rng changes nothing in them.
        _, updated = model.apply(variables, data.x_train, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(0)})
        population = {**variables, "batch_stats": updated["batch_stats"]}
        accuracy = evaluate(model, population, data.x_test, data.y_test, task, 100)["accuracy"]
        line += f"; test accuracy with population BatchNorm statistics {100 * accuracy:.1f}%"
    return line


def radial_power_spectrum(x: np.ndarray) -> np.ndarray:
    """(N, shells) log of the mean |F(k)|^2 over each shell round(|k| * size) = 1 .. , of (N, D, D, D, 1)."""
    size = x.shape[1]
    k = np.fft.fftfreq(size)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    shell = np.round(np.sqrt(kz**2 + ky**2 + kx**2) * size).astype(int).ravel()
    counts = np.bincount(shell)
    power = [np.bincount(shell, np.abs(np.fft.fftn(v[..., 0])).ravel() ** 2) / counts for v in x]
    return np.log(np.stack(power)[:, 1:] + 1e-12)  # shell 0 is the mean: 0 after normalisation


def spectrum_accuracy(data) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    classifier.fit(radial_power_spectrum(data.x_train), data.y_train)
    return classifier.score(radial_power_spectrum(data.x_test), data.y_test)


def curve(snr: str, args) -> list[tuple[int, float, float, float]]:
    """(epochs, test accuracy, train loss, wall seconds so far) after each block of `every` epochs."""
    data = load_dataset(f"subtomograms_simulated:size={args.size},snr={snr},train={args.train},test={args.test},"
                        f"seed={args.seed}")
    print(f"  snr {snr}: radial power spectrum + logistic regression: test accuracy "
          f"{100 * spectrum_accuracy(data):.1f}%", flush=True)
    if args.epochs == 0:
        return []
    fields = ("model", "lr", "batch_size", "optimizer", "dropout")
    chosen = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    config = build_config(args.preset, **chosen)
    task = tasks.create_task("classification", data.num_classes)
    model = adapt(create_model(config.model, data.num_classes, config.dropout), data.normalization)
    options = train_options(config, data, task)
    state = create_train_state(model, None, jax.random.key(args.seed), data.image_shape, options)
    labeled = np.arange(len(data.y_train))
    rows, start = [], time.perf_counter()
    for block in range(args.epochs // args.every):
        state, metrics = train_model(state, data.x_train, data.y_train, labeled, model=model, lossnet=None,
                                     options=options, epochs=args.every, batch_size=config.batch_size, lr=config.lr,
                                     lr_milestones=(), lr_gamma=0.1, detach_epoch=0, seed=args.seed * 1000 + block)
        accuracy = evaluate(model, model_variables(state), data.x_test, data.y_test, task, 100)["accuracy"]
        rows.append(((block + 1) * args.every, accuracy, metrics["loss"], time.perf_counter() - start))
        print(f"  snr {snr}: epoch {rows[-1][0]:3d}  test accuracy {100 * accuracy:5.1f}%  "
              f"train loss {metrics['loss']:.3f}  {rows[-1][3]:6.0f} s", flush=True)
        if args.diagnose:
            print(f"      {diagnosis(model, model_variables(state), data, task)}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", default="none,0.5,0.1", help="comma-separated; none: no noise")
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30, help="0: the power-spectrum classifier only")
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--preset", default="wang2022_cryoet_simulated",
                        help="the model and training of this preset (or cryoet_simulated_cpu), changed by the "
                             "options below")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dropout", type=float, default=None, help="the preset's, else the model's rate (AITom's 0.7)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--optimizer", default=None, help="sgd or adam")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diagnose", action="store_true", help="why the accuracy sits at 1/classes (docstring)")
    args = parser.parse_args(argv)
    print(f"{args.size}^3, {args.train} training volumes all labelled, {args.test} test; {args}", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for snr in args.snr.split(","):
        curve(snr, args)
    print(f"wall {time.perf_counter() - wall:.0f} s, CPU {time.process_time() - cpu:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
