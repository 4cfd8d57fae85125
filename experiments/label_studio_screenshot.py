"""The README's screenshot: a Label Studio project's Data Manager sorted by jaxal's prediction scores.

    python experiments/label_studio_screenshot.py --label-studio http://127.0.0.1:8080 --project 1 \\
        --email you@example.com --password ... --out docs/label_studio_ranked.png

Run it after a round (`python -m jaxal.query --label-studio ...`), outside CI, with Debian's `chromium`.
Headless chromium has no login, so a small proxy on 127.0.0.1 logs in once and adds the session cookie
to every request the page makes; the Data Manager tab shown is a view sorted by prediction score,
descending (created here through the same API the UI uses).
"""

from __future__ import annotations

import argparse
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


# Data Manager columns left out of the picture, so that the image, the score, the model version and the
# predicted label fit.
HIDDEN = ("inner_id", "completed_at", "total_annotations", "cancelled_annotations", "total_predictions",
          "annotators", "annotations_results", "annotations_ids", "storage_filename", "file_upload", "created_at",
          "updated_at", "updated_by", "avg_lead_time", "draft_exists", "comment_count", "unresolved_comment_count",
          "last_comment_updated_at", "comment_authors")


def login(url: str, email: str, password: str) -> requests.Session:
    session = requests.Session()
    session.get(url + "user/login/", timeout=30)
    answer = session.post(url + "user/login/", timeout=30, headers={"Referer": url + "user/login/"},
                          data={"email": email, "password": password,
                                "csrfmiddlewaretoken": session.cookies.get("csrftoken", "")})
    if "sessionid" not in session.cookies:
        raise SystemExit(f"login failed: HTTP {answer.status_code}")
    return session


def proxy(url: str, session: requests.Session) -> ThreadingHTTPServer:
    class Forward(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.forward()

        def do_POST(self):  # noqa: N802
            self.forward()

        def do_PATCH(self):  # noqa: N802
            self.forward()

        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {name: self.headers[name] for name in ("Content-Type",) if self.headers.get(name)}
            headers.update({"X-CSRFToken": session.cookies.get("csrftoken", ""), "Referer": url})
            answer = session.request(self.command, url + self.path.lstrip("/"), data=body or None, headers=headers,
                                     timeout=60, allow_redirects=False)
            body = answer.content
            self.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-studio", required=True)
    parser.add_argument("--project", type=int, required=True)
    parser.add_argument("--email", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--out", default="docs/label_studio_ranked.png")
    args = parser.parse_args()
    url = args.label_studio.rstrip("/") + "/"
    session = login(url, args.email, args.password)
    csrf = {"X-CSRFToken": session.cookies.get("csrftoken", ""), "Referer": url}
    view = session.post(url + "api/dm/views/", headers=csrf, timeout=30, json={
        "project": args.project, "data": {"title": "by jaxal's score", "ordering": ["-tasks:predictions_score"],
                                          "hiddenColumns": {"explore": [f"tasks:{name}" for name in HIDDEN],
                                                            "labeling": []}}}).json()
    server = proxy(url, session)
    page = f"http://127.0.0.1:{server.server_address[1]}/projects/{args.project}/data?tab={view['id']}"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1100,760", "--virtual-time-budget=20000", f"--screenshot={args.out}", page],
                   check=True, timeout=180)
    server.shutdown()
    print(f"wrote {args.out} ({page})")


if __name__ == "__main__":
    main()
