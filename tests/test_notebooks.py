"""The notebooks in colab/ run end to end.

Each notebook listed in `NOTEBOOKS` is executed with nbclient on the `python3` kernel of this
environment, in a temporary working directory, with `JAXAL_NOTEBOOK_QUICK=1` (the notebooks' parameters
cell then picks a tiny run). The test fails if any cell raises; the notebook's check function then
inspects what the run left on disk and the executed notebook. Adding a notebook is one line:
`(file name, check function)` in `NOTEBOOKS`.

Every notebook in colab/ must also be valid nbformat v4 and be committed without outputs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import nbformat
import pytest

COLAB = Path(__file__).resolve().parent.parent / "colab"
KERNEL = "python3"
CELL_TIMEOUT_S = 300  # generous for one cell on a loaded 2-core machine; a quick run takes far less
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- checks, one per notebook ---------------------------------------------------------------------


def outputs_of(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def check_quickstart(cwd: Path, nb) -> None:
    workdir = cwd / "runs" / "quickstart"
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # QUICK: entropy and random, 2 cycles each, 50 initial + 20 per cycle.
    assert sorted((r["strategy"], int(r["cycle"])) for r in rows) == [
        ("entropy", 0), ("entropy", 1), ("random", 0), ("random", 1)]
    assert {int(r["num_labeled"]) for r in rows} == {50, 70}
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert (workdir / "learning_curve.png").read_bytes().startswith(PNG_MAGIC)
    # The curve is shown inline and the table printed.
    assert any("image/png" in out.get("data", {}) for out in outputs_of(nb))
    printed = "".join(out.get("text", "") for out in outputs_of(nb) if out.output_type == "stream")
    assert "entropy" in printed and "random" in printed
    # jaxal is importable here, so the install cell must not have run pip (it prints nothing).
    assert install_cell(nb).outputs == []


def check_bound_diagnostics(cwd: Path, nb) -> None:
    workdir = cwd / "runs" / "bound_diagnostics"
    rows = [json.loads(line) for line in (workdir / "diagnostics.jsonl").read_text().splitlines()]
    # QUICK: entropy and random, 3 cycles; the pairs (0, 1) and (1, 2) have the bounds, cycle 2 only the gap.
    assert sorted((r["strategy"], r["cycle"]) for r in rows) == [(s, c) for s in ("entropy", "random") for c in range(3)]
    assert all(r["ent_cauchy_schwarz_violations"] == 0 for r in rows if r["cycle"] < 2)
    assert (workdir / "diagnostics_fig3.png").read_bytes().startswith(PNG_MAGIC)
    assert any("image/png" in out.get("data", {}) for out in outputs_of(nb))
    printed = "".join(out.get("text", "") for out in outputs_of(nb) if out.output_type == "stream")
    assert "Table 1" in printed and "Table 2" in printed and "Table 3" in printed
    assert "for every sample: True" in printed


def check_annotate(cwd: Path, nb) -> None:
    workdir = cwd / "runs" / "annotate"
    rounds = [json.loads((workdir / f"round_{r:03d}" / "round.json").read_text()) for r in (0, 1)]
    # QUICK: digits, 20 first labels, 8 proposed per round, all of round 0's batch labelled.
    assert [len(r["proposal"]["ids"]) for r in rounds] == [8, 8]
    assert not set(rounds[0]["proposal"]["ids"]) & set(rounds[1]["proposal"]["ids"])
    assert (rounds[1]["proposed_labeled"], rounds[1]["record"]["num_labeled"]) == (8, 28)
    assert sum("image/png" in out.get("data", {}) for out in outputs_of(nb)) == 2  # the two grids
    printed = "".join(out.get("text", "") for out in outputs_of(nb) if out.output_type == "stream")
    assert "round 0: scores" in printed and "round 1: scores" in printed
    assert "the same batch: True | trained again: False" in printed


NOTEBOOKS: list[tuple[str, Callable[[Path, nbformat.NotebookNode], None]]] = [
    ("quickstart.ipynb", check_quickstart),
    ("bound_diagnostics.ipynb", check_bound_diagnostics),
    ("annotate.ipynb", check_annotate),
]


# ---- the install cell -----------------------------------------------------------------------------


def install_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Install jaxal"))


def test_every_notebook_has_the_same_install_cell_and_no_placeholder():
    sources = {name: nbformat.read(COLAB / name, as_version=4) for name, _ in NOTEBOOKS}
    cells = {name: install_cell(nb).source for name, nb in sources.items()}
    assert len(set(cells.values())) == 1, "the install cells differ"
    for name, nb in sources.items():
        text = "".join(c.source for c in nb.cells)
        assert "<org>" not in text and "%pip" not in text, name


# The install cell run in a fresh interpreter where jaxal cannot be imported, with pip replaced by a
# recorder that makes jaxal importable again (as an install would): what would it install, and with what?
INSTALL_HARNESS = """
import json, subprocess, sys
calls = []
def check_call(command):
    calls.append(command)
    del sys.modules["jaxal"]  # "installed"
