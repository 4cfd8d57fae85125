"""Throughput of jaxal's jitted train step (samples/s), optionally side by side with PyTorch.

Run from the repository root:

    python experiments/bench_train.py              # defaults (see below for how long)
    python experiments/bench_train.py --quick      # a smoke run
    python experiments/bench_train.py --steps 10 --repeats 5

PyTorch is not a dependency of jaxal and must not go into the project's environment. To get the
comparison, install it into a throwaway virtualenv and point the benchmark at that venv's
site-packages; the directory is appended to `sys.path` after the project's own packages:

    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch
    python experiments/bench_train.py --torch-site /tmp/torchvenv/lib/python3.11/site-packages

What is timed is `jaxal.train.train_step` exactly as `train_model` calls it: each step's batch of stored
uint8 pixels is gathered from the host pool and sent to the device, the model normalises it (`adapt`), a
fresh RNG key is split off per step, the learning rates come as `learning_rates` gives them, the state is
donated.

- ResNet-18 (CIFAR stem) on CIFAR-shaped data: 32x32x3, 10 classes, batch 128, augmentation
  "crop_flip" with padding 4 (the reference protocols of docs/design.md);
- the digits CNN (`create_model("cnn", 10)`) on 8x8x1 digits-shaped data, batch 32 (the digits_quick
  preset) and 128, augmentation "none".

Each benchmark is compiled and warmed up first, then `--repeats` timings of `--steps` steps
(`jax.block_until_ready` at the end of each); the median is reported. When PyTorch can be imported,
the same ResNet-18 step (kuangliu/pytorch-cifar's ResNet18 from `experiments/torch_reference.py`, SGD
lr 0.1 momentum 0.9 weight decay 5e-4, random crop + flip on tensors, batch 128) is timed in the same
process, its repeats interleaved with jaxal's so that load from other processes hits both alike, on
CUDA when available, else with `torch.set_num_threads` equal to the number of usable cores (and
OpenMP threads that sleep while waiting; see torch_reference). Timings are a ratio measured in one
run; nothing here is asserted.

The last line printed is one JSON object with the numbers (the speedup is null without PyTorch).

Cost of the defaults with the PyTorch comparison, measured on 2 cores shared with other jobs (load
average about 8): 7.5 minutes of wall time, 3.5 minutes of CPU time, most of it in the 2 x (2 + 9)
ResNet-18 steps (about 45 s of that is compiling the jaxal ResNet-18 step); on 2 otherwise idle cores,
expect roughly half the wall time. Without PyTorch it takes roughly half as long; `--quick` times
one ResNet-18 step per repeat.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxal.data import PYTORCH_CIFAR, Normalization
from jaxal.models import adapt, create_model
from jaxal.train import TrainOptions, create_train_state, learning_rates, train_step
from timing import import_torch_reference, num_cores

POOL_SIZE = 2048  # host pool (uint8, as the loop stores images) the batches are drawn from


# ---- jaxal ----------------------------------------------------------------------------------------


class JaxalStep:
    """A train state and a pool; `run(steps)` takes `steps` SGD steps and waits for them."""

    def __init__(self, model_name: str, image_shape, batch_size: int, augmentation: str, padding: int,
                 num_classes: int = 10, seed: int = 0):
        channels = image_shape[-1]
        normalization = (Normalization(1 / 255, *PYTORCH_CIFAR) if channels == 3
                         else Normalization(1 / 255, (0.5,), (0.25,)))
        self.model = adapt(create_model(model_name, num_classes), normalization)
        self.options = TrainOptions(momentum=0.9, weight_decay=5e-4, augmentation=augmentation,
                                    crop_padding=padding)
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (POOL_SIZE, *image_shape), dtype=np.uint8)
        self.labels = rng.integers(0, num_classes, POOL_SIZE, dtype=np.int32)
        self.state = create_train_state(self.model, None, jax.random.key(seed), image_shape, self.options)
        self.batch_size = batch_size
        self.host_rng = rng
        self.key = jax.random.key(seed + 1)
        self.lr = learning_rates(0.1, (), 0.1, 0)
        self.detach = np.asarray(False)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            batch = self.host_rng.choice(POOL_SIZE, self.batch_size, replace=False).astype(np.int32)
            self.key, step_key = jax.random.split(self.key)
            x, y = jnp.asarray(self.images[batch]), jnp.asarray(self.labels[batch])
            self.state, metrics = train_step(self.state, x, y, step_key, self.lr, self.detach,
                                             model=self.model, lossnet=None, options=self.options)
        jax.block_until_ready((self.state, metrics))


# ---- PyTorch (optional) ---------------------------------------------------------------------------


def torch_resnet18_step(reference, batch_size: int, num_classes: int = 10, padding: int = 4, seed: int = 0):
    """The same step in PyTorch on `reference.DEVICE` (`reference`: the experiments' torch_reference module):
    `run(steps)` takes `steps` SGD steps and waits for them."""
    torch, F = reference.torch, reference.F
    device = reference.DEVICE
    torch.manual_seed(seed)
    model = reference.ResNet18(num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(POOL_SIZE, 3, 32, 32, device=device)
    labels = torch.randint(0, num_classes, (POOL_SIZE,), device=device)
    channel = torch.arange(3, device=device)[None, :, None, None]
    offsets = torch.arange(32, device=device)

    def augment(x):
        """Random crop (zero padding) and horizontal flip, independent per example, on tensors."""
        n = x.shape[0]
        padded = F.pad(x, (padding,) * 4)
        dy, dx = torch.randint(0, 2 * padding + 1, (2, n), device=device)
        rows = (dy[:, None] + offsets)[:, None, :, None]
        cols = (dx[:, None] + offsets)[:, None, None, :]
        x = padded[torch.arange(n, device=device)[:, None, None, None], channel, rows, cols]
        flip = torch.rand(n, device=device) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def run(steps: int) -> None:
        for _ in range(steps):
            batch = torch.randperm(POOL_SIZE, device=device)[:batch_size]
            x, y = augment(images[batch]), labels[batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        loss.item()  # waits for the device

    return run, reference.describe()


# ---- timing ---------------------------------------------------------------------------------------


def warm_up(run, steps: int = 2) -> float:
    """Seconds for the first `steps` steps (for jaxal, compilation included)."""
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def time_once(run, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    run(steps)
    return steps * batch_size / (time.perf_counter() - start)


def report(name: str, batch_size: int, rates: list[float], warmup_s: float) -> float:
    median = statistics.median(rates)
    print(f"  {name:<28} batch {batch_size:>4}: {median:>10.1f} samples/s  "
          f"({1000 * batch_size / median:>8.2f} ms/step; repeats {min(rates):.1f}..{max(rates):.1f}; "
          f"first 2 steps {warmup_s:.1f} s)", flush=True)
    return median


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed ResNet-18 steps per repeat (default 3, --quick 1); the digits CNN runs "
                             "50x as many")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="few steps and 2 repeats: a smoke run")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--torch-site", default=None,
                        help="a site-packages directory holding torch, appended to sys.path "
                             "(see the module docstring)")
    args = parser.parse_args(argv)
    steps = args.steps or (1 if args.quick else 3)
    repeats = args.repeats or (2 if args.quick else 3)
    digits_steps = 50 * steps
    cores = num_cores()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"{cores} usable cores, {platform.processor() or platform.machine()}; "
          f"{repeats} repeats x {steps} ResNet-18 steps / {digits_steps} CNN steps", flush=True)

    results: dict = {}

    # Digits CNN, batch 32 and 128.
    for batch_size in (32, 128):
        bench = JaxalStep("cnn", (8, 8, 1), batch_size, "none", 0)
        warmup_s = warm_up(bench.run)
        rates = [time_once(bench.run, digits_steps, batch_size) for _ in range(repeats)]
        results[f"digits_cnn_b{batch_size}"] = report("jaxal digits CNN", batch_size, rates, warmup_s)

    # ResNet-18, batch 128, with PyTorch interleaved when available.
    batch_size = 128
    bench = JaxalStep("resnet18", (32, 32, 3), batch_size, "crop_flip", 4)
    reference = import_torch_reference(args.torch_site, args.no_torch)
    torch_bench = None if reference is None else torch_resnet18_step(reference, batch_size)
    jax_warmup = warm_up(bench.run)
    if torch_bench is not None:
        torch_run, torch_version = torch_bench
        torch_warmup = warm_up(torch_run)
    jax_rates, torch_rates = [], []
    for _ in range(repeats):
        jax_rates.append(time_once(bench.run, steps, batch_size))
        if torch_bench is not None:
            torch_rates.append(time_once(torch_run, steps, batch_size))
    results["resnet18"] = report("jaxal ResNet-18 crop_flip", batch_size, jax_rates, jax_warmup)
    speedup = None
    if torch_bench is not None:
        results["torch_resnet18"] = report("torch ResNet-18", batch_size, torch_rates, torch_warmup)
        speedup = results["resnet18"] / results["torch_resnet18"]
        print(f"  ResNet-18 jaxal/torch: {speedup:.2f}x ({torch_version})")
    else:
        print("  PyTorch: skipped; no comparison")

    summary = {
        "resnet18_train_samples_per_s": round(results["resnet18"], 1),
        "digits_cnn_train_samples_per_s": round(results["digits_cnn_b32"], 1),  # batch 32, digits_quick's
        "digits_cnn_b128_train_samples_per_s": round(results["digits_cnn_b128"], 1),
        "torch_resnet18_train_samples_per_s": (round(results["torch_resnet18"], 1)
                                               if "torch_resnet18" in results else None),
        "resnet18_speedup_vs_torch": None if speedup is None else round(speedup, 3),
        "steps": steps, "repeats": repeats, "cores": cores,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
