"""Label Studio as the oracle of annotation rounds: its REST API in, predictions that order its task list out.

    LABEL_STUDIO_API_KEY=... python -m jaxal.query --label-studio http://localhost:8080 --project 1 \\
        --strategy ent_gn --budget 100 --workdir al/

One round (`project_round`) reads the project's label config and maps its single-choice `Choices` tag to
the classes (`label_spec`), reads every task (paginated) and takes the newest non-cancelled annotation
of each as its label (`task_labels`), reads the tasks' images (`ImageReader`: uploaded files, local-files
storage, http(s) URLs; each downloaded once, cached in the workdir), and runs the same round as
`jaxal.query` over them (`jaxal.learner.ActiveLearner`, task ids as its ids). It then writes one
prediction per unannotated task back in bulk: the model's label as a pre-annotation and a `score` that
puts the proposed batch first (`ranking_scores`: the batch in (0.5, 1], the others in [0, 0.5], as Label
Studio drops scores outside [0, 1]), and sets the project's `model_version` to the round's, so that the
Data Manager sorted by prediction score shows this round's ranking (Label Studio averages the scores of
the predictions of the project's model version only). A rerun without new annotations trains nothing
(it finishes a round whose predictions were not written yet); tasks added since the last round join
the pool, deleted ones leave it (labelled ones stay, from the image cache: a label once trained on
stays, as in `ActiveLearner`), and the round says how many. `jaxal.serve` runs the same round for Label
Studio's ML backend protocol and answers its `/predict` from the round's `predictions.json`.

The workdir holds `labelstudio.json` (the server's URL, the project, the mapped label config: never the
key), `images/` (the downloaded image files, named by task id and a hash of the URL), and `learner/`
(the ActiveLearner's rounds: `learner/round_NNN/` with `round.json` and `predictions.json`).

The key comes from LABEL_STUDIO_API_KEY and lives in memory only. Both kinds Label Studio issues work:
a personal access token (a JWT refresh token: exchanged at /api/token/refresh/ for short-lived access
tokens, renewed when one expires) and a legacy token (sent as `Token <key>`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Iterator, Optional
from urllib.parse import urljoin, urlsplit

import numpy as np

from jaxal.loop import RunError

KEY_VARIABLE = "LABEL_STUDIO_API_KEY"
PAGE_SIZE = 100
PREDICTION_BATCH = 500  # predictions per bulk request
BINDING_FILE = "labelstudio.json"
PREDICTIONS_FILE = "predictions.json"
CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure", "r2", "minio")


class LabelStudioError(RunError):
    """The server, the project or its annotations cannot be used as they are: the message says why."""


class UnreadableImage(ValueError):
    """One task's image cannot be read: the task is skipped and counted, the round goes on."""


def model_version(round_number: int) -> str:
    return f"jaxal-round-{round_number:03d}"


# ---- the REST client ------------------------------------------------------------------------------


def api_key(environ=os.environ) -> str:
    key = environ.get(KEY_VARIABLE, "").strip()
    if not key:
        raise LabelStudioError(f"set {KEY_VARIABLE} to a Label Studio API key (Account & Settings: a personal "
                               "access token or a legacy token)")
    return key


def is_personal_access_token(key: str) -> bool:
    """Personal access tokens are JWTs (three base64url parts); legacy tokens are 40 hex digits."""
    return re.fullmatch(r"eyJ[\w-]*\.[\w-]+\.[\w-]+", key) is not None


