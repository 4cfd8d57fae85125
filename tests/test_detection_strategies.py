"""Detection strategies (`jaxal.detection.strategies`) on a toy FCOS and a small VOC folder written here,
in float64, against independent references: ISAL's scores against per-image `jax.grad` loops and a NumPy
transcription of its code's LiSSA (per-tensor scales, loader order) on dense per-image Hessians; the
per-tensor LiSSA fixed point against a dense solve; ent_gn against a per-image `jax.grad` loop (exp_gn =
ent_gn); the uncertainty miners against NumPy transcriptions of ISAL's; coreset against a NumPy greedy."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from conftest import to64
from detection_toys import ISAL, ToyBackbone
from jaxal import config as config_lib
from jaxal import influence as influence_lib
from jaxal.data import boxes as boxes_lib
from jaxal.detection import strategies, training
from jaxal.detection.strategies import gradient as gradient_strategies
from jaxal.detection.strategies import influence as isal_lib
from jaxal.detection.strategies import stability, uncertainty
from jaxal.models import fcos
from jaxal.tasks import Detection

pytestmark = pytest.mark.usefixtures("x64")

CLASSES = ("a", "b", "c")
# image id -> objects (class, (xmin, ymin, xmax, ymax), VOC 1-based); every image 64 x 64
POOL = {f"p{i}": [(CLASSES[i % 3], (4 + 3 * i, 6, 30 + 4 * i, 40))] for i in range(8)}
VAL = {"v0": [("a", (10, 10, 50, 40)), ("c", (2, 30, 20, 60))], "v1": [("b", (20, 4, 60, 30))]}


def write_voc(root):
    rng = np.random.default_rng(0)
    for name, objects in {**POOL, **VAL}.items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.png")
        xml = [f"<annotation><filename>{name}.png</filename><size><width>64</width><height>64</height>"
               "<depth>3</depth></size>"]
        xml += [f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for c, b in objects]
        (root / "Annotations" / f"{name}.xml").write_text("".join(xml) + "</annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, ids in {"train": list(POOL), "val": list(VAL), "test": list(VAL)}.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))


LABELED = np.array([0, 1, 2])  # loader order of the labelled set
CANDIDATES = np.array([5, 6, 7])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(context factory, detector, variables, data, task), float64 weights, built once."""
    root = tmp_path_factory.mktemp("voc")
    write_voc(root)
    data = boxes_lib.load_boxes(root, canvas=64, class_names=CLASSES)
    model = fcos.FCOS(ToyBackbone(), 3, ISAL, channels=8, stacked_convs=1)  # 288 parameters in the last convs
    detector = training.Detector(model, ISAL)
    with jax.enable_x64(True):  # (a module fixture is set up before the tests' x64 fixture)
        params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 64, 64, 3)))["params"]
        params = to64(jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params))
        variables = {"params": params, "batch_stats": {}}
        # the pseudo-box threshold between the candidates' best detection scores: some have boxes, some none
        found = training.detect(detector, variables, data.train, CANDIDATES, 4)
    task = Detection(3, config=ISAL)
    best = np.sort(found["scores"].max(1))
    threshold = float((best[0] + best[1]) / 2)

    def context(k_repeats=2, depth=2, **boxal):
        config = config_lib.build_config(
            "bccd_fcos", eval_batch_size=2, influence=dict(repeats=k_repeats),
            boxal=dict(pseudo_score=threshold, s_test_images=depth, top_k=20, **boxal))
        return strategies.DetectionContext(detector, variables, data.train, CANDIDATES, LABELED, task, config,
                                           np.random.default_rng(0), reference=(data.val, np.arange(len(data.val))))

    return context, detector, variables, data, task, threshold


def image_and_label(split, i):
    batch = isal_lib.read_padded(split, [i])
    return jnp.asarray(batch["images"][0]), {k: jnp.asarray(batch[k][0]) for k in ("boxes", "classes", "difficult")}


def kernels(params):
    return [params["head"][name]["kernel"] for name in isal_lib.LAST_CONVS]


def with_kernels(params, ks):
    head = dict(params["head"])
    for name, k in zip(isal_lib.LAST_CONVS, ks):
        head[name] = {**head[name], "kernel": k}
    return {**params, "head": head}


