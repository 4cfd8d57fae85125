"""jaxal's `fcos_tv` against torchvision's own FCOS on the same random weights (float32, CPU).

torch is not a dependency of jaxal, so this runs in two interpreters: a child with torch + torchvision
(`--torch-python`, e.g. a separate venv) builds `fcos_resnet50_fpn(weights=None, weights_backbone=None)`,
randomises its BatchNorm statistics, and in eval mode runs backbone -> head directly (no
GeneralizedRCNNTransform: the images given are already normalised), then `FCOS.compute_loss` on hand-made
boxes; it saves the state dict, the inputs, the head outputs and the three losses to an .npz. This process
ports the state dict into `jaxal.models.fcos.FCOS(ResNetBackbone(50), config=FCOS_TV)` and prints the
largest differences of the head outputs (per level) and of the losses.

    python experiments/compare_torchvision_fcos.py --torch-python /work/torchvenv/bin/python

The torchvision wheel on PyPI is built against CUDA torch; with the CPU-only torch its compiled ops
(`torchvision._C`, needing libtorch_cuda.so) do not load, and `import torchvision` then fails registering
fake kernels for `torchvision::nms`. The child defines those two op schemas first (never called: FCOS's
loss and head use no compiled op) so that torchvision's pure-Python FCOS can be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np

NUM_CLASSES = 3
SIZE = 128  # a 128 x 128 canvas: P3 16 x 16 ... P7 1 x 1
BOXES = [[[4, 6, 30, 28], [20, 10, 120, 100], [0, 0, 127, 127]], [[50, 40, 90, 70], [8, 60, 40, 126], [0, 0, 0, 0]]]
CLASSES = [[0, 2, 1], [1, 0, -1]]


def import_torchvision():
    """`import torchvision` with the CPU torch (module docstring): declares the two op schemas its import
    registers fake kernels for. Returns the library object, which must stay alive while the ops are used."""
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401

    return lib


def torch_side(out_path: str) -> None:
    import torch

    lib = import_torchvision()  # noqa: F841  (kept alive)
    import torchvision
    from torchvision.models.detection import fcos_resnet50_fpn
    from torchvision.models.detection.image_list import ImageList

    torch.manual_seed(0)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # random statistics and affines: the port must carry them
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        # regressions of a few strides (the init's are ~0.01 stride: every GIoU would be ~0, its loss ~1)
        model.head.regression_head.bbox_reg.weight.mul_(50.0)
        model.head.regression_head.bbox_reg.bias.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features = list(model.backbone(images).values())
        head = model.head(features)
        anchors = model.anchor_generator(ImageList(images, [(SIZE, SIZE)] * 2), features)
        num_per_level = [f.size(2) * f.size(3) for f in features]
        targets = [{"boxes": torch.tensor([b for b, c in zip(bs, cs) if c >= 0], dtype=torch.float32),
                    "labels": torch.tensor([c for c in cs if c >= 0], dtype=torch.int64)}
                   for bs, cs in zip(BOXES, CLASSES)]
        loss = model.compute_loss(targets, head, anchors, num_per_level)
    state = {f"state/{k}": v.numpy() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    np.savez(out_path, images=images.permute(0, 2, 3, 1).numpy(), num_per_level=np.array(num_per_level),
             cls=head["cls_logits"].numpy(), reg=head["bbox_regression"].numpy(), ctr=head["bbox_ctrness"].numpy(),
             **{f"loss/{k}": v.numpy() for k, v in loss.items()}, **state)
    print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__}))


def conv(state, key):
    """torch Conv2d (out, in, kh, kw) -> flax Conv {kernel (kh, kw, in, out), bias}."""
    out = {"kernel": np.transpose(state[f"{key}.weight"], (2, 3, 1, 0))}
    if f"{key}.bias" in state:
        out["bias"] = state[f"{key}.bias"]
    return out


def jaxal_params(state: dict, depth: int = 50, stacked_convs: int = 4) -> dict:
    """A torchvision FCOS state dict (ResNet-`depth` FPN backbone, `stacked_convs` convs per head tower) as
    the variables of `jaxal.models.fcos.FCOS(ResNetBackbone(depth), ..., FCOS_TV)`."""
    from jaxal.models import resnet

    backbone = resnet.torchvision_variables({k.removeprefix("backbone.body."): v for k, v in state.items()
                                             if k.startswith("backbone.body.")}, depth)
    neck = {}
    for i in range(3):
        neck[f"lateral_{i}"] = conv(state, f"backbone.fpn.inner_blocks.{i}.0")
        neck[f"fpn_{i}"] = conv(state, f"backbone.fpn.layer_blocks.{i}.0")
    neck["extra_0"] = conv(state, "backbone.fpn.extra_blocks.p6")
    neck["extra_1"] = conv(state, "backbone.fpn.extra_blocks.p7")
    head = {}
    for branch, name in (("cls", "classification_head"), ("reg", "regression_head")):
        for i in range(stacked_convs):  # Sequential(Conv2d, GroupNorm, ReLU) x 4
            head[f"{branch}_conv_{i}"] = conv(state, f"head.{name}.conv.{3 * i}")
            head[f"{branch}_norm_{i}"] = {"scale": state[f"head.{name}.conv.{3 * i + 1}.weight"],
                                          "bias": state[f"head.{name}.conv.{3 * i + 1}.bias"]}
    head["fcos_cls"] = conv(state, "head.classification_head.cls_logits")
    head["fcos_reg"] = conv(state, "head.regression_head.bbox_reg")
    head["fcos_centerness"] = conv(state, "head.regression_head.bbox_ctrness")
    return {"params": {"backbone": backbone["params"], "neck": neck, "head": head},
            "batch_stats": {"backbone": backbone["batch_stats"]}}


def compare(path: str) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxal.detection import losses
    from jaxal.models import fcos, resnet

    data = dict(np.load(path))
    state = {k.removeprefix("state/"): v for k, v in data.items() if k.startswith("state/")}
    config = fcos.FCOS_TV
    model = fcos.FCOS(resnet.ResNetBackbone(depth=50), NUM_CLASSES, config)
    variables = jaxal_params(state)
    images = jnp.asarray(data["images"])
    reference = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images[:1]))
    same = jax.tree.map(lambda a, b: a.shape == b.shape, reference, variables)
    assert all(jax.tree.leaves(same)), "the ported parameters do not have the model's shapes"
    maps = jax.jit(model.apply)(variables, images)["logits"]
    # torchvision: (N, sum HW, K) concatenated over levels, bbox_regression before the box coder's x stride
    flat = lambda m: jnp.concatenate([a.reshape(a.shape[0], -1, *a.shape[3:]) for a in m], 1)  # noqa: E731
    strides = np.concatenate([np.full(n, s) for n, s in zip(data["num_per_level"], config.strides)])
    ours = {"cls": flat(maps["cls"]), "reg": flat(maps["reg"]) / strides[None, :, None], "ctr": flat(maps["ctr"])}
    theirs = {"cls": data["cls"], "reg": data["reg"], "ctr": data["ctr"][..., 0]}
    result = {}
    for k in ours:
        diff = np.abs(np.asarray(ours[k]) - theirs[k])
        result[f"head_{k}_max_abs_diff"] = float(diff.max())
        result[f"head_{k}_max_abs"] = float(np.abs(theirs[k]).max())
    m = max(len(b) for b in BOXES)
    labels = {"boxes": jnp.asarray(BOXES, jnp.float32).reshape(2, m, 4), "classes": jnp.asarray(CLASSES, jnp.int32),
              "difficult": jnp.zeros((2, m), bool)}
    parts = losses.batch_parts(maps, labels, config)
    for ours_key, theirs_key in (("cls", "classification"), ("box", "bbox_regression"), ("ctr", "bbox_ctrness")):
        result[f"loss_{ours_key}_jaxal"] = float(parts[ours_key])
        result[f"loss_{ours_key}_torchvision"] = float(data[f"loss/{theirs_key}"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON"),
                        help="an interpreter with torch and torchvision")
    parser.add_argument("--torch-side", help=argparse.SUPPRESS)  # internal: the child writes this .npz
    args = parser.parse_args()
    if args.torch_side:
        torch_side(args.torch_side)
        return
    if not args.torch_python:
        raise SystemExit("pass --torch-python PYTHON (an interpreter with torch and torchvision)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "torchvision_fcos.npz")
        child = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch-side", path],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if child.returncode:
            raise SystemExit(f"the torch side failed:\n{child.stderr[-3000:]}")
        versions = json.loads(child.stdout.strip().splitlines()[-1])
        result = {**versions, **compare(path)}
    for k, v in result.items():
        print(f"{k:32} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
