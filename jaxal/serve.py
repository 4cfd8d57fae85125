"""Command line: jaxal as a Label Studio ML backend, retraining and re-ranking as annotators work.

    LABEL_STUDIO_API_KEY=... python -m jaxal.serve --label-studio http://localhost:8080 --project 1 \\
        --workdir al/ --strategy ent_gn --budget 100 --port 9090

then, in the project's Settings > Model, connect the model at http://localhost:9090. Label Studio calls:
  - GET /health and POST /setup: the backend is up; /setup answers the latest finished round's
    model_version (`jaxal-round-NNN`), which Label Studio stores with the predictions it asks for;
  - POST /webhook (ANNOTATION_CREATED / UPDATED / DELETED, START_TRAINING; and POST /train, the older
    form of START_TRAINING): starts a round in the background, the same round as `python -m jaxal.query
    --label-studio` (`jaxal.labelstudio.project_round`: it reads the annotations and images with the URL and
    key given here), except that it writes no predictions itself. One round runs at a time; events that
    come in during one start one more round after it. When a round finishes, jaxal has Label Studio
    retrieve its predictions (the Data Manager's "Retrieve Predictions" on every task: Label Studio
    calls /setup and /predict) and sets the project's model_version to the round's, so that sorting the
    Data Manager by prediction score ranks by this round;
  - POST /predict: each task's prediction from the latest finished round (the model's label as a
    pre-annotation and the score that puts the round's proposed batch first: `jaxal.labelstudio`); a task
    the round did not see gets an empty result. It never waits for a round in progress.
Label Studio also asks for predictions when an annotator opens a task.

Every flag of `python -m jaxal.query` that sets the round (--strategy, --budget, --epochs, --model,
--image_size, ...) is here too, from the "annotation" preset. Bad flags, an unreachable server or a
rejected key end with a message and exit status 2 before it listens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

from jaxal import cli

TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
                   "ANNOTATION_DELETED", "START_TRAINING")
UNTRAINED = "jaxal-untrained"


class Backend:
    """What the routes share: the round in the background and the latest finished round's predictions."""

    def __init__(self, client, project: int, config, from_name: Optional[str] = None,
                 log: Callable[[str], None] = print):
        from jaxal import labelstudio

        self.client, self.project, self.config, self.from_name, self.log = client, project, config, from_name, log
        self.workdir = Path(config.workdir or "al")
        self.table = labelstudio.read_predictions(self.workdir)
        self.last_error: Optional[str] = None
        self.rounds_run = 0
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._again = False

    @property
    def model_version(self) -> str:
        table = self.table
        return table["model_version"] if table else UNTRAINED

    @property
    def training(self) -> bool:
        with self._lock:
            return self._thread is not None

    def start_round(self) -> bool:
        """Starts a round in the background, or one more after the one running; True if it started now."""
        with self._lock:
            if self._thread is not None:
                self._again = True
                return False
            self._thread = threading.Thread(target=self._rounds, name="jaxal-round", daemon=True)
            self._thread.start()
            return True

    def wait(self, timeout: Optional[float] = None) -> None:
        """Until no round runs (for tests and a clean shutdown)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _rounds(self) -> None:
        from jaxal import labelstudio

        while True:
            try:
                summary = labelstudio.project_round(self.client, self.project, self.config, from_name=self.from_name,
                                                publish=False, log=self.log)
                self.table = labelstudio.read_predictions(self.workdir)
                self.last_error = None
                self.log(f"round {summary['round']} ready: /predict answers with {self.model_version}")
                self._rerank()
            except Exception as error:  # noqa: BLE001 -- a failed round must not stop the backend; it is reported
                self.last_error = f"{type(error).__name__}: {error}"
                self.log(f"round not run: {self.last_error}")
            with self._lock:
                self.rounds_run += 1
                if not self._again:
                    self._thread = None
                    return
                self._again = False

    def _rerank(self) -> None:
        """Has Label Studio fetch the new round's predictions (it calls /setup, then /predict) and sort by
        them: its project's model_version may only name a version it has predictions of."""
        from jaxal import labelstudio

        try:
            self.client.retrieve_predictions(self.project)
            self.client.set_model_version(self.project, self.model_version)
        except labelstudio.LabelStudioError as error:
            self.log(f"warning: the project does not rank by {self.model_version} yet ({error}); is this backend "
                     "connected in its Settings > Model?")

    # ---- the routes -------------------------------------------------------------------------------------

    def health(self) -> dict:
        return {"status": "UP", "model_class": "jaxal", "model_version": self.model_version,
                "training": self.training, "last_error": self.last_error}

    def setup(self, body: dict) -> tuple[int, dict]:
        project = str(body.get("project", "")).split(".")[0]
        if project and project != str(self.project):
            return 400, {"error": f"this jaxal backend serves project {self.project}, not {project}"}
        return 200, {"model_version": self.model_version}

    def predict(self, body: dict) -> dict:
        from jaxal import labelstudio

        table = self.table  # one read: a round finishing meanwhile changes nothing for this answer
        version = table["model_version"] if table else UNTRAINED
        spec = labelstudio.LabelSpec(**{**table["spec"], "classes": tuple(table["spec"]["classes"])}) if table else None
        results = []
        for task in body.get("tasks") or []:
            row = table["tasks"].get(str(task.get("id"))) if table else None
            if row is None:
                results.append({"result": [], "model_version": version})
                continue
            prediction = labelstudio.label_studio_prediction(task.get("id"), row["label"], row["score"], spec, version)
            prediction.pop("task")
            results.append(prediction)
        return {"results": results, "model_version": version}

    def webhook(self, body: dict) -> tuple[int, dict]:
        action = body.get("action")
        project = (body.get("project") or {}).get("id") if isinstance(body.get("project"), dict) else None
        if action not in TRAINING_EVENTS or (project is not None and project != self.project):
            return 200, {"status": "ignored", "action": action}
        started = self.start_round()
        return 201, {"status": "training started" if started else "a round runs: another follows it"}