@functools.lru_cache(maxsize=None)
def flat_loss_fns(detector, task):
    def loss_at(flat, params, image, label):
        shapes = [k.shape for k in kernels(params)]
        sizes = [int(np.prod(s)) for s in shapes]
        parts = jnp.split(flat, np.cumsum(sizes)[:-1])
        p = with_kernels(params, [x.reshape(s) for x, s in zip(parts, shapes)])
        out = jax.tree.map(lambda a: a[0], detector.apply({"params": p}, image[None])["logits"])
        return task.supervised_loss(out, label if label is not None else task.pseudo_labels(out))

    grad = jax.jit(jax.grad(loss_at), static_argnums=())
    hessian = jax.jit(jax.hessian(loss_at))
    return grad, hessian


def flat(params):
    return np.concatenate([np.asarray(k).reshape(-1) for k in kernels(params)])


@pytest.fixture(scope="module")
def labeled_hessians(world):
    """Each labelled image's dense Hessian of its loss w.r.t. the three kernels (jax.hessian), once."""
    _, detector, variables, data, task, _ = world
    with jax.enable_x64(True):
        _, hessian = flat_loss_fns(detector, task)
        theta, params = flat(variables["params"]), variables["params"]
        return [np.asarray(hessian(theta, params, *image_and_label(data.train, i))) for i in LABELED]


