"""jaxal's `fcos_tv` and torchvision's FCOS trained the same way on BCCD from the same random weights (CPU).

Both detectors are FCOS on a ResNet-18 FPN (C3-C5 -> P3-P7, P6 on P5 as `fcos_resnet50_fpn`'s
`LastLevelP6P7(256, 256)`), at the `bccd_fcos` preset's size: a `--channels`-wide FPN and head with
`--stacked-convs` convolutions per tower (torchvision's `_resnet_fpn_extractor` fixes 256 channels, so the
torch side builds the same `BackboneWithFPN` directly). torchvision's backbone is set up as torchvision
fine-tunes one (`trainable_backbone_layers=3`: stem and layer1 frozen; `FrozenBatchNorm2d`), which is what
jaxal's trainer does (mmdet `frozen_stages=1`, `norm_eval`, BatchNorm affines outside the optimiser).

1. This process reads BCCD with jaxal's loader (canvas 320: 320x240 images on a 320x256 canvas) and writes
   the exact batches `jaxal.detection.training.train` steps on (`training_batches`, same seed: images,
   flips and order), the learning rate of every iteration (`training.learning_rate`) and the test images.
2. A child interpreter with torch + torchvision (`--torch-python`) builds torchvision's FCOS from
   `torch.manual_seed(seed)`, saves those initial weights, and trains it on those batches: backbone ->
   head -> `FCOS.compute_loss` directly (no GeneralizedRCNNTransform: the images are normalised here with
   jaxal's ImageNet statistics), torch SGD with the same per-iteration lr, momentum, weight decay, conv
   biases at lr x2 without decay and the gradient clipped to global norm `--grad-clip` (jaxal's trainer:
   mmdet's paramwise_cfg and OptimizerHook). Then `FCOS.postprocess_detections` on the test images, whose
   NMS calls the compiled `torchvision::nms` that does not load next to the CPU torch
   (experiments/compare_torchvision_fcos.py): the child registers a CPU kernel for that op, a plain torch
   loop of greedy NMS (suppress IoU > threshold, as torchvision's CPU kernel), and everything else is
   torchvision's own decoding.
3. This process ports the same initial weights into `FCOS(ResNetBackbone(18), 3, FCOS_TV)` (the parity
   script's port), trains it with `training.train` (same seed, so the same batches), detects the test set,
   and evaluates both detectors' test detections with jaxal's pycocotools wiring and VOC mAP@0.5 in
   original image coordinates.

    python experiments/train_torchvision_fcos.py --torch-python /work/torchvenv/bin/python

Prints AP, AP50, mAP@0.5, first/final training loss, wall and CPU seconds of both, and the AP of torchvision's
trained weights ported back and decoded by jaxal (do the decoders agree?); `--out FILE` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare_torchvision_fcos as port  # noqa: E402  (one port of torchvision's FCOS weights)

NUM_CLASSES = 3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # jaxal.detection.training.IMAGENET
EVAL_BATCH = 8


# --- torch side (the child interpreter) ------------------------------------------------------------


def loop_nms(boxes, scores, iou_threshold: float):
    """Greedy NMS as torchvision's CPU kernel (ops/csrc/ops/cpu/nms_kernel.cpp): by decreasing score, keep a
    box and suppress the later ones whose IoU with it is > iou_threshold; returns the kept indices."""
    import torch

    order = torch.argsort(scores, descending=True, stable=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def build_torchvision_fcos(channels: int, stacked_convs: int):
    """torchvision's FCOS on ResNet-18 as `fcos_resnet50_fpn` builds it, `channels` wide (see docstring)."""
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOS, FCOSHead
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = resnet18(weights=None, norm_layer=misc.FrozenBatchNorm2d)
    for name, parameter in body.named_parameters():  # _resnet_fpn_extractor(trainable_layers=3)
        if not name.startswith(("layer4", "layer3", "layer2")):
            parameter.requires_grad_(False)
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], channels,
                               extra_blocks=LastLevelP6P7(channels, channels))
    return FCOS(backbone, NUM_CLASSES, head=FCOSHead(channels, 1, NUM_CLASSES, num_convs=stacked_convs))


def sgd_groups(model, base_lr: float, weight_decay: float):
    """The trainable parameters in jaxal's groups (`training.param_groups`, mmdet paramwise_cfg): conv
    biases at lr x2 without decay, the rest (convs, GroupNorm) at lr x1 with decay."""
    import torch

    biases, rest = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (biases if isinstance(module, torch.nn.Conv2d) and name == "bias" else rest).append(p)
    return [{"params": rest, "lr": base_lr, "lr_mult": 1.0, "weight_decay": weight_decay},
            {"params": biases, "lr": 2 * base_lr, "lr_mult": 2.0, "weight_decay": 0.0}]


