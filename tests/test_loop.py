"""The active-learning loop: set bookkeeping, determinism, kill-and-resume, and the baselines."""

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxal import loop
from jaxal import results as loop_results
from jaxal.config import build_config
from jaxal.models import ModelOutput
from jaxal.strategies import STRATEGIES, StrategyContext, get_strategy
from jaxal.strategies.baselines import greedy_k_center, min_squared_distances
from jaxal.train import model_variables

from conftest import comparable  # tests/conftest.py

TINY = dict(initial_size=30, budget=10, cycles=3, epochs=2, batch_size=16, progress=False)


def quiet(*_):
    pass


# ---- bookkeeping -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(pool=st.integers(20, 400), initial=st.integers(2, 20), val=st.integers(0, 5), budget=st.integers(1, 10),
       cycles=st.integers(1, 6), subset=st.one_of(st.none(), st.integers(10, 50)), seed=st.integers(0, 2**16))
def test_labeled_and_unlabeled_sets_stay_disjoint_and_exact(pool, initial, val, budget, cycles, subset, seed):
    val = min(val, initial - 1)
    if subset is not None:
        subset = max(subset, budget)
    if initial + budget * cycles > pool:
        return
    config = build_config(initial_size=initial, val_size=val, budget=budget, subset_size=subset, seed=seed)
    labeled, held_out = loop.initial_split(config, trial=0, pool_size=pool)
    assert len(labeled) == initial - val and len(held_out) == val
    assert not np.intersect1d(labeled, held_out).size
    rng = np.random.default_rng(seed)
    for _ in range(cycles):
        candidates = loop.candidate_pool(pool, labeled, held_out, subset, rng)
        assert not np.intersect1d(candidates, np.concatenate([labeled, held_out])).size
        expected = pool - len(labeled) - val
        assert len(candidates) == (expected if subset is None else min(subset, expected))
        chosen = rng.choice(len(candidates), budget, replace=False)
        before = len(labeled)
        labeled, selected = loop.add_selection(labeled, candidates, chosen, budget, "test")
        assert len(labeled) == before + budget == len(np.unique(labeled))
        assert not np.intersect1d(labeled, held_out).size
        assert set(selected) <= set(candidates)


def test_add_selection_rejects_duplicates_and_out_of_range():
    candidates = np.arange(10, 20)
    with pytest.raises(RuntimeError, match="distinct"):
        loop.add_selection(np.arange(5), candidates, np.array([1, 1]), 2, "bad")
    with pytest.raises(RuntimeError, match="distinct"):
        loop.add_selection(np.arange(5), candidates, np.array([1, 10]), 2, "bad")


# ---- baselines on hand-made inputs ---------------------------------------------------------------


class LogitsAreInputs(nn.Module):
    """A 'model' whose logits are its inputs, so strategies can be fed hand-made predictions."""

    @nn.compact
    def __call__(self, x, train=False, mc_dropout=False):
        logits = x.reshape((x.shape[0], -1))
        return ModelOutput(logits, logits, (logits,))


def context_for_logits(logits, labeled_logits=None, seed=0):
    logits = jnp.asarray(logits, jnp.float32)
    labeled = logits[:0] if labeled_logits is None else jnp.asarray(labeled_logits, jnp.float32)
    return StrategyContext(model=LogitsAreInputs(), variables={"params": {}}, pool_x=logits, labeled_x=labeled,
                           labeled_y=jnp.zeros(labeled.shape[0], jnp.int32), num_classes=logits.shape[1],
                           config=build_config(), rng=jax.random.key(seed))


