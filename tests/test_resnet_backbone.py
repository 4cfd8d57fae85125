"""Tests of `jaxal.models.resnet`: random weights under torchvision's key names and shapes, converted and
run through the Flax backbone, against an independent NCHW implementation written here with
`lax.conv_general_dilated` on the torch layouts (float64, ~1e-9); training-mode BatchNorm and its running
averages as torch updates them; frozen stages and frozen BatchNorm get no gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal.models import resnet as R

pytestmark = pytest.mark.usefixtures("x64")

BLOCKS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3])}


def random_state_dict(depth: int, seed: int = 0) -> dict:
    """torchvision's resnet{depth}().state_dict() keys and shapes, random values (fc included)."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, out, inp, k):
        state[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / (inp * k * k)), (out, inp, k, k))

    def bn(name, c):
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
        state[f"{name}.bias"] = rng.normal(0, 0.1, c)
        state[f"{name}.running_mean"] = rng.normal(0, 0.1, c)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)
        state[f"{name}.num_batches_tracked"] = np.array(7)

    kind, counts = BLOCKS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, count) in enumerate(zip([64, 128, 256, 512], counts), start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            if kind == "basic":
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            else:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            if stride != 1 or inplanes != planes * expansion:
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1), bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    state["fc.weight"] = rng.normal(size=(1000, inplanes))
    state["fc.bias"] = rng.normal(size=1000)
    return state


# --- the reference: torch's forward in NCHW, written independently --------------------------------


def ref_conv(x, w, stride, pad):
    return jax.lax.conv_general_dilated(x, jnp.asarray(w), (stride, stride), [(pad, pad), (pad, pad)],
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        precision=jax.lax.Precision.HIGHEST)


def ref_bn(x, s, name, train, updates):
    if train:
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        n = x.shape[0] * x.shape[2] * x.shape[3]
        updates[name] = (0.9 * s[f"{name}.running_mean"] + 0.1 * mean,
                         0.9 * s[f"{name}.running_var"] + 0.1 * var * n / (n - 1))
    else:
        mean, var = s[f"{name}.running_mean"], s[f"{name}.running_var"]
    shape = (1, -1, 1, 1)
    return ((x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + 1e-5) * s[f"{name}.weight"].reshape(shape)
            + s[f"{name}.bias"].reshape(shape))


def ref_maxpool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                                 [(0, 0), (0, 0), (1, 1), (1, 1)])


