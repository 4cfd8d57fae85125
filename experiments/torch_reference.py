"""PyTorch twins of jaxal's models and the reference codes' own scoring loops, for the benchmarks.

torch is not a dependency of jaxal: the benchmarks import this module through
`timing.import_torch_reference(--torch-site)` and run without it when torch is absent.

- `ResNet18`: kuangliu/pytorch-cifar's ResNet-18 (CIFAR stem), the model of the reference codes
  (AL-GradNorm's `models/resnet.py` and ISAL's `pycls/models/resnet_extra.py` are copies of it; AL-GradNorm's
  has a second linear head that no loss uses, so it gets no gradient and its scores do not see it).
- `SmallCNN`: the twin of `jaxal.models.SmallCNN` (the digits CNN).
- `twin(name, variables, input_shape)`: that model with jaxal's initialised weights and BatchNorm statistics,
  in eval mode, on `DEVICE`, so that both frameworks compute the same function and the benchmarks can
  check it before they time anything.
- `gradnorm_scores`: AL-GradNorm's `get_uncertainty` (xulabs/aitom `al_gradnorm/main.py`) with its default
  `SCHEME = 1`, entropy-gradnorm: batch size 1, eval mode, entropy of the posterior, `zero_grad`, backward,
  the score is the sum over parameters of `torch.norm(p.grad)` (jaxal's `norm="layer_sum"`, subset "all").
- `lissa_steps`, `hessian_vector_product`: ISAL's `s_test` and `hessian_vec_prod` (dragonlzm/ISAL
  `classification/src/utils.py`): one labelled example per step, a double-backprop Hessian-vector product
  over the parameters of rank > 1, `h = v + (1 - damp) h - Hh / scale` with a NaN check per tensor.
- `influence_scores`: ISAL's `calc_influence_funtion`: one unlabelled example at a time, the gradient of the
  cross-entropy at the pseudo-label (arg-max), flattened, dotted with `s_test`, moved to the host.
ISAL's loss is pycls's soft cross-entropy of one-hot labels without smoothing, i.e. `F.cross_entropy`.

Device: CUDA when available (cudnn autotuning on, as both reference codes set it), else the CPU with one
thread per usable core, and OpenMP threads that sleep rather than spin while they wait (`OMP_WAIT_POLICY=
PASSIVE` unless set): on 2 cores shared with other processes, spinning threads made torch's batch-1 loops
4x (ResNet-18) to 15x (digits CNN) slower than one thread, and sleeping ones are as fast as one thread or
faster. Every function that the benchmarks time synchronises before it returns.
"""

from __future__ import annotations

import contextlib
import os
import re

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads its OpenMP runtime

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import traverse_util  # noqa: E402
from torch.distributions import Categorical  # noqa: E402

from timing import num_cores  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    torch.backends.cudnn.benchmark = True
else:
    torch.set_num_threads(num_cores())


@contextlib.contextmanager
def full_float32():
    """Float32 products without TF32 in torch and in JAX (precision "highest"), for the agreement checks
    only: on a GPU both frameworks compute float32 convolutions and matrix products in TF32 by default,
    which a second-order product (an HVP) amplifies well beyond float32's rounding. The timings keep the
    defaults."""
    import jax

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def describe() -> str:
    threads = "" if DEVICE.type == "cuda" else (f", {torch.get_num_threads()} threads, "
                                                f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    return f"torch {torch.__version__} on {DEVICE}{threads}"


# ---- models -----------------------------------------------------------------------------------------


class BasicBlock(nn.Module):  # kuangliu/pytorch-cifar models/resnet.py
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """kuangliu/pytorch-cifar's ResNet18 (the 4x4 average pool assumes 32x32 inputs)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.linear(out)


class SmallCNN(nn.Module):
    """`jaxal.models.SmallCNN`: two 3x3 convolutions (same padding) with ReLU, a 2x2 max-pool, a dense
    layer with ReLU, dropout, the `head`."""

    def __init__(self, num_classes, input_shape, channels=(32, 64), hidden=128, dropout_rate=0.25):
        super().__init__()
        height, width, in_channels = input_shape
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc = nn.Linear(channels[1] * (height // 2) * (width // 2), hidden)
        self.dropout = nn.Dropout(dropout_rate)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        h = F.relu(self.fc(h.flatten(1)))
        return self.head(self.dropout(h))


# ---- jaxal weights into the twins ---------------------------------------------------------------------


def _resnet18_module(flax_path: tuple[str, ...]) -> str:
    block = re.fullmatch(r"stage(\d)_block(\d)", flax_path[0])
    if block:
        inner = {"shortcut": "shortcut.0", "shortcut_bn": "shortcut.1"}.get(flax_path[1], flax_path[1])
        return f"layer{int(block[1]) + 1}.{block[2]}.{inner}"
    return {"stem": "conv1", "stem_bn": "bn1", "head": "linear"}[flax_path[0]]


def _small_cnn_module(flax_path: tuple[str, ...]) -> str:
    return {"Conv_0": "conv1", "Conv_1": "conv2", "Dense_0": "fc", "head": "head"}[flax_path[0]]


MODULE_NAMES = {"resnet18": _resnet18_module, "cnn": _small_cnn_module}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_state(name: str, tree, input_shape) -> dict[str, np.ndarray]:
    """{state_dict key of the twin of model `name`: array} for a tree shaped like jaxal's parameters or
    BatchNorm statistics (or a vector over a parameter subset: None leaves are skipped). Convolution kernels
    go from HWIO to OIHW, dense kernels are transposed, and the digits CNN's first dense kernel has its
    input rows reordered from Flax's (H, W, C) flattening to torch's (C, H, W)."""
    state = {}
    for path, value in traverse_util.flatten_dict(tree).items():
        if value is None:
            continue
        a = np.asarray(value)
        if path[-1] == "kernel" and a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel":
            if name == "cnn" and path[0] == "Dense_0":
                height, width = input_shape[0] // 2, input_shape[1] // 2
                a = a.reshape(height, width, -1, a.shape[-1]).transpose(2, 0, 1, 3).reshape(a.shape)
            a = a.T
        state[f"{MODULE_NAMES[name](path[:-1])}.{_LEAF_NAMES[path[-1]]}"] = np.array(a, np.float32)  # a writable copy
    return state


def twin(name: str, variables: dict, input_shape, num_classes: int = 10) -> nn.Module:
    """The torch twin of `jaxal.models.create_model(name, num_classes)` holding `variables` (jaxal's
    {'params', 'batch_stats'}), in eval mode on DEVICE. Every parameter and buffer must be filled (only
    BatchNorm's step counters have no jaxal counterpart), so a wrong name mapping fails here."""
    model = ResNet18(num_classes) if name == "resnet18" else SmallCNN(num_classes, tuple(input_shape))
    state = {**torch_state(name, variables["params"], input_shape),
             **torch_state(name, variables["batch_stats"], input_shape)}
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"jaxal -> torch weights of {name}: missing {missing}, unexpected {unexpected}")
    return model.to(DEVICE).eval()


def images(xs) -> torch.Tensor:
    """jaxal's (N, H, W, C) images as a float32 (N, C, H, W) tensor on DEVICE."""
    return torch.tensor(np.asarray(xs, np.float32)).permute(0, 3, 1, 2).contiguous().to(DEVICE)


def labels(ys) -> torch.Tensor:
    return torch.tensor(np.asarray(ys, np.int64)).to(DEVICE)


def tensors(state: dict[str, np.ndarray], names: list[str]) -> list[torch.Tensor]:
    """The arrays of `state` (from `torch_state`) named `names`, in that order, on DEVICE."""
    return [torch.tensor(state[n]).to(DEVICE) for n in names]


def flat(tensors_: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors_])


