"""Scale-out: every strategy scores and selects on an 8-device mesh exactly what it does on one device,
a data-parallel training step equals the single-device step (BatchNorm statistics included), pools
that do not divide by the device count never select padding, and two processes (gloo collectives on
127.0.0.1, 2 fake CPU devices each) select what one process with 4 devices selects."""

import dataclasses
import json
import subprocess
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import processes  # tests/processes.py: the multi-process helpers

from jaxal import influence, parallel
from jaxal.config import build_config
from jaxal.data import load_dataset
from jaxal.tasks import Classification
from jaxal.models import LossNet, ModelOutput, create_model
from jaxal.strategies import STRATEGIES, StrategyContext, get_strategy, top_k
from jaxal.strategies import bald, baselines, gradient, isal, ll4al
from jaxal.train import TrainOptions, create_train_state, epoch_batches, model_variables, train_model, train_step

MESH = parallel.make_mesh(8)
BUDGET = 6
SCORERS = {"entropy": baselines.entropy_scores, "margin": baselines.margin_scores,
           "least_confidence": baselines.least_confidence_scores, "exp_gn": gradient.exp_gn_scores,
           "ent_gn": gradient.ent_gn_scores, "egl": gradient.egl_scores, "lplgrad": gradient.lplgrad_scores,
           "bald": bald.bald, "ll4al": ll4al.ll4al, "isal": isal.isal_scores, "grad_sim": isal.grad_sim_scores}
SELECTORS = ("coreset", "badge", "random")


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data.normalization(data.x_train), jnp.asarray(data.y_train)  # model inputs, as before uint8 storage


@pytest.fixture(scope="module")
def trained(digits):
    """A CNN with dropout and a LossNet, trained for two epochs on 64 digits (single device)."""
    images, labels = digits
    model, lossnet, options = create_model("cnn", 10, 0.25), LossNet(16), TrainOptions()
    state = create_train_state(model, lossnet, jax.random.key(0), images.shape[1:], options)
    state, _ = train_model(state, images, labels, np.arange(64), model=model, lossnet=lossnet, options=options,
                           epochs=2, batch_size=32, lr=0.05, lr_milestones=(), lr_gamma=0.1, detach_epoch=100, seed=0)
    return model, lossnet, state


def context(digits, trained, mesh, pool_size=37):
    """37 candidates: 3 chunks of 16, the last one padded (to 16, a multiple of 8 devices)."""
    images, labels = digits
    model, lossnet, state = trained
    config = build_config(eval_batch_size=16, bald_samples=4, gradnorm=dict(chunk_size=16),
                          influence=dict(depth=10, repeats=2, batch_size=8, chunk_size=16))
    return StrategyContext(model=model, variables=model_variables(state), pool_x=images[100:100 + pool_size],
                           labeled_x=images[:64], labeled_y=labels[:64], num_classes=10, config=config,
                           rng=jax.random.key(1), lossnet=lossnet, lossnet_params=state.params["lossnet"],
                           reference_sets={"val": (images[64:74], labels[64:74]),
                                           "labeled": (images[:64], labels[:64])}, mesh=mesh)


# Trained per cycle (VAE, GCN, committee): compared on 1 and 8 devices in tests/test_wang_baselines_loop.py.
COVERED_ELSEWHERE = {"vaal", "sraal", "coregcn", "uncertaingcn", "qbc"}


def test_every_strategy_is_covered():
    # isal_v2 and isal_v3 differ from isal only in the reference set R.
    assert set(SCORERS) | set(SELECTORS) | COVERED_ELSEWHERE >= set(STRATEGIES) - {"isal_v2", "isal_v3"}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_and_selections_on_8_devices_equal_one_device(digits, trained, name):
    one, eight = context(digits, trained, None), context(digits, trained, MESH)
    scores_one, info_one = SCORERS[name](one)
    scores_eight, info_eight = SCORERS[name](eight)
    assert scores_eight.shape == (37,)
    np.testing.assert_allclose(np.asarray(scores_eight), np.asarray(scores_one), rtol=2e-4, atol=1e-6)
    if info_one and "cosine_s_test_v" in info_one:
        assert info_eight["cosine_s_test_v"] == pytest.approx(info_one["cosine_s_test_v"], abs=1e-4)
    assert top_k(scores_eight, BUDGET).tolist() == top_k(scores_one, BUDGET).tolist()  # what `select` does


@pytest.mark.parametrize("name", SELECTORS)
def test_set_selections_on_8_devices_equal_one_device(digits, trained, name):
    one, eight = context(digits, trained, None), context(digits, trained, MESH)
    assert _chosen(get_strategy(name).select(eight, BUDGET)) == _chosen(get_strategy(name).select(one, BUDGET))