class Client:
    """Label Studio's REST API over `requests`, authenticated with either kind of key. Every failure
    raises LabelStudioError with one line that never holds the key."""

    def __init__(self, url: str, key: str, timeout: float = 60.0):
        import requests

        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise LabelStudioError(f"--label-studio {url!r} is not an http(s) URL such as http://localhost:8080")
        self.url = url.rstrip("/") + "/"
        self.timeout = timeout
        self._key = key
        self._access: Optional[str] = None
        self._session = requests.Session()

    def _auth_header(self, renew: bool = False) -> dict:
        if not is_personal_access_token(self._key):
            return {"Authorization": f"Token {self._key}"}
        if self._access is None or renew:
            answer = self._send("POST", "api/token/refresh/", {}, json={"refresh": self._key})
            if answer.status_code != 200:
                raise LabelStudioError(f"Label Studio at {self.url} rejected the personal access token in "
                                       f"{KEY_VARIABLE} (HTTP {answer.status_code}: {_detail(answer)}); create a new "
                                       "one in Account & Settings")
            self._access = answer.json()["access"]
        return {"Authorization": f"Bearer {self._access}"}

    def _send(self, method: str, path: str, headers: dict, **kwargs):
        import requests

        url = urljoin(self.url, path)
        try:
            response = self._session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            reason = type(error).__name__ if isinstance(error, requests.Timeout) else "connection refused or no route"
            raise LabelStudioError(f"cannot reach Label Studio at {self.url} ({reason}); is it running there?") from None
        return response

    def request(self, method: str, path: str, *, ok=(200, 201, 204), **kwargs):
        """The response to an authenticated request; an expired access token is renewed once."""
        response = self._send(method, path, self._auth_header(), **kwargs)
        if response.status_code == 401 and is_personal_access_token(self._key):
            response = self._send(method, path, self._auth_header(renew=True), **kwargs)
        if response.status_code == 401:
            raise LabelStudioError(f"Label Studio at {self.url} rejected the API key in {KEY_VARIABLE} (HTTP 401): "
                                   f"{_detail(response)}")
        if response.status_code not in ok:
            raise LabelStudioError(f"Label Studio answered {method} /{path.split('?')[0]} with HTTP "
                                   f"{response.status_code}: {_detail(response)}")
        return response

    def json(self, method: str, path: str, **kwargs):
        response = self.request(method, path, **kwargs)
        try:
            return response.json() if response.content else None
        except ValueError:
            raise LabelStudioError(f"Label Studio answered /{path} with something other than JSON; is "
                                   f"{self.url} a Label Studio server?") from None

    def project(self, project: int) -> dict:
        return self.json("GET", f"api/projects/{project}/", ok=(200,))

    def tasks(self, project: int, page_size: int = PAGE_SIZE) -> Iterator[dict]:
        """Every task with its annotations, a page at a time, with the data as stored (resolve_uri off:
        cloud URLs stay visible as such)."""
        page, seen, total = 1, 0, None
        while total is None or seen < total:
            answer = self.json("GET", "api/tasks/", params={"project": project, "page": page, "page_size": page_size,
                                                           "fields": "all", "resolve_uri": "false"})
            tasks = answer["tasks"] if isinstance(answer, dict) else answer
            total = answer.get("total", 0) if isinstance(answer, dict) else len(tasks)
            if not tasks:
                break
            yield from tasks
            seen += len(tasks)
            page += 1

    def download(self, url: str) -> bytes:
        """The file at a task's image URL: a path on the server or a URL on it with the key, any other
        http(s) URL without it (the key never leaves for another host). UnreadableImage when there is
        no such file."""
        target = urljoin(self.url, url)
        if urlsplit(target).netloc == urlsplit(self.url).netloc:  # any answer but a rejected key is this file's
            response = self.request("GET", target, ok=range(200, 600))
        else:
            try:
                response = self._send("GET", target, {})
            except LabelStudioError:
                raise UnreadableImage(f"cannot reach {urlsplit(target).netloc}") from None
        if response.status_code != 200:
            raise UnreadableImage(f"HTTP {response.status_code}")
        return response.content

    def import_predictions(self, project: int, predictions: list[dict]) -> None:
        """Creates `predictions` in bulk; LabelStudioError if the server kept fewer (it drops the ones
        it finds invalid, saying so only in its own log)."""
        for start in range(0, len(predictions), PREDICTION_BATCH):
            batch = predictions[start:start + PREDICTION_BATCH]
            answer = self.json("POST", f"api/projects/{project}/import/predictions", json=batch)
            created = answer.get("created") if isinstance(answer, dict) else None
            if created is not None and created != len(batch):
                raise LabelStudioError(f"Label Studio kept {created} of {len(batch)} predictions sent to project "
                                       f"{project}; its log says why")

    def retrieve_predictions(self, project: int) -> None:
        """The Data Manager's "Retrieve Predictions" on every task: Label Studio asks the project's ML
        backend (/setup, then /predict for the tasks without a prediction of its model version)."""
        self.json("POST", "api/dm/actions/", params={"id": "retrieve_tasks_predictions", "project": project},
                  json={"selectedItems": {"all": True, "excluded": []}})

    def set_model_version(self, project: int, version: str) -> None:
        self.json("PATCH", f"api/projects/{project}/", json={"model_version": version}, ok=(200,))