def make_handler(backend: Backend):
    class Handler(BaseHTTPRequestHandler):
        server_version = "jaxal"

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Optional[dict]:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return None
            return body if isinstance(body, dict) else None

        def do_GET(self):  # noqa: N802 -- http.server's names
            path = self.path.split("?")[0].rstrip("/")
            if path in ("", "/health"):
                self._answer(200, backend.health())
            elif path == "/versions":
                self._answer(200, {"versions": [backend.model_version]})
            else:
                self._answer(404, {"error": f"no route GET {path}"})

        def do_POST(self):  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            body = self._body()
            if body is None:
                self._answer(400, {"error": "the body must be a JSON object"})
            elif path == "/setup":
                self._answer(*backend.setup(body))
            elif path == "/predict":
                self._answer(200, backend.predict(body))
            elif path == "/webhook":
                self._answer(*backend.webhook(body))
            elif path == "/train":
                self._answer(*backend.webhook({"action": "START_TRAINING"}))
            else:
                self._answer(404, {"error": f"no route POST {path}"})

        def log_message(self, format, *args):  # request lines only, never bodies (/setup carries a token)
            backend.log(f"{self.address_string()} {format % args}")

    return Handler


def make_server(backend: Backend, host: str = "127.0.0.1", port: int = 9090) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(backend))
    server.daemon_threads = True
    return server


def build_parser() -> argparse.ArgumentParser:
    parser = cli.config_parser(
        "python -m jaxal.serve", "jaxal as a Label Studio ML backend (see the module docstring of jaxal.serve).",
        default_preset="annotation",
        epilog="--budget is the number of tasks each round proposes; the key comes from $LABEL_STUDIO_API_KEY.")
    group = parser.add_argument_group("Label Studio")
    group.add_argument("--label-studio", "--label_studio", dest="label_studio", metavar="URL", required=True,
                       help="the Label Studio server, e.g. http://localhost:8080 (jaxal reads annotations and images there)")
    group.add_argument("--project", type=int, required=True, help="the project id")
    group.add_argument("--from-name", "--from_name", dest="from_name", help="the <Choices> tag, when there are several")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=int, default=9090, help="port to listen on")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    servers = []
    held = contextlib.ExitStack()  # the workdir's lock, held while serving: a jaxal.query round would mix in

    def start(config):
        from jaxal import labelstudio, workdir as workdir_lock

        held.enter_context(workdir_lock.hold(Path(config.workdir or "al")))
        client = labelstudio.Client(args.label_studio, labelstudio.api_key())
        labelstudio.label_spec(client.project(args.project).get("label_config") or "", args.from_name)
        backend = Backend(client, args.project, config, args.from_name)
        try:
            servers.append(make_server(backend, args.host, args.port))
        except OSError as error:
            raise labelstudio.LabelStudioError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
        print(f"jaxal ML backend for project {args.project} on http://{args.host}:{args.port} ({backend.model_version}); "
              "connect it in the project's Settings > Model", flush=True)

    with held:
        status = cli.run_command(args, start)
        if status != 0:
            return status
        try:
            servers[0].serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            servers[0].server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