# ---- AL-GradNorm ----------------------------------------------------------------------------------------


def gradnorm_scores(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """AL-GradNorm's entropy-gradnorm score of every row of `xs`, one example at a time, on the host."""
    model.eval()
    scores = []
    for x in xs:
        posterior = F.softmax(model(x[None]), dim=1)
        loss = Categorical(probs=posterior).entropy()
        model.zero_grad()
        loss.backward(retain_graph=True)
        scores.append(torch.stack([torch.norm(p.grad) for p in model.parameters() if p.grad is not None]).sum())
    return torch.stack(scores).cpu()


# ---- ISAL -------------------------------------------------------------------------------------------------


def weight_parameters(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """ISAL's parameter subset, the tensors of rank > 1 (jaxal's "weights"), with their names."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() != 1]
    return [n for n, _ in named], [p for _, p in named]


def labeled_loss(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """ISAL's training loss (pycls's soft cross-entropy of one-hot labels, no smoothing), batch mean."""
    return F.cross_entropy(model(xs), ys)


def hessian_vector_product(loss: torch.Tensor, params, v) -> list[torch.Tensor]:
    """ISAL's `hessian_vec_prod`: grad with a graph, the dot with v, grad again (with a graph, as there)."""
    first = torch.autograd.grad(loss, params, retain_graph=True, create_graph=True)
    dot = torch.sum(torch.cat([torch.sum(g * v_)[None] for g, v_ in zip(first, v)]))
    return [h.detach() for h in torch.autograd.grad(dot, params, create_graph=True)]


def lissa_steps(model: nn.Module, params, v, xs: torch.Tensor, ys: torch.Tensor, *, damping: float = 0.01,
                scale: float = 1e4) -> list[torch.Tensor]:
    """len(xs) steps of ISAL's `s_test` recursion from h = v, the labelled example (xs[t], ys[t]) at step t.
    The NaN test is the reference's `True in torch.isnan(hv)`: a host sync per tensor per step."""
    h = list(v)
    for x, y in zip(xs, ys):
        loss = labeled_loss(model, x[None], y[None])
        hv = hessian_vector_product(loss, params, h)
        h = [v_ if True in torch.isnan(hv_) else v_ + (1 - damping) * h_ - hv_ / scale
             for v_, h_, hv_ in zip(v, h, hv)]
    synchronize()
    return h


def influence_scores(model: nn.Module, params, s_test: torch.Tensor, xs: torch.Tensor) -> np.ndarray:
    """ISAL's per-example influence loop: `s_test . grad CE(x, argmax)` for every row of `xs` (the reference
    returns minus this over the pool size; sign and scale are free). `s_test` is flattened in `params` order."""
    scores = []
    for x in xs:
        preds = model(x[None])
        pseudo_label = F.softmax(preds, dim=1).argmax().unsqueeze(0)
        grads = torch.autograd.grad(F.cross_entropy(preds, pseudo_label), params)
        grad_concat = torch.cat([g.detach().view(-1) for g in grads])
        scores.append(torch.sum(grad_concat * s_test).cpu().numpy())
    return np.array(scores)
