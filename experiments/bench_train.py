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

Precisions (`--precisions`, jaxal's `--precision.training` values): "highest" (true float32), "default"
(TF32 on an NVIDIA GPU; on a CPU the same as highest, so a CPU run skips highest) and "bfloat16" (mixed
precision: bf16 activations and products, float32 parameters and optimizer state; `jaxal.precision`).
PyTorch's step in the same precisions (`--torch-modes`): "float32" (TF32 off), "tf32" (TF32 on for matrix
products and cuDNN convolutions) and "amp_bf16" (`torch.autocast` to bfloat16, float32 parameters).

Input pipelines (`jaxal.train.train_model`'s `input_pipeline`): the time per step of whole epochs of
`train_model` over a labelled set of `--pipeline-labelled` images, for "host" (each batch gathered on the
host and sent as its step is dispatched: before), "prefetch" (sent one step ahead) and "resident" (the
labelled set on the device, batches gathered there), their repeats interleaved; for the digits CNN (whose
small steps show the overhead) and, with `--pipeline-models`, ResNet-18.

Each benchmark is compiled and warmed up first, then `--repeats` timings of `--steps` steps
(`jax.block_until_ready` at the end of each); the median is reported. When PyTorch can be imported,
the same ResNet-18 step (kuangliu/pytorch-cifar's ResNet18 from `experiments/torch_reference.py`, SGD
lr 0.1 momentum 0.9 weight decay 5e-4, random crop + flip on tensors, batch 128) is timed in the same
process, its repeats interleaved with jaxal's so that load from other processes hits both alike, on
CUDA when available, else with `torch.set_num_threads` equal to the number of usable cores (and
OpenMP threads that sleep while waiting; see torch_reference). Timings are a ratio measured in one
run; nothing here is asserted.

The last line printed is one JSON object with the numbers (the speedups are null without PyTorch).

Cost of the defaults with the PyTorch comparison, measured on 2 cores shared with other jobs (load
average about 8): 7.5 minutes of wall time, 3.5 minutes of CPU time, most of it in the 2 x (2 + 9)
ResNet-18 steps (about 45 s of that is compiling the jaxal ResNet-18 step); on 2 otherwise idle cores,
expect roughly half the wall time. Without PyTorch it takes roughly half as long; `--quick` times
one ResNet-18 step per repeat. Each further precision adds its compilation and steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import precision
from jaxal.data import PYTORCH_CIFAR, Normalization
from jaxal.models import adapt, create_model
from jaxal.train import TrainOptions, create_train_state, learning_rates, train_model, train_step
from timing import import_torch_reference, num_cores, time_runs

POOL_SIZE = 2048  # host pool (uint8, as the loop stores images) the batches are drawn from
PIPELINES = ("host", "prefetch", "resident")
TORCH_MODES = ("float32", "tf32", "amp_bf16")


# ---- jaxal ----------------------------------------------------------------------------------------


def _model_and_options(model_name: str, image_shape, augmentation: str, padding: int, training_precision: str,
                       num_classes: int = 10):
    channels = image_shape[-1]
    normalization = (Normalization(1 / 255, *PYTORCH_CIFAR) if channels == 3
                     else Normalization(1 / 255, (0.5,), (0.25,)))
    model = adapt(create_model(model_name, num_classes), normalization)
    options = TrainOptions(momentum=0.9, weight_decay=5e-4, augmentation=augmentation, crop_padding=padding,
                           compute_dtype=precision.compute_dtype(training_precision))
    return model, options


class JaxalStep:
    """A train state and a pool; `run(steps)` takes `steps` SGD steps and waits for them, its products at
    `training_precision` (a `--precision.training` value)."""

    def __init__(self, model_name: str, image_shape, batch_size: int, augmentation: str, padding: int,
                 num_classes: int = 10, seed: int = 0, training_precision: str = "default"):
        self.model, self.options = _model_and_options(model_name, image_shape, augmentation, padding,
                                                      training_precision, num_classes)
        self.precision = training_precision
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
        with precision.scope(self.precision):
            for _ in range(steps):
                batch = self.host_rng.choice(POOL_SIZE, self.batch_size, replace=False).astype(np.int32)
                self.key, step_key = jax.random.split(self.key)
                x, y = jnp.asarray(self.images[batch]), jnp.asarray(self.labels[batch])
                self.state, metrics = train_step(self.state, x, y, step_key, self.lr, self.detach,
                                                 model=self.model, lossnet=None, options=self.options)
        jax.block_until_ready((self.state, metrics))


class JaxalEpochs:
    """`train_model` over `labelled` random uint8 images with one input pipeline; `run()` trains `epochs`
    epochs and waits (`train_model` reads its last epoch's metrics back)."""

    def __init__(self, model_name: str, image_shape, batch_size: int, labeled: int, epochs: int,
                 pipeline: str, augmentation: str, padding: int, training_precision: str = "default"):
        self.model, self.options = _model_and_options(model_name, image_shape, augmentation, padding,
                                                      training_precision)
        self.precision = training_precision
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (labeled, *image_shape), dtype=np.uint8)
        self.labels = rng.integers(0, 10, labeled, dtype=np.int32)
        self.state = create_train_state(self.model, None, jax.random.key(0), image_shape, self.options)
        self.kwargs = dict(model=self.model, lossnet=None, options=self.options, epochs=epochs,
                           batch_size=batch_size, lr=0.01, lr_milestones=(), lr_gamma=0.1, detach_epoch=0,
                           seed=0, input_pipeline=pipeline)
        self.steps = epochs * -(-labeled // batch_size)

    def run(self):
        with precision.scope(self.precision):
            self.state, _ = train_model(self.state, self.images, self.labels, np.arange(len(self.images)),
                                        **self.kwargs)
        return self.state


# ---- PyTorch (optional) ---------------------------------------------------------------------------


def torch_resnet18_step(reference, batch_size: int, num_classes: int = 10, padding: int = 4, seed: int = 0,
                        mode: str = "tf32"):
    """The same step in PyTorch on `reference.DEVICE` (`reference`: the experiments' torch_reference module)
    in `mode` (TORCH_MODES): `run(steps)` takes `steps` SGD steps and waits for them."""
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

    def autocast():
        if mode == "amp_bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(steps: int) -> None:
        # The TF32 switches are global: set for this mode at every run (the modes' repeats interleave).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode != "float32"
        for _ in range(steps):
            batch = torch.randperm(POOL_SIZE, device=device)[:batch_size]
            x, y = augment(images[batch]), labels[batch]
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(x).float(), y)
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
    print(f"  {name:<34} batch {batch_size:>4}: {median:>10.1f} samples/s  "
          f"({1000 * batch_size / median:>8.2f} ms/step; repeats {min(rates):.1f}..{max(rates):.1f}; "
          f"first 2 steps {warmup_s:.1f} s)", flush=True)
    return median


