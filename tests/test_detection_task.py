"""The Detection task on a toy FCOS (float64): the ghost gradient-norm engine with the head applied once per
level equals vmap(grad); exp-gn = ent-gn; jvp influence scores equal a per-image jax.grad loop; the
training step goes through the task's batch loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import to64
from detection_toys import ISAL, TV, toy_fcos
from jaxal import gradnorm, influence, tasks
from jaxal.models import ModelOutput

pytestmark = pytest.mark.usefixtures("x64")

N = 3


@functools.lru_cache(maxsize=None)
def setup(config):
    """Model, apply_fn, float64 params and images; built once per config for the module."""
    model = toy_fcos(config)
    xs = jax.random.normal(jax.random.PRNGKey(0), (N, 64, 64, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), xs[:1])["params"]
    # perturb the class bias away from the prior so the entropy gradients are not tiny
    params = to64(jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params))

    def apply_fn(p, x):
        out = model.apply({"params": p}, x)
        return ModelOutput(out["logits"], out["features"])

    return model, apply_fn, params, to64(xs)


def one_image_outputs(model, params, xs):
    return jax.tree.map(lambda a: a[0], jax.jit(model.apply)({"params": params}, xs[:1])["logits"])


def labels():
    boxes = jnp.array([[[4, 4, 30, 26], [20, 8, 60, 50], [0, 0, 0, 0.]],
                       [[10, 10, 50, 40], [0, 0, 0, 0], [0, 0, 0, 0.]],
                       [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.]]])
    classes = jnp.array([[0, 2, -1], [1, -1, -1], [-1, -1, -1]], jnp.int32)
    return {"boxes": boxes, "classes": classes, "difficult": jnp.zeros((N, 3), bool)}


def head_branch(prefixes):
    def mask(params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {k: k[0] == "head" and any(k[1].startswith(p) for p in prefixes) for k in flat})
    return mask


def not_scales(params):
    """Everything but the per-level Scale parameters (self.param, which the ghost path does not form)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: not k[-1].startswith("scale_") for k in flat})


@pytest.mark.parametrize("config,subset", [(ISAL, "cls_branch"), (TV, "all_layers")], ids=["isal_cls", "tv_all"])
def test_ghost_equals_vmap_for_the_entropy_norm_with_the_head_called_per_level(config, subset):
    _, apply_fn, params, xs = setup(config)
    task = tasks.Detection(3, config=config, top_k=20)
    loss = gradnorm.example_loss(apply_fn, task.entropy)
    params_filter = head_branch(("cls_conv", "cls_norm", "fcos_cls")) if subset == "cls_branch" else not_scales
    ghost = gradnorm.per_example_grad_norms(loss, params, xs, params_filter=params_filter, method="ghost")
    vmap = gradnorm.per_example_grad_norms(loss, params, xs, params_filter=params_filter, method="vmap")
    np.testing.assert_allclose(np.asarray(ghost), np.asarray(vmap), rtol=1e-9)
    assert np.all(np.asarray(vmap) > 1e-6)
    if subset == "all_layers":  # the per-layer reduction is one code path for any subset: checked on all layers
        layer_sum = gradnorm.per_example_grad_norms(loss, params, xs, params_filter=params_filter, method="ghost",
                                                    norm="layer_sum")
        np.testing.assert_allclose(np.asarray(layer_sum), np.asarray(gradnorm.per_example_grad_norms(
            loss, params, xs, params_filter=params_filter, method="vmap", norm="layer_sum")), rtol=1e-9)


def test_ghost_refuses_what_it_cannot_form():
    """The per-level Scale is a bare parameter, no layer: asking for it is refused with the layer named."""
    _, apply_fn, params, xs = setup(ISAL)
    loss = gradnorm.example_loss(apply_fn, tasks.Detection(3, config=ISAL, top_k=20).entropy)
    with pytest.raises(ValueError, match="scale_0"):
        gradnorm.per_example_grad_norms(loss, params, xs, method="ghost")


def test_expected_loss_equals_entropy_with_gradients():
    model, _, params, xs = setup(ISAL)
    task = tasks.Detection(3, config=ISAL, top_k=20)
    outputs = one_image_outputs(model, params, xs)
    values = jax.jit(lambda o: (task.entropy(o), task.expected_loss(o)))(outputs)
    assert np.isfinite(float(values[0]))
    np.testing.assert_allclose(float(values[1]), float(values[0]), rtol=1e-12)
    g1, g2 = jax.jit(lambda o: (jax.grad(task.entropy)(o), jax.grad(task.expected_loss)(o)))(outputs)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
    # only the top-k locations carry gradient
    flat_cls = np.concatenate([np.asarray(a).reshape(-1, 3) for a in g1["cls"]])
    assert (np.abs(flat_cls).sum(-1) > 0).sum() == 20


def test_jvp_influence_scores_equal_a_per_image_grad_loop():
    """On ISAL's config; that forward mode and reverse mode agree through torchvision's loss as well is
    tests/test_fcos.py's jvp test (the influence code is the same for both configs)."""
    config = ISAL
    _, apply_fn, params, xs = setup(config)
    task = tasks.Detection(3, config=config)
    ys = labels()

    def image_loss(p, example):
        x, y = example
        return task.supervised_loss(jax.tree.map(lambda a: a[0], apply_fn(p, x[None]).logits), y)

    s = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)
    scores = jax.jit(lambda p, v, e: influence.jvp_scores(image_loss, p, v, e))(params, s, (xs, ys))
    grad = jax.jit(jax.grad(image_loss))
    loop = []
    for i in range(N):
        g = grad(params, (xs[i], jax.tree.map(lambda a: a[i], ys)))
        loop.append(sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(s))))
    np.testing.assert_allclose(np.asarray(scores), loop, rtol=1e-9)


def test_pseudo_label_loss_is_the_loss_at_the_image_own_detections():
    model, _, params, xs = setup(ISAL)
    task = tasks.Detection(3, config=ISAL, pseudo_score=0.2, max_boxes=10)
    outputs = one_image_outputs(model, params, xs)
    label, pseudo, direct = jax.jit(lambda o: (task.pseudo_labels(o), task.pseudo_label_loss(o),
                                               task.supervised_loss(o, task.pseudo_labels(o))))(outputs)
    assert 0 < int((label["classes"] >= 0).sum()) <= 10
    np.testing.assert_allclose(float(pseudo), float(direct), rtol=1e-12)


def test_augment_refuses_crops():
    with pytest.raises(ValueError, match="flip"):
        tasks.Detection(3).augment(None, None, None, "crop", 4)