def ref_resnet(s, x, depth, train=False):
    """C3, C4, C5 (NCHW) and the running-statistics updates of training mode."""
    kind, counts = BLOCKS[depth]
    updates = {}
    bn = lambda h, name: ref_bn(h, s, name, train, updates)  # noqa: E731
    h = jax.nn.relu(bn(ref_conv(x, s["conv1.weight"], 2, 3), "bn1"))
    h = ref_maxpool(h)
    outs = []
    for stage, count in enumerate(counts, start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            if kind == "basic":
                y = jax.nn.relu(bn(ref_conv(h, s[f"{p}.conv1.weight"], stride, 1), f"{p}.bn1"))
                y = bn(ref_conv(y, s[f"{p}.conv2.weight"], 1, 1), f"{p}.bn2")
            else:
                y = jax.nn.relu(bn(ref_conv(h, s[f"{p}.conv1.weight"], 1, 0), f"{p}.bn1"))
                y = jax.nn.relu(bn(ref_conv(y, s[f"{p}.conv2.weight"], stride, 1), f"{p}.bn2"))
                y = bn(ref_conv(y, s[f"{p}.conv3.weight"], 1, 0), f"{p}.bn3")
            if f"{p}.downsample.0.weight" in s:
                h = bn(ref_conv(h, s[f"{p}.downsample.0.weight"], stride, 0), f"{p}.downsample.1")
            h = jax.nn.relu(y + h)
        outs.append(h)
    return outs[1:], updates


def reference(state, x, depth, train):
    """ref_resnet compiled once (op-by-op it would compile every convolution separately)."""
    arrays = {k: jnp.asarray(v, jnp.float64) for k, v in state.items() if not k.startswith("fc.") and v.ndim}
    return jax.jit(lambda s, x: ref_resnet(s, x, depth, train))(arrays, jnp.asarray(x))


@pytest.fixture(scope="module")
def eval_case(request):
    """Random weights, an input and the reference's inference outputs, per depth, computed once."""
    cases = {}

    def case(depth):
        if depth not in cases:
            with jax.enable_x64(True):
                state = random_state_dict(depth)
                x = np.random.default_rng(1).normal(size=(2, 3, 32, 64))
                cases[depth] = state, x, reference(state, x, depth, False)[0]
        return cases[depth]

    return case


@pytest.mark.parametrize("depth", [18, 50])
def test_converted_torchvision_weights_match_the_nchw_reference(depth, tmp_path, eval_case):
    state, x, expected = eval_case(depth)
    np.savez(tmp_path / "w.npz", **state)
    variables = R.load_torchvision_weights(tmp_path / "w.npz", depth, dtype=np.float64)
    got = jax.jit(R.ResNetBackbone(depth).apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    for g, e, stride in zip(got, expected, (8, 16, 32)):
        assert g.dtype == jnp.float64 and g.shape[1:3] == (32 // stride, 64 // stride)
        np.testing.assert_allclose(np.asarray(g), np.asarray(e).transpose(0, 2, 3, 1), rtol=1e-9, atol=1e-9)


def test_training_batchnorm_and_running_averages_match_torch(eval_case):
    depth = 18
    state, x, evaluated = eval_case(depth)
    variables = R.torchvision_variables(state, depth, dtype=np.float64)
    model = R.ResNetBackbone(depth, frozen_stages=-1, norm_eval=False, norm_trainable=True)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    got, mutated = apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True, mutable=("batch_stats",))
    expected, updates = reference(state, x, depth, True)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e).transpose(0, 2, 3, 1), rtol=1e-9, atol=1e-9)
    stats = mutated["batch_stats"]
    for torch_name, flax_path in [("bn1", ("bn1",)), ("layer3.0.downsample.1", ("layer3_0", "downsample_bn")),
                                  ("layer4.1.bn2", ("layer4_1", "bn2"))]:
        node = stats
        for key in flax_path:
            node = node[key]
        np.testing.assert_allclose(node["mean"], updates[torch_name][0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(node["var"], updates[torch_name][1], rtol=1e-9, atol=1e-12)
    # norm_eval: training mode computes with the running statistics and leaves them as they are
    frozen = R.ResNetBackbone(depth, frozen_stages=-1, norm_eval=True)
    out, same = jax.jit(frozen.apply, static_argnames=("train", "mutable"))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True, mutable=("batch_stats",))
    for g, e in zip(out, evaluated):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e).transpose(0, 2, 3, 1), rtol=1e-9, atol=1e-9)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same["batch_stats"], variables["batch_stats"])


def test_frozen_stages_and_frozen_norm_get_no_gradient():
    depth = 18
    variables = R.torchvision_variables(random_state_dict(depth, seed=4), depth, dtype=np.float64)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 32, 32, 3)))
    model = R.ResNetBackbone(depth)  # frozen_stages=1, norm_eval, BatchNorm scale and bias frozen

    def loss(params):
        return sum(jnp.sum(c ** 2) for c in model.apply({**variables, "params": params}, x, train=True))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    mask = R.trainable_mask(variables["params"])
    flat_g = jax.tree_util.tree_leaves_with_path(grads)
    flat_m = dict(jax.tree_util.tree_leaves_with_path(mask))
    assert sum(flat_m.values()) > 0 and sum(not m for m in flat_m.values()) > 0
    for path, g in flat_g:
        names = jax.tree_util.keystr(path)
        if flat_m[path]:
            assert np.abs(g).max() > 0, names
        else:
            assert np.abs(g).max() == 0, names
    frozen = {jax.tree_util.keystr(p) for p, m in flat_m.items() if not m}
    assert "['layer1_0']['conv1']['kernel']" in frozen and "['layer2_0']['bn1']['scale']" in frozen
    assert "['layer2_0']['conv1']['kernel']" not in frozen


def test_bad_weights_are_refused(tmp_path):
    state = random_state_dict(18)
    with pytest.raises(ValueError, match=r"ResNet-34 state dict: layer1\.2\.conv1\.weight is missing"):
        R.torchvision_variables(state, 34)
    with pytest.raises(ValueError, match=r"ResNet-50 state dict: layer1\.0\.conv1\.weight has shape \(64, 64, 3, 3\)"):
        R.torchvision_variables(state, 50)
    del state["layer2.0.bn1.running_var"]
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(ValueError, match=r"bad\.npz: .*layer2\.0\.bn1\.running_var is missing"):
        R.load_torchvision_weights(tmp_path / "bad.npz", 18)
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    try:
        import torch  # noqa: F401
        message = "cannot read"
    except ImportError:
        message = "(?s)needs PyTorch.*np.savez"
    with pytest.raises(ValueError, match=message):
        R.load_torchvision_weights(tmp_path / "w.pth", 18)
