"""Running at scale: the precision policy read back from the programs XLA is given (StableHLO), what
cannot fit refused before a run, an out-of-memory error reported with what to lower (exit 2, the
finished cycles checkpointed), and the set-valued selection loops compiled once across cycles."""

import dataclasses
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import diagnostics, run
from jaxal.config import build_config
from jaxal.models import MLP, ModelOutput, init_variables
from jaxal.strategies import STRATEGIES, Selection, StrategyContext, get_strategy
from jaxal.strategies import badge, baselines

from conftest import count_traces  # tests/conftest.py

# ---- precision: the policy in the lowered programs -------------------------------------------------

PRODUCT = re.compile(r"stablehlo\.(dot_general|convolution)\b.*?(?:precision = \[(\w+), (\w+)\]|"
                     r"precision_config = \[#stablehlo<precision (\w+)>, #stablehlo<precision (\w+)>\])")


def product_precisions(text: str) -> set[str]:
    """The precisions of every dot_general and convolution of a StableHLO module (one entry per operand)."""
    found = set()
    for line in text.splitlines():
        if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
            match = PRODUCT.search(line)
            assert match, f"a product without a precision: {line}"
            found |= {p for p in match.groups()[1:] if p}
    return found


def dumped_programs(folder: Path) -> dict[str, set[str]]:
    """{jitted function name: precisions of its products} over every module JAX lowered into `folder`
    (the programs of one function at several shapes are merged)."""
    programs = {}
    for path in folder.glob("*.mlir"):
        name = re.match(r"jax_ir\d+_jit_(.+?)_compile", path.name)
        if name:
            precisions = product_precisions(path.read_text())
            if precisions:
                programs.setdefault(name.group(1), set()).update(precisions)
    return programs


@pytest.fixture
def dump_ir(tmp_path):
    """Every program JAX compiles while the fixture is active is written to the returned folder. The
    caches are cleared first: a program another test compiled would otherwise not be compiled (nor
    dumped) again."""
    folder = tmp_path / "ir"
    folder.mkdir()
    jax.clear_caches()
    previous = jax.config.values["jax_dump_ir_to"]
    jax.config.update("jax_dump_ir_to", str(folder))
    yield folder
    jax.config.update("jax_dump_ir_to", previous)


# Settings no other test uses, so that every program below is compiled (and dumped) here.
FRESH = dict(initial_size=31, val_size=5, budget=7, cycles=2, epochs=1, batch_size=13, eval_batch_size=11,
             progress=False, gradnorm=dict(chunk_size=9),
             influence=dict(depth=3, repeats=2, chunk_size=10, hvp_chunk_size=7, solver="cg", cg_maxiter=5, cg_tol=0.1))
# vdot: the host-side norms and cosine of ISAL's s_test and v (`pytree.tree_dot` outside the jitted solvers)
SOLVER_PROGRAMS = ("_solve_body", "_gradient_chunk", "_pool_scores", "_greedy_k_center", "_kmeans_pp_seeding", "vdot")
DEFAULT_PROGRAMS = ("train_step", "_predict_chunk", "_query_norms")


def test_solvers_distances_and_jvps_run_at_highest_and_training_at_the_default(tmp_path, dump_ir):
    """A run of isal (cg), coreset, BADGE and ent_gn: the solver, its gradient and jvp passes and the
    two distance loops have only HIGHEST products; training, inference and the gradient-norm scores
    only DEFAULT ones (TF32 on GPUs)."""
    from jaxal.loop import run_experiment

    config = build_config(strategy="isal,coreset,badge,ent_gn", **FRESH)
    run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
    programs = dumped_programs(dump_ir)
    for name in SOLVER_PROGRAMS:
        assert programs.get(name) == {"HIGHEST"}, (name, programs.get(name))
    for name in DEFAULT_PROGRAMS:
        assert programs.get(name) == {"DEFAULT"}, (name, programs.get(name))