def torch_side(data_path: str, out_path: str) -> None:
    import torch

    lib = port.import_torchvision()
    lib.impl("nms", loop_nms, "CPU")
    import torchvision.ops.boxes
    from torchvision.models.detection.image_list import ImageList

    torchvision.ops.boxes._assert_has_ops = lambda: None  # the op is registered above; _C is not loaded
    data = dict(np.load(data_path))
    spec = json.loads(str(data["spec"]))
    torch.set_num_threads(spec["torch_threads"])
    torch.manual_seed(spec["seed"])
    model = build_torchvision_fcos(spec["channels"], spec["stacked_convs"])
    init = {f"state/{k}": v.numpy().copy() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def forward(images_nhwc):
        x = (torch.from_numpy(np.array(images_nhwc)).permute(0, 3, 1, 2).float() / 255 - mean) / std  # (a copy:
        # the batches are a read-only memmap)
        features = list(model.backbone(x).values())
        head = model.head(features)
        anchors = model.anchor_generator(ImageList(x, [tuple(x.shape[-2:])] * len(x)), features)
        return head, anchors, [f.size(2) * f.size(3) for f in features]

    groups = sgd_groups(model, spec["lrs"][0], spec["weight_decay"])
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.SGD(groups, lr=spec["lrs"][0], momentum=spec["momentum"])
    images = np.load(data_path.replace(".npz", "_images.npy"), mmap_mode="r")
    losses = []
    model.train()  # FrozenBatchNorm2d and GroupNorm: the same in either mode
    start, cpu = time.perf_counter(), time.process_time()
    for it, lr in enumerate(spec["lrs"]):
        n = int(data["counts"][it])  # an epoch's last batch is smaller (205 images)
        head, anchors, num_per_level = forward(images[it, :n])
        real = (data["classes"][it, :n] >= 0) & ~data["difficult"][it, :n]  # jaxal never matches padding, difficult
        targets = [{"boxes": torch.from_numpy(data["boxes"][it][k][real[k]]),
                    "labels": torch.from_numpy(data["classes"][it][k][real[k]].astype(np.int64))}
                   for k in range(len(real))]
        parts = model.compute_loss(targets, head, anchors, num_per_level)
        loss = parts["classification"] + parts["bbox_regression"] + parts["bbox_ctrness"]
        optimizer.zero_grad()
        loss.backward()
        if spec["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(trainable, spec["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        optimizer.step()
        losses.append(loss.item())
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"torchvision's FCOS diverged at iteration {it}: loss {losses[-1]}")
        if it % spec["log_every"] == 0:
            print(f"  torchvision iteration {it}: loss {losses[-1]:.4f} lr {lr:.2e} "
                  f"({time.process_time() - cpu:.0f} CPU s)", file=sys.stderr, flush=True)
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu

    model.eval()
    start = time.perf_counter()
    test, sizes = data["test_images"], data["test_sizes"]
    found = {"boxes": np.zeros((len(test), 100, 4), np.float32), "scores": np.zeros((len(test), 100), np.float32),
             "classes": np.zeros((len(test), 100), np.int32), "valid": np.zeros((len(test), 100), bool)}
    with torch.no_grad():
        for s in range(0, len(test), EVAL_BATCH):
            head, anchors, num_per_level = forward(test[s:s + EVAL_BATCH])
            split_head = {k: list(v.split(num_per_level, dim=1)) for k, v in head.items()}  # FCOS.forward
            split_anchors = [list(a.split(num_per_level)) for a in anchors]
            shapes = [tuple(int(v) for v in hw) for hw in sizes[s:s + EVAL_BATCH]]  # clip to the image, not the pad
            for k, det in enumerate(model.postprocess_detections(split_head, split_anchors, shapes)):
                n = min(len(det["scores"]), 100)
                found["boxes"][s + k, :n] = det["boxes"][:n].numpy()
                found["scores"][s + k, :n] = det["scores"][:n].numpy()
                found["classes"][s + k, :n] = det["labels"][:n].numpy()
                found["valid"][s + k, :n] = True
    np.savez(out_path, losses=np.array(losses), train_seconds=train_seconds, train_cpu_seconds=train_cpu,
             detect_seconds=time.perf_counter() - start, threads=torch.get_num_threads(),
             versions=json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__}),
             **{f"det/{k}": v for k, v in found.items()}, **init,
             **{f"final/{k}": v.numpy() for k, v in model.state_dict().items() if v.dtype.is_floating_point})