def test_isal_and_grad_sim_equal_per_image_grad_loops_and_isals_lissa(world, labeled_hessians):
    context, detector, variables, data, task, threshold = world
    params = variables["params"]
    grad, _ = flat_loss_fns(detector, dataclasses.replace(task, pseudo_score=threshold))
    theta = flat(params)
    sizes = [int(np.prod(k.shape)) for k in kernels(params)]
    # v: the reference set's per-image gradients summed
    v = sum(np.asarray(grad(theta, params, *image_and_label(data.val, j))) for j in range(len(data.val)))
    # s_test: ISAL's recursion (src/utils.py:145-153), chain r reading rows r, r+2, ... (chain 1 wraps round)
    scales = np.concatenate([np.full(n, s) for n, s in zip(sizes, (100.0, 8000.0, 5000.0))])
    hessians = labeled_hessians
    n, repeats, depth = len(LABELED), 2, 2
    chains = []
    for r in range(repeats):
        h = v.copy()
        for t in range(min(depth, -(-n // repeats))):
            h = v + 0.99 * h - hessians[(r + t * repeats) % n] @ h / scales
        chains.append(h)
    s_test = np.mean(chains, axis=0)
    # the pool: per image, its loss at its pseudo-boxes, jax.grad restricted to the three kernels
    g = {}
    for i in CANDIDATES:
        image, _ = image_and_label(data.train, i)
        out = jax.tree.map(lambda a: a[0], detector.apply(variables, image[None])["logits"])
        if int((dataclasses.replace(task, pseudo_score=threshold).pseudo_labels(out)["classes"] >= 0).sum()) > 0:
            g[i] = np.asarray(grad(theta, params, image, None))
    assert 0 < len(g) < len(CANDIDATES)  # the threshold leaves some images without a pseudo-box

    for name, s in (("isal", s_test), ("grad_sim", v)):
        ctx = context()
        selection = strategies.select(name, ctx, len(CANDIDATES))
        want = np.array([-(g[i] @ s) if i in g else np.nan for i in CANDIDATES])
        np.testing.assert_allclose(selection.scores, want, rtol=1e-9, equal_nan=True)
        scored = [p for p in np.argsort(want) if np.isfinite(want[p])]  # most negative first, then the rest
        assert list(selection.chosen[:len(scored)]) == scored
        assert selection.info["num_unscored"] == len(CANDIDATES) - len(g)
    assert selection.info["v_norm"] == pytest.approx(np.linalg.norm(v), rel=1e-9)


def test_per_tensor_lissa_reaches_the_dense_solve(world, labeled_hessians):
    """Full-set LiSSA with the three scales: each tensor's result over its scale is D^-1 (H + d D)^-1 D v."""
    context, detector, variables, data, task, _ = world
    params = variables["params"]
    rows = isal_lib.read_padded(data.train, LABELED)
    examples = (rows["images"], {k: rows[k] for k in ("boxes", "classes", "difficult")})
    h_mean = np.mean(labeled_hessians, 0)
    v_tree = influence_lib.select(params, isal_lib.last_convs)
    v_tree = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), v_tree)
    v = flat(v_tree)
    damping = 0.5  # the recursion contracts by about 1 - damping a step: 0.5^60 ~ 1e-18
    options = config_lib.SolverOptions(solver="lissa", params=isal_lib.last_convs, depth=60, repeats=1,
                                       damping=damping, batch_size=None)
    scale_fn = isal_lib.layer_scale((100.0, 8000.0, 5000.0))
    result = influence_lib.inverse_hvp(isal_lib.BoxLoss(detector, task), variables, examples, v_tree, options=options,
                                       rng=jax.random.PRNGKey(0), scale=scale_fn)
    sizes = [int(np.prod(k.shape)) for k in kernels(params)]
    d = np.concatenate([np.full(n, s) for n, s in zip(sizes, (100.0, 8000.0, 5000.0))])
    want = np.linalg.solve(h_mean + damping * np.diag(d), d * v) / d
    np.testing.assert_allclose(flat(result.solution), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_streamed_loader_lissa_equals_isals_recursion_and_the_solve_on_the_whole_set(world, labeled_hessians):
    """The labelled images read from disk one block of steps at a time (`LoaderRows`; blocks of 1 step, so
    chain 1's wrap-around to row 0 is in the second block, and depth 3 > the 2 steps that read the set once):
    ISAL's recursion on the dense per-image Hessians, and the solve on the set held whole (its norms too)."""
    _, detector, variables, data, task, _ = world
    params = variables["params"]
    v_tree = influence_lib.select(params, isal_lib.last_convs)
    v_tree = jax.tree.map(lambda x: jnp.sin(1.0 + jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), v_tree)
    v = flat(v_tree)
    scales = (100.0, 8000.0, 5000.0)
    options = config_lib.SolverOptions(solver="lissa", params=isal_lib.last_convs, depth=3, repeats=2,
                                       batch_size=1, order="loader", nan_reset=True)
    solve = functools.partial(influence_lib.inverse_hvp, isal_lib.BoxLoss(detector, task), variables, v=v_tree,
                              options=options, rng=jax.random.PRNGKey(0), scale=isal_lib.layer_scale(scales))
    streamed = solve(isal_lib.labelled_rows(data.train, LABELED), block_steps=1)
    rows = isal_lib.read_padded(data.train, LABELED)
    whole = solve((rows["images"], {k: rows[k] for k in ("boxes", "classes", "difficult")}))

    sizes = [int(np.prod(k.shape)) for k in kernels(params)]
    d = np.concatenate([np.full(n, s) for n, s in zip(sizes, scales)])
    chains = []
    for r in range(2):
        h = v.copy()
        for t in range(2):  # min(depth 3, ceil(3 / 2)) steps; chain 1 reads rows 1, then (1 + 2) % 3 = 0
            h = v + 0.99 * h - labeled_hessians[(r + t * 2) % 3] @ h / d
        chains.append(h)
    want = np.mean(chains, axis=0) / d
    np.testing.assert_allclose(flat(streamed.solution), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(flat(streamed.solution), flat(whole.solution), rtol=1e-12)
    assert streamed.info.keys() == whole.info.keys()
    for key, value in whole.info.items():
        assert streamed.info[key] == pytest.approx(value, rel=1e-12), key
    with pytest.raises(ValueError, match="--influence.order loader"):
        solve(isal_lib.labelled_rows(data.train, LABELED), options=dataclasses.replace(options, order="random"))


def test_loader_order_lissa_resets_a_nan_tensor_to_v():
    """Loader order with ISAL's NaN rule: a row whose product is NaN restarts the tensor from v (a loop)."""
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    data = np.array([1.0, np.nan, 3.0])  # the middle row's Hessian-vector product is NaN

    def example_loss(p, x):
        return 0.5 * x * (p["w"] @ a @ p["w"])

    params, v = {"w": jnp.array([0.3, -0.2])}, {"w": jnp.array([1.0, 2.0])}
    result = influence_lib.lissa(influence_lib.mean_loss(example_loss), params, jnp.asarray(data), v,
                                 rng=jax.random.PRNGKey(0), depth=5, repeats=1, damping=0.1, scale=10.0,
                                 batch_size=1, order="loader", nan_reset=True, check=False, return_diagnostics=True)
    h = np.array([1.0, 2.0])
    for t in range(3):  # min(depth 5, ceil(3 / 1)) steps: the set read once
        hv = data[t] * a @ h
        h = np.array([1.0, 2.0]) if np.isnan(hv).any() else np.array([1.0, 2.0]) + 0.9 * h - hv / 10.0
    np.testing.assert_allclose(np.asarray(result.inverse_hvp["w"]), h / 10.0, rtol=1e-12)
    assert int(result.nan_resets[0]) == 1


def test_ent_gn_equals_a_per_image_grad_loop_and_exp_gn(world):
    context, detector, variables, data, task, _ = world
    ctx = context()
    task = dataclasses.replace(task, top_k=20)
    ent = strategies.select("ent_gn", ctx, 2)
    exp = strategies.select("exp_gn", context(), 2)

    def entropy(p, image):
        return task.entropy(jax.tree.map(lambda a: a[0], detector.apply({"params": p}, image[None])["logits"]))

    grad = jax.jit(jax.grad(entropy))
    mask = traverse_util.flatten_dict(gradient_strategies.cls_branch(variables["params"]))
    want = []
    for i in CANDIDATES:
        g = traverse_util.flatten_dict(grad(variables["params"], image_and_label(data.train, i)[0]))
        want.append(sum(np.linalg.norm(np.asarray(g[k])) for k in g if mask[k]))  # layer_sum: per-tensor norms
    np.testing.assert_allclose(ent.scores, want, rtol=1e-9)
    np.testing.assert_allclose(exp.scores, ent.scores, rtol=1e-9)
    assert list(ent.chosen) == list(np.argsort(-np.array(want))[:2])


def isal_entropy(confidences, eps=1e-10):
    """hitl_mining_algorithm.py:85-93, torch -> NumPy."""
    c = np.asarray(confidences, np.float64).reshape(-1, 1)
    c = np.concatenate([1.0 - c, c], axis=1)
    return float(np.max(-np.sum(c * np.log(c + eps), axis=1)))


def isal_least_confidence(confidences):
    return float(np.max(-np.asarray(confidences, np.float64)))  # :68-74


def isal_margin(confidences):
    c = np.asarray(confidences, np.float64).reshape(-1, 1)  # :96-107
    c = -np.sort(-np.concatenate([1.0 - c, c], axis=1), axis=1)
    return float(np.max(c[:, 1] - c[:, 0]))


def test_uncertainty_miners_are_isals_on_hand_made_detections():
    scores = np.array([[0.9, 0.6, 0.3, 0.0], [0.55, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.99, 0.95, 0.0, 0.0]])
    valid = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool)
    for measure, reference in (("entropy", isal_entropy), ("least_confidence", isal_least_confidence),
                               ("margin", isal_margin)):
        values, scored = uncertainty.image_values(scores, valid, measure, "max")
        want = [reference(s[m]) if m.any() else np.nan for s, m in zip(scores, valid)]
        np.testing.assert_allclose(values, want, rtol=1e-12, equal_nan=True)
        assert list(scored) == [True, True, False, True]
        chosen = strategies.rank(values, scored, 4, np.random.default_rng(0), descending=True)
        assert list(chosen[:3]) == list(np.argsort(-np.nan_to_num(want, nan=-np.inf))[:3]) and chosen[3] == 2
    mean, _ = uncertainty.image_values(scores, valid, "least_confidence", "mean")
    total, _ = uncertainty.image_values(scores, valid, "least_confidence", "sum")
    np.testing.assert_allclose(mean[[0, 1, 3]], [-0.6, -0.55, -0.97], rtol=1e-12)
    np.testing.assert_allclose(total[[0, 1, 3]], [-1.8, -0.55, -1.94], rtol=1e-12)


def test_entropy_strategy_reads_the_detectors_post_nms_scores(world):
    context, detector, variables, data, _, _ = world
    selection = strategies.select("entropy", context(), 2)
    found = training.detect(detector, variables, data.train, CANDIDATES, 2)
    want = [isal_entropy(s[m]) if m.any() else np.nan for s, m in zip(found["scores"], found["valid"])]
    np.testing.assert_allclose(selection.scores, want, rtol=1e-12, equal_nan=True)


def test_coreset_is_greedy_k_center_on_the_pooled_tower_features(world):
    context, detector, variables, data, _, _ = world
    selection = strategies.select("coreset", context(), 2)

    def feats(indices):
        return np.stack([np.asarray(detector.apply(variables, image_and_label(data.train, i)[0][None])["features"][0])
                         for i in indices])

    pool, labeled = feats(CANDIDATES), feats(LABELED)
    dist = ((pool[:, None] - labeled[None]) ** 2).sum(-1).min(1)
    chosen = []
    for _ in range(2):
        j = int(np.argmax(np.where(np.isin(np.arange(len(pool)), chosen), -1, dist)))
        chosen.append(j)
        dist = np.minimum(dist, ((pool - pool[j]) ** 2).sum(-1))
    assert list(selection.chosen) == chosen


def isal_calculate_iou(ref_box, pred_box):
    """mining/utils/utils.py:51-74 on COCO [x, y, w, h] boxes, as written."""
    pred_box = [pred_box[0], pred_box[1] - pred_box[3], pred_box[0] + pred_box[2], pred_box[1]]
    ref_box = [ref_box[0], ref_box[1] - ref_box[3], ref_box[0] + ref_box[2], ref_box[1]]
    iw = np.maximum(min(pred_box[2], ref_box[2]) - max(pred_box[0], ref_box[0]) + 1., 0.)
    ih = np.maximum(min(pred_box[3], ref_box[3]) - max(pred_box[1], ref_box[1]) + 1., 0.)
    inters = iw * ih
    uni = ((pred_box[2] - pred_box[0] + 1.) * (pred_box[3] - pred_box[1] + 1.)
           + (ref_box[2] - ref_box[0] + 1.) * (ref_box[3] - ref_box[1] + 1.) - inters)
    return inters / uni


def isal_stability(ref_boxes, ref_scores, levels):
    """localization_based_mining_algorithm.py:67-87 (`value`), levels = per noise level a list of boxes."""
    image_score, score_sum = 0, 0
    for ref_bbox, score in zip(ref_boxes, ref_scores):
        average_iou = 0
        for preds in levels:
            if len(preds) == 0:
                continue
            average_iou += max([isal_calculate_iou(p, ref_bbox) for p in preds])
        average_iou /= len(levels)
        image_score += average_iou * score
        score_sum += score
    return image_score / score_sum


def test_localization_stability_is_isals_on_hand_made_boxes():
    # ISAL's calculate_iou turns [x, y, w, h] into [x, y - h, x + w, y]: for COCO's y (the TOP edge) that is
    # each box mirrored about its top edge, which changes the IoU of boxes of different heights. jaxal
    # computes the true IoU (Kao et al.'s definition), so the transcription is given y = the bottom edge.
    xywh = lambda b: [b[0], b[3], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    ref = {"boxes": np.array([[[10, 10, 40, 30], [50, 5, 60, 25], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 3,
                              [[5, 5, 20, 20], [0, 0, 0, 0], [0, 0, 0, 0]]], float),
           "scores": np.array([[0.9, 0.3, 0], [0, 0, 0], [0.6, 0, 0]]),
           "valid": np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], bool)}
    level1 = {"boxes": np.array([[[12, 9, 41, 33], [48, 6, 61, 20], [11, 11, 38, 29]], [[1, 1, 9, 9]] * 3,
                                 [[0, 0, 0, 0]] * 3], float),
              "valid": np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)}
    level2 = {"boxes": np.array([[[30, 20, 70, 40], [0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 3,
                                 [[6, 4, 22, 19], [2, 2, 30, 30], [0, 0, 0, 0]]], float),
              "valid": np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)}
    values, scored = stability.stability(ref, [level1, level2])
    for i in (0, 2):
        m = ref["valid"][i]
        want = isal_stability([xywh(b) for b in ref["boxes"][i][m]], ref["scores"][i][m],
                              [[xywh(b) for b in lv["boxes"][i][lv["valid"][i]]] for lv in (level1, level2)])
        assert values[i] == pytest.approx(want, rel=1e-12)
    assert list(scored) == [True, False, True] and np.isnan(values[1])


def test_localization_stability_under_a_faint_noise_is_near_one(world):
    context, *_ = world
    selection = strategies.select("localization_stability", context(stability_noise=(1e-4,)), 3)
    scored = np.isfinite(selection.scores)
    assert scored.any() and np.all(selection.scores[scored] > 0.9) and np.all(selection.scores[scored] <= 1 + 1e-12)
    assert selection.info["num_unscored"] == int((~scored).sum())


@pytest.mark.parametrize("field,value", [("pseudo_score", 1.5), ("isal_scales", (1.0, 2.0)), ("reduction", "median"),
                                         ("gn_params", "head"), ("s_test_images", 0), ("top_k", 0),
                                         ("stability_noise", (0.1, -1.0))])
def test_bad_options_are_refused_before_the_run(field, value):
    config = config_lib.build_config("bccd_fcos", boxal={field: value})
    with pytest.raises(ValueError, match=f"--boxal.{field}"):
        strategies.check_options(config)
    damping = config_lib.build_config("bccd_fcos", strategy="isal", influence=dict(damping=1.5))
    with pytest.raises(ValueError, match="--influence.damping"):
        strategies.check_options(damping)


def test_the_solve_reads_the_first_images_in_loader_order_or_the_papers_random_sample(world):
    context, *_ = world
    assert list(isal_lib.solve_images(context(), repeats=2, depth=1)) == [0, 1]  # repeats x depth, in order
    sample = isal_lib.solve_images(context(s_test_max_labeled=2), repeats=4, depth=10)
    assert len(sample) == 2 and set(sample) <= set(LABELED) and list(sample) == sorted(sample)
