"""jaxal and a REAL Label Studio server on 127.0.0.1, both ways: rounds driven from its REST API
(`python -m jaxal.query --label-studio`) and jaxal as its ML backend (`jaxal.serve`, whose /predict
Label Studio calls). The server comes from its own virtual environment: set JAXAL_LABEL_STUDIO to its
`label-studio` executable (`.ci/run` does); without it the server tests skip. The pure parts (the label
config mapping, the annotations, the scores) are tested without a server."""

from __future__ import annotations

import dataclasses
import http.server
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotation import digit_pool
from jaxal import cli, labelstudio, query, serve
from processes import free_port

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image" choice="single">'
          '<Choice value="zero"/><Choice value="one"/><Choice value="two"/></Choices></View>')
BUDGET = 8
TINY = ["--epochs", "2", "--batch_size", "16", "--model", "cnn", "--image_size", "8", "--progress", "false",
        "--budget", str(BUDGET)]
SPEC = labelstudio.LabelSpec("label", "image", "image", ("zero", "one", "two"))


# ---- without a server --------------------------------------------------------------------------------


def test_label_spec_maps_one_single_choice_tag_and_names_what_it_cannot_map():
    assert labelstudio.label_spec(CONFIG) == SPEC
    two = CONFIG.replace("</View>", '<Choices name="quality" toName="image"><Choice value="ok"/><Choice value="bad"/>'
                                    "</Choices></View>")
    with pytest.raises(labelstudio.LabelStudioError, match="2 <Choices> tags \\('label', 'quality'\\); pick one with"):
        labelstudio.label_spec(two)
    assert labelstudio.label_spec(two, "quality").classes == ("ok", "bad")
    multi = CONFIG.replace('choice="single"', 'choice="multiple"')
    with pytest.raises(labelstudio.LabelStudioError, match="<Choices name='label'> allows several .*multi-label"):
        labelstudio.label_spec(multi)
    text = '<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text"><Choice value="a"/>' \
           '<Choice value="b"/></Choices></View>'
    with pytest.raises(labelstudio.LabelStudioError, match="<Choices name='sentiment'> labels <Text>"):
        labelstudio.label_spec(text)
    boxes = '<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img"><Label value="a"/>' \
            '</RectangleLabels></View>'
    with pytest.raises(labelstudio.LabelStudioError, match="no <Choices> tag.*<RectangleLabels name='box'>"):
        labelstudio.label_spec(boxes)


def annotation(label, when, cancelled=False, ident=0):
    return {"id": ident, "updated_at": when, "was_cancelled": cancelled,
            "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]}


def test_newest_non_cancelled_annotation_counts_conflicts_reported_outside_classes_refused():
    tasks = [{"id": 1, "annotations": [annotation("one", "2026-01-02"), annotation("two", "2026-01-01")]},
             {"id": 2, "annotations": [annotation("one", "2026-01-01"), annotation("zero", "2026-01-03", True)]},
             {"id": 3, "annotations": [{"id": 9, "updated_at": "2026-01-01", "result": []}]},
             {"id": 4, "annotations": []}]
    found = labelstudio.task_labels(tasks, SPEC)
    assert found.labels == {1: "one", 2: "one"} and found.conflicts == [1] and found.without_choice == [3]
    tasks.append({"id": 5, "annotations": [annotation("seven", "2026-01-01")]})
    with pytest.raises(labelstudio.LabelStudioError, match="task 5: 'seven'"):
        labelstudio.task_labels(tasks, SPEC)


def test_ranking_scores_put_the_batch_first_in_rank_order_then_the_entropy_order():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=30)
    ids = list(range(100, 130))
    proposed = [117, 103, 125, 110]
    scores = labelstudio.ranking_scores(ids, proposed, probabilities)
    order = sorted(ids, key=lambda i: -scores[i])
    assert order[:4] == proposed
    # The others, by entropy computed here with a Python loop over the probabilities.
    entropy = {i: -sum(p * np.log(p) for p in row) for i, row in zip(ids, probabilities)}
    assert order[4:] == sorted(set(ids) - set(proposed), key=lambda i: -entropy[i])
    assert all(0.5 < scores[i] <= 1.0 for i in proposed) and all(0 <= scores[i] <= 0.5 for i in order[4:])