def test_uncertainty_baselines_rank_hand_made_predictions():
    uniform, confident, two_way = [0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [5.0, 5.0, -10.0]
    ctx = context_for_logits([confident, uniform, two_way])
    assert list(get_strategy("entropy").select(ctx, 3).chosen) == [1, 2, 0]
    assert list(get_strategy("least_confidence").select(ctx, 3).chosen) == [1, 2, 0]
    # margin: uniform and two-way both have a zero top-2 gap; the confident one is last
    assert get_strategy("margin").select(ctx, 3).chosen[-1] == 0
    assert set(get_strategy("margin").select(ctx, 2).chosen) == {1, 2}


def test_random_baseline_depends_only_on_its_key():
    ctx = context_for_logits(np.zeros((50, 3)))
    a = get_strategy("random").select(ctx, 10).chosen
    assert np.array_equal(a, get_strategy("random").select(ctx, 10).chosen)
    assert not np.array_equal(a, get_strategy("random").select(context_for_logits(np.zeros((50, 3)), seed=1), 10).chosen)


def brute_force_greedy_k_center(pool, labeled, k):
    """Greedy k-center with the full distance matrix, in float64."""
    everything = np.concatenate([labeled, pool]).astype(np.float64)
    dist = ((everything[:, None] - everything[None]) ** 2).sum(-1)
    centers = list(range(len(labeled)))
    chosen = []
    for _ in range(k):
        nearest = dist[:, centers].min(1) if centers else np.full(len(everything), np.inf)
        nearest[centers] = -1
        pick = int(np.argmax(nearest))
        centers.append(pick)
        chosen.append(pick - len(labeled))
    return chosen


def covering_radius(points, centers):
    return np.sqrt(((points[:, None] - points[centers][None]) ** 2).sum(-1).min(1).max())


@pytest.mark.parametrize("num_labeled", [0, 7])
def test_coreset_equals_brute_force_k_center(num_labeled):
    rng = np.random.default_rng(0)
    pool, labeled = rng.normal(size=(60, 5)), rng.normal(size=(num_labeled, 5))
    got = np.asarray(greedy_k_center(jnp.asarray(pool, jnp.float32), jnp.asarray(labeled, jnp.float32), 8))
    assert got.tolist() == brute_force_greedy_k_center(pool, labeled, 8)
    ctx = context_for_logits(pool, labeled)
    assert get_strategy("coreset").select(ctx, 8).chosen.tolist() == got.tolist()


def test_coreset_is_a_two_approximation_of_the_optimal_k_center():
    points = np.random.default_rng(1).normal(size=(11, 2))
    k = 3
    optimal = min(covering_radius(points, list(c)) for c in itertools.combinations(range(len(points)), k))
    greedy = np.asarray(greedy_k_center(jnp.asarray(points, jnp.float32), jnp.zeros((0, 2)), k))
    assert covering_radius(points, greedy) <= 2 * optimal + 1e-6


def test_chunked_min_distances_equal_dense():
    rng = np.random.default_rng(2)
    points, centers = rng.normal(size=(40, 6)), rng.normal(size=(37, 6))
    dense = ((points[:, None] - centers[None]) ** 2).sum(-1).min(1)
    with jax.default_matmul_precision("highest"):
        chunked = min_squared_distances(jnp.asarray(points, jnp.float32), jnp.asarray(centers, jnp.float32), 8)
    np.testing.assert_allclose(chunked, dense, rtol=1e-4, atol=1e-4)


# ---- whole runs ----------------------------------------------------------------------------------


def run(tmp_path, name, **overrides):
    config = build_config(**{**TINY, **overrides})
    return loop.run_experiment(config, workdir=tmp_path / name, log=quiet)


def test_records_and_outputs_of_a_run(tmp_path):
    recomputed = {}

    def observer(exp, cycle, state, labeled, record, candidates):  # the test accuracy, by NumPy from the logits
        logits = np.asarray(exp.model.apply(model_variables(state), exp.dataset.x_test, train=False).logits)
        correct = int(np.sum(logits.argmax(-1) == exp.dataset.y_test))
        recomputed[record["strategy"], cycle] = correct / len(exp.dataset.y_test)

    config = build_config(**{**TINY, "strategy": "entropy,coreset", "val_size": 5})
    records = loop.run_experiment(config, workdir=tmp_path / "run", log=quiet, observer=observer)
    assert len(records) == 2 * TINY["cycles"]
    for strategy in ("entropy", "coreset"):
        mine = [r for r in records if r["strategy"] == strategy]
        assert [r["num_labeled"] for r in mine] == [30, 40, 50]
        selected = [i for r in mine for i in r["selected"]]
        assert len(selected) == len(set(selected)) == 20
        for r in mine:
            assert r["test_accuracy"] == pytest.approx(recomputed[strategy, r["cycle"]], abs=1e-12)
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert (tmp_path / "run" / "results.csv").read_text().count("\n") == 1 + len(records)
    assert (tmp_path / "run" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "cnn"


def test_curve_table_of_hand_made_records():
    def record(strategy, trial, labeled, miou, scored, seconds):
        return dict(strategy=strategy, trial=trial, num_labeled=labeled, test_miou=miou, num_scored=scored,
                    selection_seconds=seconds)

    records = [record("random", 0, 10, 0.30, 0, 0.0), record("random", 1, 10, 0.50, 0, 0.0),
               record("random", 0, 20, 0.60, 8, 1.0), record("random", 1, 20, 0.60, 8, 3.0),
               record("ent_gn", 0, 10, 0.25, 8, 7.0)]
    assert loop_results.curve_table(records, "miou", ("ent_gn",)) == (
        "| strategy | 10 labelled | 20 labelled | selection s/cycle |\n"
        "|---|---|---|---|\n"
        "| ent_gn | 25.0 +- 0.0 |  | 7.0 |\n"
        "| random | 40.0 +- 10.0 | 60.0 +- 0.0 | 2.0 |\n"
        "\nTest mIoU (%) over 2 trial(s): mean +- standard deviation.\n")


def test_same_seed_same_selections_other_seed_other_selections(tmp_path):
    a = run(tmp_path, "a", strategy="entropy", cycles=2)
    b = run(tmp_path, "b", strategy="entropy", cycles=2)
    c = run(tmp_path, "c", strategy="entropy", cycles=2, seed=1)
    assert a[0]["selected"] == b[0]["selected"] and a[0]["test_accuracy"] == b[0]["test_accuracy"]
    assert a[0]["selected"] != c[0]["selected"]


@pytest.mark.parametrize("warm_start", [False, True])
def test_kill_and_resume_gives_the_uninterrupted_results(tmp_path, monkeypatch, warm_start):
    # BADGE draws from the strategy key: the resumed cycles must draw what the uninterrupted ones drew.
    settings_ = dict(strategy="badge", trials=2, warm_start=warm_start)
    uninterrupted = run(tmp_path, "whole", **settings_)

    real_run_cycle = loop.run_cycle

    def killed_in_cycle_2(exp, strategy, trial_key, cycle, *args):
        if cycle == 2:
            raise KeyboardInterrupt  # the process dies before finishing cycle 2 of trial 0
        return real_run_cycle(exp, strategy, trial_key, cycle, *args)

    monkeypatch.setattr(loop, "run_cycle", killed_in_cycle_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", **settings_)
    partial = [json.loads(line) for line in (tmp_path / "resumed" / "results.jsonl").read_text().splitlines()]
    assert [r["cycle"] for r in partial] == [0, 1]

    monkeypatch.setattr(loop, "run_cycle", real_run_cycle)
    resumed = run(tmp_path, "resumed", **settings_)
    assert comparable(resumed) == comparable(uninterrupted)
    # The finished cycles were not run again.
    assert [r["train_seconds"] for r in resumed[:2]] == [r["train_seconds"] for r in partial]


def test_stop_at_metric_ends_a_trial_at_the_first_cycle_that_reaches_it(tmp_path):
    whole = run(tmp_path, "whole", strategy="entropy")
    target = whole[1]["test_accuracy"]  # reached at cycle 1 (and perhaps at 0 already)
    first = next(c for c, r in enumerate(whole) if r["test_accuracy"] >= target)
    stopped = run(tmp_path, "stopped", strategy="entropy", stop_at_metric=target)
    assert comparable(stopped[:first]) == comparable(whole[:first]) and len(stopped) == first + 1
    assert stopped[-1]["test_accuracy"] == whole[first]["test_accuracy"] and stopped[-1]["selected"] == []
    assert run(tmp_path, "stopped", strategy="entropy", stop_at_metric=target) == stopped  # resumed: finished


def test_diverging_training_stops_with_a_clear_error():
    from jaxal.models import create_model
    from jaxal.train import TrainOptions, create_train_state, train_model

    model = create_model("mlp", 3)
    state = create_train_state(model, None, jax.random.key(0), (2, 2, 1), TrainOptions())
    images, labels = jnp.ones((8, 2, 2, 1)), jnp.zeros(8, jnp.int32)
    with pytest.raises(FloatingPointError, match="training diverged: the mean loss of epoch 0 is nan"):
        train_model(state, images, labels, np.arange(8), model=model, lossnet=None, options=TrainOptions(),
                    epochs=2, batch_size=4, lr=float("nan"), lr_milestones=(), lr_gamma=0.1, detach_epoch=0, seed=0)


def test_every_strategy_runs_two_cycles_of_the_default_run(tmp_path):
    """Every registered strategy on the default preset as a user first meets it (`python -m jaxal.run
    --strategy S`: digits_quick, its own networks at the preset's digits sizes, not shrunk for the test),
    one epoch per cycle so that the suite can afford it: each picks a new batch of distinct unlabelled
    samples after cycle 0. experiments/time_default_strategies.py times the whole 6-cycle runs."""
    names = list(STRATEGIES)
    config = build_config(strategy=",".join(names), cycles=2, epochs=1, progress=False)
    records = loop.run_experiment(config, workdir=tmp_path / "run", log=quiet)
    assert sorted((r["strategy"], r["cycle"]) for r in records) == sorted((s, c) for s in names for c in (0, 1))
    initial = config.initial_size - config.val_size
    for r in records:
        if r["cycle"] == 0:
            assert len(set(r["selected"])) == config.budget, r["strategy"]
            assert r["num_labeled"] == config.initial_size
    # The same initial set for every strategy; what each adds is new to it.
    first = {r["strategy"]: r for r in records if r["cycle"] == 0}
    assert all(f["num_scored"] == 1347 - initial - config.val_size for f in first.values()), \
        {s: f["num_scored"] for s, f in first.items()}