# --- jaxal side (this process) ---------------------------------------------------------------------


def load_bccd(canvas: int, cache_dir: str):
    from jaxal.data import boxes as boxes_lib
    from jaxal.detection import active

    return boxes_lib.load_boxes(active.resolve_source("bccd"), canvas=canvas, cache_dir=cache_dir)


def write_batches(data, args, schedule, path: str) -> None:
    """The batches jaxal's trainer steps on (same function, same seed), the lrs and the test images."""
    from jaxal.detection import active, training

    rng = np.random.default_rng(args.seed)
    images = np.lib.format.open_memmap(path.replace(".npz", "_images.npy"), mode="w+", dtype=np.uint8,
                                       shape=(schedule.iterations, schedule.batch_size, *data.train.canvases[0], 3))
    m, b = data.train.boxes.shape[1], schedule.batch_size
    rows = {"boxes": np.zeros((schedule.iterations, b, m, 4), np.float32),
            "classes": np.full((schedule.iterations, b, m), -1, np.int32),
            "difficult": np.zeros((schedule.iterations, b, m), bool), "counts": np.zeros(schedule.iterations, int)}
    for it, batch in enumerate(training.training_batches(data.train, active.simulated_pool(data.train), schedule,
                                                         rng, flip=True)):
        n = rows["counts"][it] = len(batch["images"])  # an epoch's last batch may be smaller
        images[it, :n] = batch["images"]
        for k in ("boxes", "classes", "difficult"):
            rows[k][it, :n] = batch[k]
    images.flush()
    test = np.arange(len(data.test))
    spec = {"seed": args.seed, "torch_threads": args.torch_threads, "log_every": args.log_every,
            "channels": args.channels, "stacked_convs": args.stacked_convs,
            "lrs": [training.learning_rate(schedule, it) for it in range(schedule.iterations)],
            "momentum": schedule.momentum, "weight_decay": schedule.weight_decay, "grad_clip": schedule.grad_clip}
    np.savez(path, spec=json.dumps(spec), **rows,
             test_images=data.test.read_images(test), test_sizes=data.test.resized_sizes[test])


def jaxal_detector(data, args):
    from jaxal.detection import training
    from jaxal.models import fcos, resnet

    model = fcos.FCOS(resnet.ResNetBackbone(depth=18, frozen_stages=1, norm_eval=True), data.num_classes,
                      fcos.FCOS_TV, channels=args.channels, stacked_convs=args.stacked_convs)
    return training.Detector(model, fcos.FCOS_TV)


def ported(detector, data, args, torch_out: dict, prefix: str) -> dict:
    """The torch state dict saved under `prefix` as jaxal variables (the parity script's port)."""
    import jax

    from jaxal.detection import training

    state = {k.removeprefix(prefix): v for k, v in torch_out.items() if k.startswith(prefix)}
    variables = port.jaxal_params(state, depth=18, stacked_convs=args.stacked_convs)
    reference = training.init_detector(detector, jax.random.PRNGKey(0), data.train.canvases[0])
    same = jax.tree.map(lambda a, b: a.shape == b.shape, reference, variables)
    assert all(jax.tree.leaves(same)), "the ported parameters do not have the model's shapes"
    return variables


def jaxal_side(data, args, schedule, torch_out: dict) -> dict:
    from jaxal.detection import active, training

    detector = jaxal_detector(data, args)
    variables = ported(detector, data, args, torch_out, "state/")
    start, cpu = time.perf_counter(), time.process_time()
    variables, history = training.train(detector, variables, data.train, active.simulated_pool(data.train), schedule,
                                        np.random.default_rng(args.seed), flip=True,
                                        trainable=active.trainable_mask(variables["params"]), log_every=args.log_every)
    losses = [float(h["loss"]) for h in history]
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    found = training.detect(detector, variables, data.test, np.arange(len(data.test)), EVAL_BATCH)
    return {"losses": losses, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
            "detect_seconds": time.perf_counter() - start, "detections": found}


def metrics(data, found: dict) -> dict:
    from jaxal.detection import evaluate

    test = np.arange(len(data.test))
    coco = evaluate.coco_metrics(data.test, test, found, num_classes=data.num_classes)
    voc = evaluate.voc_map(data.test, test, found, num_classes=data.num_classes)
    return {"test_ap": float(coco["ap"]), "test_ap50": float(coco["ap50"]), "test_ap75": float(coco["ap75"]),
            "test_map50": float(voc["map50"]),
            "test_per_class_ap": [None if np.isnan(v) else float(v) for v in coco["per_class_ap"]],
            "detections": int(np.asarray(found["valid"]).sum())}