def _detail(response) -> str:
    try:
        body = response.json()
        text = body.get("detail") or body.get("validation_errors") or body if isinstance(body, dict) else body
    except ValueError:
        text = response.text
    return " ".join(str(text).split())[:300]


# ---- the label config ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """The part of a label config a round uses: one single-choice Choices tag over an Image tag."""

    from_name: str  # the Choices tag's name (annotation results name it)
    to_name: str  # the Image tag's name
    data_key: str  # the task data field holding the image URL ($image -> image)
    classes: tuple  # the Choice values, in the config's order

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "classes": list(self.classes)}


def label_spec(config_xml: str, from_name: Optional[str] = None) -> LabelSpec:
    """Maps a label config's Choices tag (the one named `from_name` when there are several) to classes.
    LabelStudioError names the tag that cannot be mapped and why."""
    try:
        root = ElementTree.fromstring(config_xml)
    except ElementTree.ParseError as error:
        raise LabelStudioError(f"the project's label config is not valid XML ({error})") from None
    tags = {element.get("name"): element for element in root.iter() if element.get("name")}
    choices = [element for element in root.iter() if element.tag.lower() == "choices"]
    if not choices:
        found = ", ".join(f"<{e.tag} name={n!r}>" for n, e in tags.items()) or "none"
        raise LabelStudioError(f"the project's label config has no <Choices> tag, which jaxal maps to classes (it has: "
                               f"{found}); use an image classification config")
    if from_name is None and len(choices) > 1:
        raise LabelStudioError(f"the label config has {len(choices)} <Choices> tags ("
                               f"{', '.join(repr(c.get('name')) for c in choices)}); pick one with --from-name")
    if from_name is not None:
        choices = [c for c in choices if c.get("name") == from_name]
        if not choices:
            raise LabelStudioError(f"--from-name {from_name!r}: the label config has no <Choices name={from_name!r}>")
    tag = choices[0]
    name = tag.get("name")
    if (tag.get("choice") or "single").lower() == "multiple":
        raise LabelStudioError(f"<Choices name={name!r}> allows several choices per task (choice=\"multiple\"): that is "
                               "multi-label classification, and jaxal's rounds train one class per image; set "
                               "choice=\"single\" or pick another tag with --from-name")
    target = tags.get(tag.get("toName", ""))
    if target is None or target.tag.lower() != "image":
        kind = "nothing" if target is None else f"<{target.tag}>"
        raise LabelStudioError(f"<Choices name={name!r}> labels {kind} (toName={tag.get('toName')!r}); jaxal classifies "
                               "images: its toName must name an <Image> tag")
    value = target.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelStudioError(f"<Image name={target.get('name')!r}> has value={value!r}; jaxal reads the image URL "
                               "from a task data field, written value=\"$field\"")
    classes = tuple(c.get("alias") or c.get("value") for c in tag.iter() if c.tag.lower() == "choice")
    if len(classes) < 2 or len(set(classes)) != len(classes) or None in classes:
        raise LabelStudioError(f"<Choices name={name!r}> must have at least 2 distinct <Choice value=...> entries; "
                               f"it has {list(classes)}")
    return LabelSpec(name, target.get("name"), value[1:], classes)


# ---- annotations ---------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskLabels:
    labels: dict  # task id -> class, from its newest non-cancelled annotation
    conflicts: list  # task ids whose non-cancelled annotations disagree (the newest counts)
    without_choice: list  # task ids whose newest annotation chose nothing in the tag