def bench_pipelines(model_name: str, image_shape, batch_size: int, labeled: int, epochs: int, repeats: int,
                    augmentation: str, padding: int, training_precision: str) -> dict:
    """ms per step of whole epochs with each input pipeline, repeats interleaved; wall and CPU time."""
    benches = {p: JaxalEpochs(model_name, image_shape, batch_size, labeled, epochs, p, augmentation, padding,
                              training_precision) for p in PIPELINES}
    timings = time_runs({p: b.run for p, b in benches.items()}, repeats)
    steps = benches["host"].steps
    out = {}
    for p, t in timings.items():
        out[p] = {"ms_per_step": 1000 * t.best / steps, "cpu_ms_per_step": 1000 * t.best_cpu / steps}
        print(f"  {model_name} b{batch_size} {training_precision:<9} {p:<9}: {out[p]['ms_per_step']:8.2f} ms/step "
              f"(CPU {out[p]['cpu_ms_per_step']:8.2f} ms/step; {steps} steps, best of {repeats})", flush=True)
    return out


def main(argv=None) -> dict:
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed ResNet-18 steps per repeat (default 3, --quick 1); the digits CNN runs "
                             "50x as many")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="few steps and 2 repeats: a smoke run")
    parser.add_argument("--precisions", default="highest,default,bfloat16" if on_gpu else "default,bfloat16",
                        help="jaxal's --precision.training values to time ResNet-18 in (default: all three on a "
                             "GPU; default and bfloat16 on a CPU, where highest is default)")
    parser.add_argument("--torch-modes", default=",".join(TORCH_MODES) if on_gpu else "float32,amp_bf16",
                        help=f"PyTorch's precisions, of {', '.join(TORCH_MODES)}")
    parser.add_argument("--pipeline-models", default="cnn,resnet18" if on_gpu else "cnn",
                        help="models whose input pipelines are compared (cnn, resnet18; empty: none)")
    parser.add_argument("--pipeline-labeled", type=int, default=None,
                        help="labelled images the pipelines train over (default 4096; --quick 512)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--torch-site", default=None,
                        help="a site-packages directory holding torch, appended to sys.path "
                             "(see the module docstring)")
    args = parser.parse_args(argv)
    steps = args.steps or (1 if args.quick else 3)
    repeats = args.repeats or (2 if args.quick else 3)
    digits_steps = 50 * steps
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        precision.check(p, "--precisions", precision.TRAINING_PRECISIONS)
    torch_modes = [m for m in args.torch_modes.split(",") if m]
    if set(torch_modes) - set(TORCH_MODES):
        parser.error(f"--torch-modes must be among {', '.join(TORCH_MODES)}")
    labeled = args.pipeline_labeled or (512 if args.quick else 4096)
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

    # ResNet-18, batch 128, in each precision, with PyTorch's modes interleaved when available.
    batch_size = 128
    runs, warmups = {}, {}
    for p in precisions:
        runs[f"jaxal_{p}"] = JaxalStep("resnet18", (32, 32, 3), batch_size, "crop_flip", 4,
                                       training_precision=p).run
    reference = import_torch_reference(args.torch_site, args.no_torch)
    torch_version = None
    if reference is not None:
        for mode in torch_modes:
            runs[f"torch_{mode}"], torch_version = torch_resnet18_step(reference, batch_size, mode=mode)
    for name, run in runs.items():
        warmups[name] = warm_up(run)
    rates = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(time_once(run, steps, batch_size))
    for name in runs:
        results[name] = report(f"{name} ResNet-18 crop_flip", batch_size, rates[name], warmups[name])
    if reference is None:
        print("  PyTorch: skipped; no comparison")

    summary = {
        "resnet18_train_samples_per_s": round(results.get("jaxal_default", float("nan")), 1),
        "digits_cnn_train_samples_per_s": round(results["digits_cnn_b32"], 1),  # batch 32, digits_quick's
        "digits_cnn_b128_train_samples_per_s": round(results["digits_cnn_b128"], 1),
    }
    for p in precisions:
        summary[f"resnet18_{p}_samples_per_s"] = round(results[f"jaxal_{p}"], 1)
    if "jaxal_bfloat16" in results and "jaxal_default" in results:
        summary["resnet18_bfloat16_speedup_vs_default"] = round(results["jaxal_bfloat16"] / results["jaxal_default"], 3)
    for mode in torch_modes:
        summary[f"torch_resnet18_{mode}_samples_per_s"] = (round(results[f"torch_{mode}"], 1)
                                                           if f"torch_{mode}" in results else None)
    # Like against like: jaxal's precision against torch's.
    for p, mode in (("highest", "float32"), ("default", "tf32"), ("bfloat16", "amp_bf16")):
        if p in precisions and mode in torch_modes:
            summary[f"resnet18_{p}_speedup_vs_torch_{mode}"] = (
                round(results[f"jaxal_{p}"] / results[f"torch_{mode}"], 3) if f"torch_{mode}" in results else None)
    summary["resnet18_speedup_vs_torch"] = summary.get("resnet18_default_speedup_vs_torch_tf32")  # as before

    print("\ninput pipelines (train_model, whole epochs):", flush=True)
    shapes = {"cnn": ((8, 8, 1), 32, "none", 0), "resnet18": ((32, 32, 3), 128, "crop_flip", 4)}
    for name in [m for m in args.pipeline_models.split(",") if m]:
        shape, batch, augmentation, padding = shapes[name]
        epochs = 1 if name == "resnet18" else (2 if args.quick else 5)
        pipeline_precision = "bfloat16" if on_gpu and name == "resnet18" else "default"
        timing = bench_pipelines(name, shape, batch, labeled, epochs, repeats, augmentation, padding,
                                 pipeline_precision)
        for p in PIPELINES:
            summary[f"{name}_b{batch}_{p}_ms_per_step"] = round(timing[p]["ms_per_step"], 3)
            summary[f"{name}_b{batch}_{p}_cpu_ms_per_step"] = round(timing[p]["cpu_ms_per_step"], 3)
        for p in ("prefetch", "resident"):
            summary[f"{name}_b{batch}_{p}_speedup_vs_host"] = round(
                timing["host"]["ms_per_step"] / timing[p]["ms_per_step"], 3)
            summary[f"{name}_b{batch}_{p}_cpu_ratio_vs_host"] = round(
                timing[p]["cpu_ms_per_step"] / timing["host"]["cpu_ms_per_step"], 3)
    summary.update({"torch": torch_version, "steps": steps, "repeats": repeats, "cores": cores,
                    "device": jax.devices()[0].device_kind})
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