def summary(side: dict, data, every: int) -> dict:
    losses = side["losses"]
    return {**metrics(data, side["detections"]), "first_loss": losses[0], "final_loss": losses[-1],
            # the mean of the last 20 iterations: the last one alone follows its batch
            "final_loss_mean20": float(np.mean(losses[-20:])), "losses_every": [float(v) for v in losses[::every]],
            "train_seconds": float(side["train_seconds"]), "train_cpu_seconds": float(side["train_cpu_seconds"]),
            "detect_seconds": float(side["detect_seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON"),
                        help="an interpreter with torch and torchvision")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--warmup-iters", type=int, default=50)
    parser.add_argument("--warmup-ratio", type=float, default=0.001)
    parser.add_argument("--grad-clip", type=float, default=10.0)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--stacked-convs", type=int, default=2)
    parser.add_argument("--canvas", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch's intra-op threads (on 2 shared cores a step with 2 cost 4-11x the CPU seconds "
                             "of 1)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--torch-side", nargs=2, help=argparse.SUPPRESS)  # internal: DATA.npz OUT.npz
    args = parser.parse_args()
    if args.torch_side:
        torch_side(*args.torch_side)
        return
    if not args.torch_python:
        raise SystemExit("pass --torch-python PYTHON (an interpreter with torch and torchvision)")
    from jaxal.detection import training

    schedule = training.Schedule(iterations=args.iterations, batch_size=args.batch_size, base_lr=args.lr,
                                 warmup_iters=args.warmup_iters, warmup_ratio=args.warmup_ratio,
                                 grad_clip=args.grad_clip)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = load_bccd(args.canvas, tmp)
        path = os.path.join(tmp, "batches.npz")
        write_batches(data, args, schedule, path)
        out = os.path.join(tmp, "torch_out.npz")
        child = subprocess.run([args.torch_python, str(Path(__file__).resolve()), "--torch-side", path, out],
                               env={**os.environ, "PYTHONPATH": ""})  # its progress and errors on our stderr
        if child.returncode:
            raise SystemExit(f"the torch side failed (exit {child.returncode}; its error is above)")
        torch_out = dict(np.load(out))
        ours = jaxal_side(data, args, schedule, torch_out)
        every = max(1, args.iterations // 20)
        theirs = {"losses": torch_out["losses"], "detections": {k.removeprefix("det/"): v for k, v in
                                                                 torch_out.items() if k.startswith("det/")},
                  **{k: torch_out[k] for k in ("train_seconds", "train_cpu_seconds", "detect_seconds")}}
        # torchvision's trained weights decoded by jaxal: separates the decoders from the trainers
        detector = jaxal_detector(data, args)
        cross = training.detect(detector, ported(detector, data, args, torch_out, "final/"), data.test,
                                np.arange(len(data.test)), EVAL_BATCH)
        result = {**json.loads(str(torch_out["versions"])), "torch_threads": int(torch_out["threads"]),
                  "schedule": {k: getattr(schedule, k) for k in ("iterations", "batch_size", "base_lr", "momentum",
                                                                  "weight_decay", "warmup_iters", "warmup_ratio",
                                                                  "grad_clip", "steps", "gamma")},
                  "model": f"FCOS fcos_tv ResNet-18 from scratch, {args.channels} channels, {args.stacked_convs} "
                           f"convs per tower, canvas {data.train.canvases[0]}",
                  "train_images": int(len(data.train)), "test_images": int(len(data.test)),
                  "loss_every": every,
                  "jaxal": summary(ours, data, every), "torchvision": summary(theirs, data, every),
                  "torchvision_weights_jaxal_decoding": metrics(data, cross),
                  "wall_seconds": time.perf_counter() - wall, "load_average": os.getloadavg()}
    keys = ("test_ap", "test_ap50", "test_ap75", "test_map50", "test_per_class_ap", "first_loss", "final_loss",
            "final_loss_mean20", "train_seconds", "train_cpu_seconds", "detect_seconds")
    print(f"{'':20} {'jaxal':>28} {'torchvision':>28}")
    for k in keys:
        print(f"{k:20} {str(result['jaxal'][k]):>28} {str(result['torchvision'][k]):>28}")
    cross = result["torchvision_weights_jaxal_decoding"]
    print(f"torchvision's trained weights, jaxal's decoding: AP {cross['test_ap']:.4f} AP50 {cross['test_ap50']:.4f} "
          f"mAP@0.5 {cross['test_map50']:.4f}")
    print(f"wall {result['wall_seconds']:.0f} s, load average {result['load_average']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