def task_labels(tasks: list[dict], spec: LabelSpec) -> TaskLabels:
    """The label of each annotated task. A class outside the config raises LabelStudioError naming
    the tasks."""
    labels, conflicts, without, outside = {}, [], [], []
    for task in tasks:
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            continue
        chosen = [_choice(a, spec) for a in sorted(annotations, key=_annotation_time)]
        newest = chosen[-1]
        if newest is None:
            without.append(task["id"])
            continue
        if newest not in spec.classes:
            outside.append((task["id"], newest))
            continue
        labels[task["id"]] = newest
        if len({c for c in chosen if c is not None}) > 1:
            conflicts.append(task["id"])
    if outside:
        shown = ", ".join(f"task {t}: {c!r}" for t, c in outside[:5])
        raise LabelStudioError(f"{len(outside)} annotations choose a class that is not in <Choices name="
                               f"{spec.from_name!r}> ({', '.join(map(repr, spec.classes))}): {shown}"
                               + (" ..." if len(outside) > 5 else "") + "; correct them or the label config")
    return TaskLabels(labels, conflicts, without)


def _annotation_time(annotation: dict) -> tuple:
    return (annotation.get("updated_at") or annotation.get("created_at") or "", annotation.get("id") or 0)


def _choice(annotation: dict, spec: LabelSpec) -> Optional[str]:
    for region in annotation.get("result") or []:
        if region.get("from_name") == spec.from_name and region.get("type", "choices").lower() == "choices":
            picked = (region.get("value") or {}).get("choices") or []
            if len(picked) > 1:
                return "; ".join(picked)  # not one class: reported as outside the config
            if picked:
                return picked[0]
    return None


# ---- images ----------------------------------------------------------------------------------------


class ImageReader:
    """Task images by their URLs, each downloaded once into `cache` (named by task id and URL hash),
    decoded to the round's size; unreadable ones are skipped and counted."""

    def __init__(self, client: Client, cache: Path, image_size: Optional[int], workers: int = 8):
        self.client, self.cache, self.image_size, self.workers = client, cache, image_size, workers

    def read(self, tasks: list[dict], spec: LabelSpec, keep: dict = None) -> tuple[list, np.ndarray, dict]:
        """(task ids, images (N, H, W, C) uint8, {task id: why unreadable}) of `tasks`, plus the cached
        images of the task ids in `keep` ({id: any}) that are no longer in the project."""
        from concurrent.futures import ThreadPoolExecutor

        from jaxal import folders

        for task in tasks:
            url = (task.get("data") or {}).get(spec.data_key)
            scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
            if scheme in CLOUD_SCHEMES:
                raise LabelStudioError(f"task {task['id']}: its image {url} is in cloud storage ({scheme}://), which "
                                       "jaxal does not read; use uploaded files, a local-files storage or http(s) URLs")
        with ThreadPoolExecutor(self.workers) as pool:
            results = list(pool.map(lambda task: self._pixels(task, spec, folders), tasks))
        ids, arrays, skipped = [], [], {}
        for task, (array, why) in zip(tasks, results):
            if array is None:
                skipped[task["id"]] = why
            else:
                ids.append(task["id"])
                arrays.append(array)
        present = {task["id"] for task in tasks}
        for item in sorted(set(keep or ()) - present):
            files = sorted(f for f in self.cache.glob(f"{item}-*") if not f.name.endswith(".partial"))
            if files:
                ids.append(item)
                arrays.append(folders.decode_image(files[-1].read_bytes(), f"task {item}", self.image_size))
        if not ids:
            raise LabelStudioError(f"none of the {len(tasks)} tasks' images can be read (first: "
                                   f"{next(iter(skipped.values()), 'no tasks')})")
        return ids, folders.stack_images(arrays, [f"task {i}" for i in ids]), skipped

    def _pixels(self, task: dict, spec: LabelSpec, folders) -> tuple[Optional[np.ndarray], str]:
        url = (task.get("data") or {}).get(spec.data_key)
        if not isinstance(url, str) or not url:
            return None, f"no {spec.data_key!r} field in its data"
        if urlsplit(url).scheme.lower() not in ("", "http", "https"):
            return None, f"{url[:60]}: not a path on the server nor an http(s) URL"
        path = self.cache / f"{task['id']}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
        try:
            if path.exists():
                data = path.read_bytes()
            else:
                data = self.client.download(url)
                self.cache.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(path.name + ".partial")
                partial.write_bytes(data)
                os.replace(partial, path)
            return folders.decode_image(data, f"task {task['id']} ({url})", self.image_size), ""
        except (UnreadableImage, ValueError) as error:
            if isinstance(error, LabelStudioError):
                raise
            return None, f"{url}: {error}"