def test_the_flags_flip_the_policy(tmp_path, monkeypatch, dump_ir):
    """--precision.solvers default: ISAL's programs (a tiny MLP, compiled here) have DEFAULT products;
    --precision.training highest: the cycles run (and trace their programs) under "highest"."""
    from jaxal import loop
    from jaxal.strategies import isal

    model = MLP(3, hidden=(6, 2))  # a model no other test compiles
    variables = init_variables(model, jax.random.key(0), (2, 2, 1))
    rng = np.random.default_rng(0)
    x = lambda n: jnp.asarray(rng.normal(size=(n, 2, 2, 1)), jnp.float32)  # noqa: E731
    labeled = (x(12), jnp.asarray(rng.integers(0, 3, 12)))
    config = build_config(strategy="isal", val_size=5, precision=dict(solvers="default", training="highest"),
                          influence=dict(solver="cg", cg_tol=0.1))
    ctx = StrategyContext(model=model, variables=variables, pool_x=x(9), labeled_x=labeled[0], labeled_y=labeled[1],
                          num_classes=3, config=config, rng=jax.random.key(0), reference_sets={"val": labeled})
    isal.isal_scores(ctx)
    programs = dumped_programs(dump_ir)
    for name in ("_solve_body", "_gradient_chunk", "_pool_scores"):
        assert programs.get(name) == {"DEFAULT"}, (name, programs.get(name))

    seen = []

    class Stopped(Exception):
        pass

    def run_trial(*args, **kwargs):
        seen.append(jax.config.values["jax_default_matmul_precision"])
        raise Stopped  # before any training

    monkeypatch.setattr(loop, "run_trial", run_trial)
    with pytest.raises(Stopped):
        loop.run_experiment(dataclasses.replace(config, workdir=str(tmp_path / "run"), progress=False),
                            log=lambda *_: None)
    assert seen == ["highest"]


def test_diagnostics_run_at_highest(dump_ir):
    model = MLP(num_classes=3, hidden=(7, 3))  # a model no other test compiles
    prev = init_variables(model, jax.random.key(0), (2, 3, 1))
    nxt = init_variables(model, jax.random.key(1), (2, 3, 1))
    rng = np.random.default_rng(0)
    x = lambda n: jnp.asarray(rng.normal(size=(n, 2, 3, 1)), jnp.float32)  # noqa: E731
    y = lambda n: jnp.asarray(rng.integers(0, 3, size=n))  # noqa: E731
    options = diagnostics.BoundOptions(solver="exact", params="all")
    diagnostics.cycle_bounds(model, prev, nxt, x(9), (x(8), y(8)), (x(5), y(5)), options=options, l2=0.1)
    diagnostics.true_label_grad_norms(model, nxt, x(9), y(9))
    programs = dumped_programs(dump_ir)
    for name in ("_solve_body", "_gradient_chunk", "_pool_pass", "_true_label_norms"):
        assert programs.get(name) == {"HIGHEST"}, (name, programs.get(name))


