"""A loopback stand-in for the three Hugging Face hub endpoints an upload of small files uses (test support).

`POST /api/repos/create`, `POST /api/models/ORG/NAME/preupload/REV` (every file answered "regular", so no LFS
or Xet transfer follows) and `POST /api/models/ORG/NAME/commit/REV` (the ndjson commit, files inline in
base64). Committed files land in `HubStub.repos[repo_id][path]`; a request without the expected bearer token
gets 401. Point `huggingface_hub` at it with `HfApi(endpoint=stub.url)` (or `constants.ENDPOINT`).
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet tests; never echo headers
                pass

            def _reply(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 - the http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {stub.token}":
                    return self._reply(401, {"error": "Invalid credentials"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    body = json.loads(raw)
                    repo = f"{body['organization']}/{body['name']}"
                    stub.repos.setdefault(repo, {})
                    stub.private[repo] = body.get("visibility") == "private" or bool(body.get("private"))
                    return self._reply(200, {"url": f"{stub.url}/{repo}", "name": repo})
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
                    repo = f"{parts[2]}/{parts[3]}"
                    if repo not in stub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    if parts[4] == "preupload":
                        files = json.loads(raw)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
                    for line in raw.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            stub.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._reply(200, {"commitUrl": f"{stub.url}/{repo}/commit/0001", "commitOid": "0001"})
                return self._reply(404, {"error": f"no such endpoint {self.path}"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