# ---- rankings and predictions -------------------------------------------------------------------


def ranking_scores(unlabeled: list, proposed: list, probabilities: np.ndarray) -> dict:
    """{task id: score} over `unlabelled` (`probabilities` its rows): the proposed batch (best first)
    in (0.5, 1] by rank, the others in [0, 0.5] by the model's predictive entropy over log C, so that
    sorting by score shows the batch first, then the tasks the model is least sure of. (Label Studio
    accepts scores in [0, 1] only: it drops a prediction scored outside, so the two bands share it.)"""
    k = len(proposed)
    scores = {item: 0.5 + 0.5 * (k - rank) / k for rank, item in enumerate(proposed)}
    p = np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=1) / math.log(p.shape[1])
    for item, value in zip(unlabeled, np.clip(entropy, 0.0, 1.0)):
        scores.setdefault(item, 0.5 * float(value))
    return scores


def label_studio_prediction(task_id, label: str, score: Optional[float], spec: LabelSpec, version: str) -> dict:
    """One task's prediction as Label Studio stores it: the label as a pre-annotation, and the score."""
    prediction = {"task": task_id, "model_version": version,
                  "result": [{"from_name": spec.from_name, "to_name": spec.to_name, "type": "choices",
                              "value": {"choices": [label]}}]}
    return prediction if score is None else {**prediction, "score": score}


def read_predictions(workdir: Path) -> Optional[dict]:
    """The latest finished round's predictions.json ({"round", "model_version", "spec", "tasks": {id:
    {"label", "score"}}}), or None before the first round."""
    folders = sorted((Path(workdir) / "learner").glob("round_*/" + PREDICTIONS_FILE))
    return json.loads(folders[-1].read_text()) if folders else None


# ---- rounds ----------------------------------------------------------------------------------------


def read_binding(workdir: Path) -> Optional[dict]:
    path = Path(workdir) / BINDING_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_binding(binding: Optional[dict], project: int, spec: LabelSpec) -> None:
    """The workdir's rounds belong to this project, with this mapping of the label config."""
    if binding is None:
        return
    if binding["project"] != project:
        raise LabelStudioError(f"the workdir holds rounds of project {binding['project']}, not {project}; use another "
                               "workdir")
    saved = binding["spec"]
    if saved != spec.as_json():
        changes = "; ".join(f"{field}: {saved.get(field)!r} then {value!r}" for field, value in spec.as_json().items()
                            if saved.get(field) != value)
        raise LabelStudioError(f"the project's label config changed since the workdir's rounds ({changes}): the "
                               "classes are fixed from the first round on; restore it or start a new workdir")