# ---- a real server ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    url: str
    base: Path  # the temporary directory: data, files, logs
    files: Path  # the local-files storage's document root
    log: Path

    def session(self, key=LEGACY_TOKEN):
        import requests

        session = requests.Session()
        session.headers["Authorization"] = f"Token {key}"
        return session

    def api(self, method, path, key=LEGACY_TOKEN, ok=(200, 201, 204), **kwargs):
        response = self.session(key).request(method, self.url + path, timeout=120, **kwargs)
        assert response.status_code in ok, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else None


def label_studio_executable():
    path = os.environ.get("JAXAL_LABEL_STUDIO")
    return path if path and Path(path).is_file() else None


@pytest.fixture(scope="module")
def server():
    """Label Studio on 127.0.0.1 in a temporary directory, stopped and removed whatever happens."""
    executable = label_studio_executable()
    if executable is None:
        pytest.skip("set JAXAL_LABEL_STUDIO to a label-studio executable (its own virtual environment) to run the "
                    "Label Studio tests")
    import requests

    base = Path(tempfile.mkdtemp(prefix="jaxal-label-studio-"))
    process = None
    try:
        files = base / "files"
        files.mkdir()
        port = free_port()
        env = {**os.environ, "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
               "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files), "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
               # Only 127.0.0.1: no version check, no analytics; the ML backend is on 127.0.0.1 too.
               "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "SSRF_PROTECTION_ENABLED": "false",
               "ML_BLOCK_LOCAL_IP": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
        log = base / "server.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [executable, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                 "--data-dir", str(base / "data"), "--username", "test@example.com", "--password", "test-password",
                 "--user-token", LEGACY_TOKEN, "--enable-legacy-api-token"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"label-studio exited: {log.read_text()[-3000:]}"
            try:
                if requests.get(url + "health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"label-studio did not answer in 240 s: {log.read_text()[-3000:]}"
            time.sleep(1)
        yield Server(url, base, files, log)
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
        shutil.rmtree(base, ignore_errors=True)


class FileServer:
    """Images on a plain http server (127.0.0.1), for tasks whose image is an http URL."""

    def __init__(self, root: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def write_digits(folder: Path, count: int, start: int = 0) -> dict:
    """count digits (0, 1, 2) upscaled to 32x32 PNG files named dNNN_<class>.png; {name: class}."""
    _, images, names = digit_pool(start + count)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(start, start + count):
        name = f"d{i:03d}_{names[i]}.png"
        Image.fromarray(images[i][..., 0]).resize((32, 32), Image.Resampling.NEAREST).save(folder / name)
        truth[name] = names[i]
    return truth


def truth_of(task: dict) -> str:
    return task["data"]["image"].rsplit("_", 1)[1].removesuffix(".png")


def tasks_of(server, project) -> list[dict]:
    return server.api("GET", "api/tasks/", params={"project": project, "page_size": 1000})["tasks"]


def annotate(server, task_ids, key=LEGACY_TOKEN):
    for task_id in task_ids:
        task = server.api("GET", f"api/tasks/{task_id}/", key=key)
        server.api("POST", f"api/tasks/{task_id}/annotations/", key=key, json={"result": [
            {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [truth_of(task)]}}]})


def data_manager_order(server, project, count) -> list[int]:
    """The first `count` task ids of the Data Manager sorted by prediction score, as its UI asks for them
    (a view ordered by -tasks:predictions_score, then its task page)."""
    view = server.api("POST", "api/dm/views/", json={"project": project,
                                                     "data": {"ordering": ["-tasks:predictions_score"]}})
    page = server.api("GET", "api/tasks/", params={"view": view["id"], "page": 1, "page_size": count})
    return [task["id"] for task in page["tasks"]]


def proposal(workdir: Path, number: int) -> list[int]:
    import json

    return json.loads((workdir / "learner" / f"round_{number:03d}" / "round.json").read_text())["proposal"]["ids"]


def create_project(server, config=CONFIG, title="digits") -> int:
    return server.api("POST", "api/projects/", json={"title": title, "label_config": config})["id"]


def run_query(project, workdir, server, key=LEGACY_TOKEN, monkeypatch=None):
    monkeypatch.setenv(labelstudio.KEY_VARIABLE, key)
    return query.main(["--label-studio", server.url, "--project", str(project), "--strategy", "ent_gn",
                       "--workdir", str(workdir), *TINY])


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_rounds_through_the_rest_api_then_the_ml_backend(server, tmp_path, monkeypatch, capsys):
    files = FileServer(server.files)
    try:
        rest_api_then_ml_backend(server, tmp_path, monkeypatch, capsys, files)
    finally:
        files.close()


def rest_api_then_ml_backend(server, tmp_path, monkeypatch, capsys, files):
    # ~200 images: 180 in a local-files storage, 10 uploaded, 6 by http URL, 1 that cannot be read.
    write_digits(server.files / "digits", 180)
    write_digits(server.files / "upload", 10, start=180)
    write_digits(server.files / "web", 6, start=190)
    project = create_project(server)
    storage = server.api("POST", "api/storages/localfiles/", json={
        "project": project, "path": str(server.files / "digits"), "regex_filter": r".*\.png", "use_blob_urls": True})
    server.api("POST", f"api/storages/localfiles/{storage['id']}/sync")
    uploads = [(f"file{i}", (p.name, p.read_bytes(), "image/png"))  # one form field per file
               for i, p in enumerate(sorted((server.files / "upload").iterdir()))]
    server.api("POST", f"api/projects/{project}/import", files=uploads)
    server.api("POST", f"api/projects/{project}/import",
               json=[{"image": files.url + f"web/{p.name}"} for p in sorted((server.files / "web").iterdir())]
               + [{"image": "/data/upload/9999/missing_zero.png"}])
    tasks = tasks_of(server, project)
    assert len(tasks) == 197
    kinds = {t["data"]["image"].split("?")[0].split("/")[2 if t["data"]["image"].startswith("/") else 0]
             for t in tasks}
    assert kinds == {"local-files", "upload", "http:"}

    # An annotator labels 20 (7, 7, 6 of the classes), one of them twice with different labels.
    by_class = {}
    for task in tasks[:-1]:
        by_class.setdefault(truth_of(task), []).append(task["id"])
    first = by_class["zero"][:7] + by_class["one"][:7] + by_class["two"][:6]
    annotate(server, first)
    wrong = {"zero": "one", "one": "two", "two": "zero"}
    conflicted = by_class["two"][0]
    server.api("POST", f"api/tasks/{conflicted}/annotations/", json={"result": [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["one"]}}]})
    annotate(server, [conflicted])  # the newest (right) one counts

    workdir = tmp_path / "al"
    assert run_query(project, workdir, server, monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "skipped 1 tasks whose image cannot be read" in out
    assert f"1 tasks have annotations that disagree ({conflicted})" in out
    batch = proposal(workdir, 0)
    assert len(batch) == BUDGET and not set(batch) & set(first)
    assert data_manager_order(server, project, BUDGET) == batch  # the Data Manager's own sort shows jaxal's batch
    assert server.api("GET", f"api/projects/{project}/")["model_version"] == "jaxal-round-000"
    predictions = server.api("GET", "api/predictions/", params={"task": batch[0]})
    assert [p["result"][0]["value"]["choices"][0] in SPEC.classes for p in predictions] == [True]
    assert LEGACY_TOKEN.encode() not in all_bytes(workdir)

    # The annotator labels the batch; a task is added, an unlabelled and a labelled one deleted; the rerun
    # is round 1, with a personal access token (refresh token) this time.
    annotate(server, batch)
    server.api("POST", f"api/projects/{project}/import", json=[{"image": files.url + "web/" + sorted(
        p.name for p in (server.files / "web").iterdir())[0]}])
    deleted = next(t["id"] for t in tasks[:-1] if t["id"] not in set(first) | set(batch))
    server.api("DELETE", f"api/tasks/{deleted}/")
    server.api("DELETE", f"api/tasks/{first[0]}/")  # a labelled one: its label and cached image stay
    personal = server.api("POST", "api/token/")["token"]
    assert labelstudio.is_personal_access_token(personal)
    # The round is killed as it starts writing its predictions; the rerun finishes it without training.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(labelstudio.Client, "import_predictions", killed)
        assert run_query(project, workdir, server, key=personal, monkeypatch=monkeypatch) == 130  # Ctrl-C's status
    assert ("1 tasks were added to the project (they join the pool) and 2 deleted (they leave it, except the "
            "labelled ones, from the image cache)") in capsys.readouterr().out
    assert server.api("GET", f"api/projects/{project}/")["model_version"] == "jaxal-round-000"
    assert run_query(project, workdir, server, key=personal, monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "no new annotations since round 1; finishing it" in out and "training" not in out
    second = proposal(workdir, 1)
    assert not set(second) & (set(batch) | set(first) | {deleted})
    assert data_manager_order(server, project, BUDGET) == second
    assert server.api("GET", f"api/projects/{project}/")["model_version"] == "jaxal-round-001"
    assert personal.encode() not in all_bytes(workdir)
    # A rerun with no new annotations trains nothing and changes nothing.
    assert run_query(project, workdir, server, key=personal, monkeypatch=monkeypatch) == 0
    assert "no new annotations since round 1" in capsys.readouterr().out
    assert data_manager_order(server, project, BUDGET) == second

    ml_backend_rounds(server, project, workdir, personal, second, capsys)

    # A changed label config (a class added) ends the next round before it writes anything.
    server.api("PATCH", f"api/projects/{project}/", json={"label_config": CONFIG.replace(
        '<Choice value="two"/>', '<Choice value="two"/><Choice value="three"/>')})
    before = all_bytes(workdir)
    assert run_query(project, workdir, server, monkeypatch=monkeypatch) == 2
    assert "label config changed since the workdir's rounds (classes:" in capsys.readouterr().err
    assert all_bytes(workdir) == before


def wait_for_rounds(backend_url, done, limit=150) -> bool:
    """Polls the backend's /health until `done(health)`; True if it ever said it was training (it answers
    during a round)."""
    import requests

    seen_training, deadline = False, time.monotonic() + limit
    while True:
        health = requests.get(backend_url + "health", timeout=5).json()
        seen_training |= health["training"]
        if not health["training"] and done(health):
            return seen_training
        assert time.monotonic() < deadline, f"no round finished in {limit} s: {health}"
        time.sleep(0.5)


def ml_backend_rounds(server, project, workdir, key, last_batch, capsys):
    """jaxal.serve on 127.0.0.1, connected as the project's ML backend: Label Studio's events start its
    rounds and Label Studio fetches the predictions from its /predict."""
    client = labelstudio.Client(server.url, key)
    config = cli.config_from_args(serve.build_parser().parse_args(
        ["--label-studio", server.url, "--project", str(project), "--workdir", str(workdir), "--strategy", "ent_gn",
         *TINY]))
    backend = serve.Backend(client, project, config, log=lambda line: None)
    predicted = []
    original_predict = backend.predict
    backend.predict = lambda body: predicted.append(len(body["tasks"])) or original_predict(body)
    httpd = serve.make_server(backend, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    backend_url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        ml = server.api("POST", "api/ml/", json={"url": backend_url.rstrip("/"), "project": project, "title": "jaxal"})
        webhook = next(w for w in server.api("GET", "api/webhooks/", params={"project": project})
                       if w["url"].startswith(backend_url.rstrip("/")))
        # Annotate the batch with the webhook paused, then START_TRAINING from Label Studio: one round.
        server.api("PATCH", f"api/webhooks/{webhook['id']}/", json={"is_active": False})
        annotate(server, last_batch)
        calls = len(predicted)
        server.api("POST", f"api/ml/{ml['id']}/train")
        assert wait_for_rounds(backend_url, lambda h: h["model_version"] == "jaxal-round-002")
        assert backend.last_error is None
        check_backend_round(server, project, workdir, 2, predicted, calls)

        # Now an annotation's own webhook (ANNOTATION_CREATED) starts the round: the last of the batch.
        batch = proposal(workdir, 2)
        annotate(server, batch[:-1])
        server.api("PATCH", f"api/webhooks/{webhook['id']}/", json={"is_active": True})
        calls = len(predicted)
        annotate(server, batch[-1:])
        assert wait_for_rounds(backend_url, lambda h: h["model_version"] == "jaxal-round-003")
        assert backend.last_error is None
        assert not set(proposal(workdir, 3)) & set(batch)
        check_backend_round(server, project, workdir, 3, predicted, calls)
    finally:
        httpd.shutdown()
        httpd.server_close()
        backend.wait(120)


def check_backend_round(server, project, workdir, number, predicted, calls_before):
    """The finished round had Label Studio call /predict and rank by it."""
    assert len(predicted) > calls_before and sum(predicted[calls_before:]) > 100  # tasks Label Studio asked for
    assert server.api("GET", f"api/projects/{project}/")["model_version"] == labelstudio.model_version(number)
    assert data_manager_order(server, project, BUDGET) == proposal(workdir, number)


def test_bad_servers_keys_and_projects_exit_2_with_one_line(server, tmp_path, monkeypatch, capsys):
    project = create_project(server, title="bad inputs")
    workdir = tmp_path / "al"

    def run(*extra, url=server.url, key=LEGACY_TOKEN, target=project):
        monkeypatch.setenv(labelstudio.KEY_VARIABLE, key)
        status = query.main(["--label-studio", url, "--project", str(target), "--workdir", str(workdir), *TINY,
                             *extra])
        err = capsys.readouterr().err.strip()
        return status, err

    status, err = run(key="f" * 40)
    assert status == 2 and "rejected the API key in LABEL_STUDIO_API_KEY (HTTP 401)" in err and len(err.splitlines()) == 1
    assert "f" * 40 not in err
    status, err = run(key="eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl")
    assert status == 2 and "rejected the personal access token in LABEL_STUDIO_API_KEY (HTTP 401" in err
    status, err = run(url=f"http://127.0.0.1:{free_port()}")
    assert status == 2 and "cannot reach Label Studio at" in err and len(err.splitlines()) == 1
    monkeypatch.delenv(labelstudio.KEY_VARIABLE)
    assert query.main(["--label-studio", server.url, "--project", str(project)]) == 2
    assert "set LABEL_STUDIO_API_KEY" in capsys.readouterr().err

    server.api("PATCH", f"api/projects/{project}/", json={"label_config": CONFIG.replace('"single"', '"multiple"')})
    status, err = run()
    assert status == 2 and "<Choices name='label'> allows several choices per task" in err
    server.api("PATCH", f"api/projects/{project}/", json={"label_config": CONFIG})
    server.api("POST", f"api/projects/{project}/import", json=[{"image": "s3://bucket/cat.png"}])
    status, err = run()
    assert status == 2 and "s3://bucket/cat.png is in cloud storage" in err
    task = tasks_of(server, project)[0]["id"]
    server.api("PATCH", f"api/tasks/{task}/", json={"data": {"image": "/data/upload/1/x.png"}})
    server.api("POST", f"api/tasks/{task}/annotations/", json={"result": [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["seven"]}}]})
    status, err = run()
    assert status == 2 and f"task {task}: 'seven'" in err
    assert not workdir.exists()
