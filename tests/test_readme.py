"""README sentences that can be checked, checked: against the code's behaviour, a parameter count, and
the JSON a benchmark table was copied from."""

import json
import re
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from jaxal import run
from jaxal.models import create_model, init_variables

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def parameter_count(model_name: str, num_classes: int) -> int:
    variables = jax.eval_shape(lambda key: init_variables(create_model(model_name, num_classes), key, (32, 32, 3)),
                               jax.random.key(0))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


def test_drn_d_22_parameters_as_the_readme_says():
    """DRN-D-22 as published has 16.4M parameters with its 1000-class ImageNet head (fyu/drn's model
    table); with Cityscapes' 19 classes jaxal's has the count the README states."""
    cityscapes, imagenet = parameter_count("drn_d_22", 19), parameter_count("drn_d_22", 1000)
    assert round(imagenet / 1e6, 1) == 16.4
    stated = re.search(r"`drn_d_22` as published \(([\d.]+)M\s+parameters with Cityscapes' 19 classes", README)
    assert stated and float(stated.group(1)) == round(cityscapes / 1e6, 2)


PHASES = {"setup": "setup", "train": "training", "evaluate": "evaluation", "score": "scoring", "select": "selection"}


def test_the_cpu_scale_table_says_where_each_peak_came():
    """Each row's "(reached in)" is the first phase by whose end the process had reached its peak RSS, in
    experiments/results/bench_scale_cpu.json (the run the table was copied from)."""
    results = json.loads((ROOT / "experiments" / "results" / "bench_scale_cpu.json").read_text())["results"]
    rows = dict(re.findall(r"^\| (\w+) \(\w+\) \|.*\| [\d.]+ GB \((\w+)\) \|$", README, re.MULTILINE))
    assert set(rows) == {r["preset"] for r in results}
    for r in results:
        by_phase = r["peak_rss_mb_by_phase_end"]
        first = next(phase for phase, mb in by_phase.items() if mb >= r["peak_rss_mb"])
        assert rows[r["preset"]] == PHASES[first], r["preset"]


def test_a_folder_run_records_its_class_names(tmp_path):
    """README: the class names of a folder go into config.json and every record of results.jsonl; a
    resumed run is not refused because of them."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for name in ("dog", "cat"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(tmp_path / "images" / split / name / f"{i}.png")
    flags = ["--dataset", str(tmp_path / "images"), "--workdir", str(tmp_path / "run"), "--progress", "false",
             "--strategy", "random", "--initial_size", "4", "--val_size", "0", "--budget", "2", "--cycles", "2",
             "--epochs", "1", "--batch_size", "4"]
    assert run.main(flags) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["class_names"] == ["cat", "dog"]
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["class_names"] == ["cat", "dog"] for r in records)
    assert run.main(flags) == 0  # resumes (here: finds the run finished)