def test_bad_precision_flags_exit_2_before_anything_is_written(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = run.main(["--strategy", "random", "--precision.solvers", "tf32", "--workdir", str(workdir)])
    assert code == 2 and "--precision.solvers must be one of default, highest" in capsys.readouterr().err
    assert not workdir.exists()


# ---- what cannot fit: before the run, and during it ------------------------------------------------


def test_exact_solver_on_resnet18_is_refused_before_the_run_with_the_solver_to_use(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = run.main(["--strategy", "isal", "--model", "resnet18", "--influence.solver", "exact",
                     "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2 and not workdir.exists()
    assert "isal: --influence.solver exact with --influence.params weights" in err
    assert "dense 11163200 x 11163200 Hessian" in err and "use the cg or lissa solver" in err
    # The last layer (512 x 10 + 10) fits the default limit of 1 GiB; a lower limit refuses it too.
    code = run.main(["--strategy", "isal", "--model", "resnet18", "--influence.solver", "exact",
                     "--influence.params", "last_layer", "--influence.exact_max_gib", "0.1",
                     "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2 and not workdir.exists()
    assert "dense 5130 x 5130 Hessian" in err
    assert "0.197 GiB, above the limit of 0.1 GiB (--influence.exact_max_gib)" in err


def test_out_of_memory_during_a_run_is_reported_with_what_to_lower_and_keeps_finished_cycles(
        tmp_path, capsys, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED in the selection of cycle 1: exit status 2, a report (the size that
    failed, the run's sizes, the options with their values), no traceback; cycle 0 stays checkpointed."""
    calls = []

    def select(ctx, k):  # the first k candidates in cycle 0, then what XLA raises when an allocation fails
        calls.append(k)
        if len(calls) == 2:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 31373645072 bytes.")
        return Selection(np.arange(k))

    monkeypatch.setitem(STRATEGIES, "isal", dataclasses.replace(STRATEGIES["isal"], select_set=select, score=None))
    workdir = tmp_path / "run"
    code = run.main(["--strategy", "isal", "--initial_size", "30", "--val_size", "5", "--budget", "5",
                     "--cycles", "3", "--epochs", "1", "--influence.depth", "3", "--influence.hvp_chunk_size", "64",
                     "--workdir", str(workdir), "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and len(calls) == 2
    assert "Traceback" not in err
    assert err.startswith("error: out of memory on cpu:0") and "(29.2 GiB)" in err
    assert "up to 35 labelled training examples" in err  # 30 - 5 validation + 5 x 2 cycles
    assert "  isal: --influence.hvp_chunk_size [64]: labelled examples per Hessian-vector product" in err
    assert "--influence.repeats [4]: LiSSA chains run side by side" in err and "--batch_size [32]" in err
    assert (workdir / "checkpoints" / "isal" / "trial_0" / "0").is_dir()
    assert not (workdir / "checkpoints" / "isal" / "trial_0" / "1").exists()


def test_other_runtime_errors_still_raise(tmp_path, monkeypatch):
    def select(ctx, k):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setitem(STRATEGIES, "random", dataclasses.replace(STRATEGIES["random"], select_set=select, score=None))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        run.main(["--strategy", "random", "--initial_size", "20", "--cycles", "2", "--epochs", "1",
                  "--workdir", str(tmp_path / "run"), "--progress", "false"])


# ---- selection loops compile once ----------------------------------------------------------------


class LogitsAreInputs(nn.Module):
    """A 'model' whose logits and features are its inputs: no training needed."""

    @nn.compact
    def __call__(self, x, train=False, mc_dropout=False):
        logits = x.reshape((x.shape[0], -1))
        return ModelOutput(logits, logits, (logits,))


def test_coreset_badge_and_random_compile_once_across_cycles():
    """Three cycles as a run makes them: the labelled set grows, the pool shrinks. Each selection loop
    compiles once (the sizes padded to the run's buckets, the counts and masks traced), and selects
    from the new data each time."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(80, 5)).astype(np.float32)
    config = build_config(initial_size=20, val_size=0, budget=6, cycles=4, eval_batch_size=16)
    chosen = {name: [] for name in ("coreset", "badge", "random")}
    with (count_traces(baselines, "_greedy_k_center", static_argnums=(4, 5, 6)) as coreset_traces,
          count_traces(badge, "_kmeans_pp_seeding", static_argnums=(3, 5, 6)) as badge_traces):
        for cycle in range(3):
            labeled = 20 + 6 * cycle
            ctx = StrategyContext(model=LogitsAreInputs(), variables={"params": {}},
                                  pool_x=jnp.asarray(features[labeled:]), labeled_x=jnp.asarray(features[:labeled]),
                                  labeled_y=jnp.zeros(labeled, jnp.int32), num_classes=5, config=config,
                                  rng=jax.random.key(cycle))
            for name in chosen:
                chosen[name].append(np.asarray(get_strategy(name).select(ctx, 6).chosen))
    assert (coreset_traces.count, badge_traces.count) == (1, 1)
    for name, picks in chosen.items():
        assert all(len(set(p.tolist())) == 6 for p in picks)
        assert not all(np.array_equal(picks[0], p) for p in picks[1:]), name