def _chosen(selection):
    return np.asarray(selection.chosen).tolist()


# ---- padding: 13 candidates on 8 devices --------------------------------------------------------------


class LogitsAreInputs(nn.Module):
    """A 'model' whose logits and features are its inputs: hand-made predictions."""

    @nn.compact
    def __call__(self, x, train=False, mc_dropout=False):
        logits = x.reshape((x.shape[0], -1))
        return ModelOutput(logits, logits, (logits,))


@pytest.mark.parametrize("name", ["entropy", "margin", "least_confidence", "coreset", "badge"])
def test_a_pool_of_13_on_8_devices_never_selects_padding(name):
    # The last candidate is the most uncertain (uniform) and the farthest (coreset, BADGE's largest
    # gradient embedding): the padding repeats it, so counted padding would be selected next.
    logits = np.random.default_rng(0).normal(size=(13, 4)).astype(np.float32) * 3
    logits[-1] = [0.0, 0.0, 0.0, 0.1] if name != "coreset" else [40.0, 40.0, 40.0, 40.0]
    ctx = StrategyContext(model=LogitsAreInputs(), variables={"params": {}}, pool_x=jnp.asarray(logits),
                          labeled_x=jnp.asarray(logits[:2] * 0.5), labeled_y=jnp.zeros(2, jnp.int32), num_classes=4,
                          config=build_config(eval_batch_size=5), rng=jax.random.key(0), mesh=MESH)
    strategy = get_strategy(name)
    if name != "badge":  # BADGE's first pick is the largest embedding norm, not a row chosen here
        assert _chosen(strategy.select(ctx, 2))[0] == 12
    everything = _chosen(strategy.select(ctx, 13))
    assert sorted(everything) == list(range(13))
    assert everything == _chosen(strategy.select(dataclasses.replace(ctx, mesh=None), 13))


def test_map_chunks_drops_padding_and_returns_local_arrays():
    out = parallel.map_chunks(lambda static, consts, chunk: chunk * consts, None, jnp.float32(2.0),
                              jnp.arange(13.0), chunk_size=5, mesh=MESH)  # chunks of 8: 13 = 8 + 5 + 3 padding
    np.testing.assert_array_equal(out, 2.0 * np.arange(13.0))
    assert len(out.sharding.device_set) == 1
    total = parallel.sum_chunks(lambda static, consts, chunk: jnp.sum(chunk[0] * chunk[1]), None, None,
                                jnp.arange(13.0), chunk_size=5, mesh=MESH)
    assert float(total) == float(np.sum(np.arange(13.0)))


def test_sharded_scoring_never_gathers_the_pool(trained):
    """Each device scores its own part of a chunk: the compiled program gathers only the scores."""
    model, _, state = trained
    static = (model, Classification(10), "ent_gn", "layer_sum", "all", "ghost", None)
    chunk = parallel.shard_batch(jnp.zeros((32, 8, 8, 1)), MESH)
    variables = parallel.replicate(model_variables(state), MESH)
    hlo = parallel._compiled(gradient._query_norms, parallel.replicated(MESH)).lower(static, variables, chunk)
    gathers = [line for line in hlo.compile().as_text().splitlines() if "all-gather(" in line]
    assert gathers and not [line for line in gathers if "f32[32,8,8,1]" in line]


# ---- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_lossnet", [False, True])
def test_a_data_parallel_step_equals_the_single_device_step(digits, with_lossnet):
    images, labels = digits
    model, options = create_model("cnn", 10, 0.25), TrainOptions(augmentation="crop_flip", crop_padding=1)
    lossnet = LossNet(16) if with_lossnet else None
    batch = np.arange(3, 35, dtype=np.int32)  # 32 examples: 4 per device
    lr = {"model": jnp.float32(0.1), "lossnet": jnp.float32(0.1)}
    args = (images[batch], labels[batch], jax.random.key(5), lr, jnp.asarray(False))

    def fresh():
        return create_train_state(model, lossnet, jax.random.key(0), images.shape[1:], options)

    one, metrics_one = train_step(fresh(), *args, model=model, lossnet=lossnet, options=options)
    state, *placed = parallel.replicate((fresh(), *args), MESH)
    eight, metrics_eight = train_step(state, *placed, model=model, lossnet=lossnet, options=options, mesh=MESH)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(eight))
    # Parameters, momentum and the BatchNorm running statistics: BatchNorm over the global batch (per-device
    # statistics of 4 examples would be far off).
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert float(metrics_eight["loss"]) == pytest.approx(float(metrics_one["loss"]), rel=1e-5)
    hlo = train_step.lower(state, *placed, model=model, lossnet=lossnet, options=options, mesh=MESH).compile().as_text()
    assert "all-reduce" in hlo  # the gradients (and batch statistics) are reduced across devices