def project_round(client: Client, project: int, config, *, from_name: Optional[str] = None, publish: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """One annotation round of a Label Studio project (see the module docstring): reads its annotations
    and images, and if some annotations are new since the last round (or there is none yet) trains and
    scores; then writes the round's predictions into the project (unless `publish` is False: the ML
    backend lets Label Studio ask for them). Returns a summary; LabelStudioError/AnnotationError on bad
    input, before the workdir is written."""
    from jaxal import results
    from jaxal.learner import ActiveLearner, round_folder

    workdir = Path(config.workdir or "al")
    spec = label_spec(client.project(project).get("label_config") or "", from_name)
    binding = read_binding(workdir)
    check_binding(binding, project, spec)
    tasks = list(client.tasks(project))
    found = task_labels(tasks, spec)
    learner = ActiveLearner(classes=spec.classes, workdir=workdir / "learner", config=config, log=log)
    known = learner.labels
    ids, images, skipped = ImageReader(client, workdir / "images", config.image_size).read(tasks, spec, keep=known)
    readable = set(ids)
    new = {t: label for t, label in found.labels.items() if t not in known and t in readable}
    changed = sorted(t for t, label in found.labels.items() if t in known and known[t] != label)
    report = _report(tasks, found, known, changed, skipped, binding, readable)
    for line in report:
        log(line)
    if learner.rounds and not new:
        number = learner.rounds[-1]["round"]
        log(f"no new annotations since round {number}" + ("" if binding and binding.get("published") == number
                                                          else "; finishing it"))
    else:
        learner.tell(list(new), list(new.values()))
        number = learner.ask(ids, images, k=config.budget).round
    folder = workdir / "learner" / round_folder(number)
    if not (folder / PREDICTIONS_FILE).exists():
        table = _round_predictions(learner, number, ids, images, spec)
        results.write_atomic(folder / PREDICTIONS_FILE, json.dumps(table, indent=0))
    table = json.loads((folder / PREDICTIONS_FILE).read_text())
    version = table["model_version"]
    published = binding is not None and binding.get("published") == number
    if publish and not published:
        predictions = [label_studio_prediction(int(t), row["label"], row["score"], spec, version)
                       for t, row in table["tasks"].items() if row["score"] is not None and int(t) in readable]
        client.import_predictions(project, predictions)
        client.set_model_version(project, version)
        log(f"round {number}: wrote {len(predictions)} predictions ({version}) into project {project}; sort its "
            "Data Manager by prediction score: the proposed batch comes first")
    binding = {"url": client.url, "project": project, "spec": spec.as_json(), "tasks": sorted(t["id"] for t in tasks),
               "published": number if publish or published else (binding or {}).get("published")}
    results.write_atomic(workdir / BINDING_FILE, json.dumps(binding, indent=1))
    summary = {"round": number, "model_version": version, "proposed": table["proposed"],
               "labeled": len(learner.labels), "pool": len(ids), "skipped_images": len(skipped)}
    log(json.dumps(summary))
    return summary


def _round_predictions(learner, number: int, ids: list, images: np.ndarray, spec: LabelSpec) -> dict:
    """The round's label for every task of its pool, and the ranking score of the unlabelled ones."""
    info = learner.rounds[number]
    probabilities = learner.predict(ids, images)
    labeled = learner.labels
    unlabeled = [i for i, item in enumerate(ids) if item not in labeled]
    proposed = [item for item in info["proposal"]["ids"] if item in set(ids)]
    scores = ranking_scores([ids[i] for i in unlabeled], proposed, probabilities[unlabeled])
    labels = np.argmax(probabilities, axis=1)
    return {"round": number, "model_version": model_version(number), "spec": spec.as_json(), "proposed": proposed,
            "tasks": {str(item): {"label": spec.classes[int(labels[row])], "score": scores.get(item)}
                      for row, item in enumerate(ids)}}


def _report(tasks, found: TaskLabels, known: dict, changed: list, skipped: dict, binding, readable: set) -> list[str]:
    """Warnings about what the round leaves out or keeps, each with how many tasks and a few ids."""
    def few(items):
        items = sorted(items)
        return ", ".join(map(str, items[:5])) + (" ..." if len(items) > 5 else "")

    present = {task["id"] for task in tasks}
    lines = []
    if binding is not None:
        before = set(binding["tasks"])
        added, removed = present - before, before - present
        if added or removed:
            lines.append(f"since the last round {len(added)} tasks were added to the project (they join the pool) and "
                         f"{len(removed)} deleted (they leave it" + (", except the labelled ones, from the image cache"
                                                                       if removed & set(known) else "") + ")")
    if skipped:
        lines.append(f"warning: skipped {len(skipped)} tasks whose image cannot be read ({few(skipped)}; first: "
                     f"{next(iter(skipped.values()))})")
    if found.conflicts:
        lines.append(f"warning: {len(found.conflicts)} tasks have annotations that disagree ({few(found.conflicts)}); "
                     "the newest counts")
    if found.without_choice:
        lines.append(f"warning: {len(found.without_choice)} tasks' newest annotation chooses no class "
                     f"({few(found.without_choice)}); they count as unannotated")
    if changed:
        lines.append(f"warning: {len(changed)} tasks' annotations changed after a round trained on them "
                     f"({few(changed)}); jaxal keeps the label it trained on (start a new workdir to retrain)")
    lost = [t for t in known if t in present and t not in found.labels]
    if lost:
        lines.append(f"warning: {len(lost)} tasks lost their annotation after a round trained on it ({few(lost)}); "
                     "jaxal keeps the label it trained on")
    unreadable = [t for t in found.labels if t not in readable and t not in known]
    if unreadable:
        lines.append(f"warning: {len(unreadable)} annotated tasks are left out: their image cannot be read")
    return lines