subprocess.check_call = check_call
sys.modules["jaxal"] = None  # jaxal cannot be imported
sys.path.insert(0, {root!r})
try:
    exec({cell!r})
except RuntimeError as error:
    print(json.dumps({{"error": str(error)}}))
else:
    constraints = open(calls[0][calls[0].index("-c") + 1]).read().split()
    print(json.dumps({{"command": calls[0], "constraints": constraints}}))
"""


def run_install_cell(cwd: Path, env: dict | None = None) -> dict:
    import os
    import subprocess
    import sys

    cell = install_cell(nbformat.read(COLAB / "quickstart.ipynb", as_version=4)).source
    script = INSTALL_HARNESS.format(root=str(COLAB.parent), cell=cell)
    environment = {k: v for k, v in os.environ.items() if k != "JAXAL_SOURCE"}
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120,
                            env={**environment, **(env or {})})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_install_cell_installs_from_a_checkout_a_wheel_or_jaxal_source_and_keeps_jax(tmp_path):
    import importlib.metadata

    jax_pin = f"jax=={importlib.metadata.version('jax')}"
    checkout = run_install_cell(COLAB)  # the notebook opened inside a checkout
    assert checkout["command"][-2:] == ["-e", str(COLAB.parent)] and jax_pin in checkout["constraints"]
    assert checkout["command"][1:4] == ["-m", "pip", "install"]
    (tmp_path / "jaxal-0.1.0-py3-none-any.whl").write_bytes(b"")
    wheel = run_install_cell(tmp_path)  # a wheel uploaded next to the notebook (Colab)
    assert wheel["command"][-1] == "jaxal-0.1.0-py3-none-any.whl" and jax_pin in wheel["constraints"]
    chosen = run_install_cell(tmp_path, {"JAXAL_SOURCE": "jaxal==0.1.0"})
    assert chosen["command"][-1] == "jaxal==0.1.0"
    (tmp_path / "jaxal-0.1.0-py3-none-any.whl").unlink()
    assert "open this notebook inside a checkout of jaxal" in run_install_cell(tmp_path)["error"]


# ---- machinery ------------------------------------------------------------------------------------


@pytest.fixture
def kernel_name(tmp_path_factory, monkeypatch) -> str:
    """The `python3` kernel of this environment. jupyter_client normally finds the spec that
    ipykernel installs into the virtualenv (and runs it with this interpreter); if it does not,
    install one into a temporary prefix and put that on JUPYTER_PATH."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install

        prefix = tmp_path_factory.mktemp("jupyter")
        install(kernel_name=KERNEL, prefix=str(prefix))
        monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return KERNEL


@pytest.mark.parametrize("name", sorted(p.name for p in COLAB.glob("*.ipynb")) or ["(none)"])
def test_notebook_is_committed_clean(name):
    if name == "(none)":
        pytest.skip("no notebooks in colab/")
    nb = nbformat.read(COLAB / name, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: commit it without outputs"


@pytest.mark.parametrize("name,check", NOTEBOOKS, ids=[n for n, _ in NOTEBOOKS])
def test_notebook_runs(name, check, kernel_name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("JAXAL_NOTEBOOK_QUICK", "1")
    nb = nbformat.read(COLAB / name, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    errors = [out for out in outputs_of(nb) if out.output_type == "error"]
    assert not errors, errors
    check(tmp_path, nb)