def test_batches_round_up_to_the_device_count():
    batches = epoch_batches(np.random.default_rng(0), np.arange(30), 32, multiple=8)
    assert batches.shape == (1, 32) and set(batches.ravel()) == set(range(30))
    batches = epoch_batches(np.random.default_rng(0), np.arange(100), 30, multiple=8)
    assert batches.shape == (4, 32) and set(batches.ravel()) == set(range(100))


# ---- several processes ---------------------------------------------------------------------------------

CLI = ["--initial_size", "30", "--budget", "10", "--cycles", "2", "--epochs", "2", "--strategy", "exp_gn,badge",
       "--progress", "false"]


def launch(args, devices: int) -> subprocess.Popen:
    return processes.launch(["-m", "jaxal.run", *CLI, *args], devices)


def selections(workdir: Path) -> list:
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    return [(r["strategy"], r["cycle"], r["selected"], round(r["test_accuracy"], 4)) for r in records]


def test_two_processes_select_what_one_process_with_4_devices_selects(tmp_path):
    port = processes.free_port()
    pair = [launch(["--workdir", str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}",
                    "--num_processes", "2", "--process_id", str(i)], devices=2) for i in range(2)]
    first, second = processes.finish(pair)
    (single,) = processes.finish([launch(["--workdir", str(tmp_path / "one")], devices=4)])
    assert "4 cpu devices, mesh (data=4), 2 process(es)" in first and "jaxal:" not in second
    assert "4 cpu devices, mesh (data=4), 1 process" in single
    assert selections(tmp_path / "two") == selections(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["num_devices"] == 4


# ---- LiSSA's chains split over the devices ----------------------------------------------------------


def lissa_problem():
    """Softmax regression on 40 examples (float64): LiSSA's chains differ only by their minibatches."""
    rng = np.random.default_rng(0)
    xs, ys = jnp.asarray(rng.normal(size=(40, 5))), jnp.asarray(rng.integers(0, 3, 40))
    params = {"w": jnp.asarray(0.5 * rng.normal(size=(5, 3))), "b": jnp.asarray(0.1 * rng.normal(size=3))}
    v = {"w": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.asarray(rng.normal(size=3))}

    def example_loss(p, example):
        x, y = example
        return jax.nn.logsumexp(x @ p["w"] + p["b"]) - (x @ p["w"] + p["b"])[y]

    return influence.mean_loss(example_loss), params, (xs, ys), v


@pytest.mark.parametrize("repeats,batch_size", [(8, 1), (3, 2), (3, 16), (2, None)])
def test_lissa_on_8_devices_equals_one_device(repeats, batch_size):
    """Chains split over the devices (8 chains; 3 chains padded to 8, the extras left out), minibatches
    split (3 chains of 16 rows), one full-batch chain with its chunks split: the 1-device result."""
    with jax.enable_x64(True):
        loss, params, data, v = lissa_problem()
        kwargs = dict(rng=jax.random.key(2), depth=25, repeats=repeats, damping=0.05, scale=20.0,
                      batch_size=batch_size, chunk_size=8, return_diagnostics=True)
        one = influence.lissa(loss, params, data, v, **kwargs)
        eight = influence.lissa(loss, params, data, v, mesh=MESH, **kwargs)
        flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])  # noqa: E731
        np.testing.assert_allclose(flat(eight.inverse_hvp), flat(one.inverse_hvp), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(eight.norms), np.asarray(one.norms), rtol=1e-12)
        assert eight.norms.shape == (repeats, 26)
        assert influence.chains_split_over_devices(MESH, repeats, batch_size) == (batch_size in (1, 2))


def test_lissa_chains_are_split_not_repeated_on_every_device():
    """XLA's flop count of one device's compiled program: 8 chains on 8 devices cost each device about
    one chain (1/8 of the single-device program, plus the reduction), not the 8 chains again."""
    loss, params, data, v = lissa_problem()

    def flops(mesh):
        placed = parallel.replicate((params, data, v, jax.random.key(0)), mesh)
        compiled = influence._lissa_jit.lower(loss, *placed, 0.05, 20.0, 0.0, depth=10, repeats=8, batch_size=1,
                                              mesh=mesh).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops(MESH) < 0.3 * flops(None)
