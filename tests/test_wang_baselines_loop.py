"""VAAL, SRAAL, CoreGCN, UncertainGCN and QBC in the loop: an end-to-end run on digits, resumed after a
kill in each strategy equal to the uninterrupted run (their VAE, discriminator, GCN and committee are
rebuilt from the cycle's key, nothing extra is checkpointed), the same selections on 1 and 8 devices, the
loop's initial-set hook, and bad settings refused before the run starts."""

import json

import jax
import numpy as np
import pytest

from jaxal import loop, parallel
from jaxal.config import build_config
from jaxal.data import load_dataset
from jaxal.models import adapt, create_model
from jaxal.strategies import STRATEGIES, StrategyContext, get_strategy
from jaxal.strategies.base import Selection, register_selector
from jaxal.train import TrainOptions, create_train_state, model_variables, train_model

from conftest import SMALL_STRATEGY_NETWORKS, comparable  # tests/conftest.py

NAMES = ("vaal", "sraal", "coregcn", "uncertaingcn", "qbc")

# The shapes the strategy-level tests below compile for (batches of 16, a 512-node graph), so the loop reuses them.
TINY = dict(initial_size=30, budget=10, cycles=3, epochs=2, batch_size=16, eval_batch_size=16, subset_size=200,
            progress=False, **SMALL_STRATEGY_NETWORKS)


def quiet(*_):
    pass


def run(tmp_path, name, **overrides):
    return loop.run_experiment(build_config(**{**TINY, **overrides}), workdir=tmp_path / name, log=quiet)


@pytest.fixture(scope="module")
def trained_context():
    data = load_dataset("digits")
    model = adapt(create_model("cnn", 10), data.normalization)
    options = TrainOptions()
    state = create_train_state(model, None, jax.random.key(0), data.image_shape, options)
    state, _ = train_model(state, data.x_train, data.y_train, np.arange(64), model=model, lossnet=None,
                           options=options, epochs=2, batch_size=32, lr=0.05, lr_milestones=(), lr_gamma=0.1,
                           detach_epoch=100, seed=0)
    config = build_config(epochs=2, batch_size=16, eval_batch_size=16, **SMALL_STRATEGY_NETWORKS)
    return StrategyContext(model=model, variables=model_variables(state), pool_x=data.x_train[100:137],
                           labeled_x=data.x_train[:64], labeled_y=data.y_train[:64], num_classes=10, config=config,
                           rng=jax.random.key(1))


@pytest.mark.parametrize("name", NAMES)
def test_selections_on_8_devices_equal_one_device(trained_context, name):
    """37 candidates (the last chunk and the graph padded), the VAE, GCN and committee trained data
    parallel on 8 devices: the same picks as on one device."""
    import dataclasses

    one = get_strategy(name).select(trained_context, 6)
    eight = get_strategy(name).select(dataclasses.replace(trained_context, mesh=parallel.make_mesh(8)), 6)
    assert eight.chosen.tolist() == one.chosen.tolist()


def test_end_to_end_and_resumed_after_a_kill_in_each_strategy(tmp_path, monkeypatch):
    strategy = ",".join(NAMES)
    whole = run(tmp_path, "whole", strategy=strategy)
    assert [(r["strategy"], r["cycle"]) for r in whole] == [(s, c) for s in NAMES for c in range(3)]
    for r in whole:
        assert r["num_labeled"] == 30 + 10 * r["cycle"] and 0.0 <= r["test_accuracy"] <= 1.0
        if r["cycle"] < 2:
            assert len(set(r["selected"])) == 10 and r["num_scored"] == 200
    infos = {r["strategy"]: r.get("strategy_info") for r in whole if r["cycle"] == 0}
    assert infos["vaal"]["vae_iterations"] == 3 and 0.0 < infos["sraal"]["mean_indicator"] < 1.0
    assert set(infos["coregcn"]) == {"gcn_labeled_recognised", "gcn_unlabeled_recognised"}

    real_run_cycle, killed = loop.run_cycle, set()

    def killed_once_in_cycle_2(exp, strategy, trial_key, cycle, *args):
        if cycle == 2 and strategy.name not in killed:
            killed.add(strategy.name)
            raise KeyboardInterrupt  # the process dies before finishing cycle 2 of this strategy
        return real_run_cycle(exp, strategy, trial_key, cycle, *args)

    monkeypatch.setattr(loop, "run_cycle", killed_once_in_cycle_2)
    for name in NAMES:
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, "resumed", strategy=strategy)
        assert name in killed
    resumed = run(tmp_path, "resumed", strategy=strategy)
    assert comparable(resumed) == comparable(whole)
    lines = (tmp_path / "resumed" / "results.jsonl").read_text().splitlines()
    assert comparable([json.loads(line) for line in lines]) == comparable(whole)


def test_the_loop_uses_a_strategys_initial_set(tmp_path):
    """The hook replaces the trial's random initial set (the cycle-0 model trains on it)."""
    chosen = np.arange(100, 120)
    register_selector("test_initial_hook", initial_set=lambda config, images, model, mesh, key, labeled, val: chosen)(
        lambda ctx, k: Selection(np.arange(k)))
    trained_on = []
    try:
        loop.run_experiment(build_config(strategy="test_initial_hook", initial_size=25, val_size=5, cycles=2,
                                         epochs=1, progress=False),
                            workdir=tmp_path / "hook", log=quiet,
                            observer=lambda exp, cycle, state, labeled, record, candidates: trained_on.append(labeled))
    finally:
        del STRATEGIES["test_initial_hook"]
    np.testing.assert_array_equal(trained_on[0], chosen)
    assert len(trained_on[1]) == 20 + 50


@pytest.mark.parametrize("overrides,message", [
    (dict(strategy="vaal", vaal=dict(kl_reduction="mean")), "vaal: unknown --vaal.kl_reduction"),
    (dict(strategy="sraal", sraal=dict(latent_dim=7)), "sraal: --sraal.latent_dim must be even"),
    (dict(strategy="sraal", sraal=dict(initial="coreset")), "unknown --sraal.initial"),
    (dict(strategy="vaal", vaal=dict(selection_batch_norm="eval")), "unknown --vaal.selection_batch_norm"),
    (dict(strategy="coregcn", gcn=dict(dropout=1.0)), "coregcn: --gcn.dropout must be in"),
    (dict(strategy="qbc", qbc=dict(members=1)), "qbc: --qbc.members must be at least 2"),
])
def test_bad_settings_are_refused_before_the_run(tmp_path, overrides, message):
    with pytest.raises(loop.RunError, match=message):
        loop.prepare(build_config(**overrides), tmp_path / "never")
    assert not (tmp_path / "never").exists()
