"""Loopback servers speaking the Gemini (generateContent, Batch API) and OpenAI chat-completions
protocols, for tests and benchmarks. Not a mock of the client: the real SDK/HTTP client talks to
them over TCP on 127.0.0.1.

- Counts requests per prompt (the last user message) so tests can prove what was (re)sent.
- Scripted faults per prompt, consumed one per attempt: "ok", "400" (a permanent refusal), "429[:seconds]"
  (Retry-After header
  and, for Gemini, a google.rpc.RetryInfo detail), "500", "503", "slow:seconds" (sleep, then
  answer), "leak" (a 400 whose message echoes the caller's key), "malformed" (HTTP 200 with
  broken JSON), "safety" (a blocked candidate), "empty" (no candidates/choices), "drop" (close
  the connection without a response).
- Runs in-process in a thread (`LoopbackServer(...).start()`) or as a subprocess
  (`python -m undo_jax.testing.servers --protocol gemini`, prints {"port": N}); the
  counters are then read over HTTP with `fetch_stats(base_url)`.

The reply to a prompt is deterministic: `reply_for(prompt)` unless `replies` overrides it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def reply_for(prompt: str) -> str:
    return f"Echo: {prompt}"


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


class _State:
    def __init__(self, latency: float, api_key: str | None, script: dict[str, list[str]], replies: dict[str, str]):
        self.latency = latency
        self.api_key = api_key
        self.script = {k: list(v) for k, v in script.items()}
        self.replies = dict(replies)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # every request received, per prompt
        self.completed: Counter[str] = Counter()  # successful answers sent, per prompt
        self.faults: Counter[str] = Counter()  # faults served, by kind
        self.auth_failures = 0
        self.batches: dict[str, dict[str, Any]] = {}

    def next_action(self, prompt: str) -> str:
        with self.lock:
            self.counts[prompt] += 1
            queue = self.script.get(prompt)
            action = queue.pop(0) if queue else "ok"
            if action != "ok":
                self.faults[action.split(":")[0]] += 1
            return action

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "counts": dict(self.counts),
                "completed": dict(self.completed),
                "faults": dict(self.faults),
                "total": sum(self.counts.values()),
                "total_completed": sum(self.completed.values()),
                "auth_failures": self.auth_failures,
                "batches": len(self.batches),
            }


def _gemini_prompt(body: dict) -> str:
    for content in reversed(body.get("contents") or []):
        if content.get("role", "user") == "user":
            return "".join(p.get("text", "") for p in content.get("parts", []))
    return ""


def _gemini_answer(state: _State, body: dict, prompt: str) -> dict:
    text = state.replies.get(prompt, reply_for(prompt))
    cfg = body.get("generationConfig") or {}
    finish = "STOP"
    words = text.split()
    max_tokens = cfg.get("maxOutputTokens")
    if max_tokens is not None and len(words) > int(max_tokens):
        text, finish = " ".join(words[: int(max_tokens)]), "MAX_TOKENS"
    system = "".join(p.get("text", "") for p in (body.get("systemInstruction") or {}).get("parts", []))
    n_in = _tokens(system) + sum(
        _tokens("".join(p.get("text", "") for p in c.get("parts", []))) for c in body.get("contents") or []
    )
    return {
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": finish, "index": 0}],
        "usageMetadata": {
            "promptTokenCount": n_in,
            "candidatesTokenCount": _tokens(text),
            "totalTokenCount": n_in + _tokens(text),
        },
        "modelVersion": "loopback",
    }


def _openai_prompt(body: dict) -> str:
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [])
    return ""


def _openai_answer(state: _State, body: dict, prompt: str) -> dict:
    text = state.replies.get(prompt, reply_for(prompt))
    finish = "stop"
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    words = text.split()
    if max_tokens is not None and len(words) > int(max_tokens):
        text, finish = " ".join(words[: int(max_tokens)]), "length"
    n_in = sum(_tokens(str(m.get("content", ""))) for m in body.get("messages") or [])
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": n_in, "completion_tokens": _tokens(text), "total_tokens": n_in + _tokens(text)},
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "undo-loopback/1"
    state: _State
    protocol: str

    def log_message(self, fmt, *args):  # keep test output clean; never echo headers
        pass

    def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None):
        body = raw if raw is not None else json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _read_json(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n else b""
        return json.loads(data) if data else {}

    def _authorized(self) -> bool:
        want = self.state.api_key
        if not want:
            return True
        got = self.headers.get("x-goog-api-key") or ""
        auth = self.headers.get("Authorization") or ""
        if got == want or auth == f"Bearer {want}":
            return True
        with self.state.lock:
            self.state.auth_failures += 1
        self._send(401, {"error": {"code": 401, "message": "API key not valid.", "status": "UNAUTHENTICATED"}})
        return False

    # Control endpoints (used in subprocess mode).
    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/_stats":
            return self._send(200, self.state.stats())
        m = re.fullmatch(r"/v1[a-z0-9]*/batches/([^/]+)", path)
        if m and self.protocol == "gemini":
            if not self._authorized():
                return None
            return self._batch_get(m.group(1))
        return self._send(404, {"error": {"code": 404, "message": f"no route {path}", "status": "NOT_FOUND"}})

    def do_POST(self):
        path = self.path.split("?")[0]
        try:
            body = self._read_json()
        except json.JSONDecodeError:
            return self._send(400, {"error": {"code": 400, "message": "bad JSON", "status": "INVALID_ARGUMENT"}})
        if path == "/_script":
            with self.state.lock:
                for k, v in body.get("script", {}).items():
                    self.state.script[k] = list(v)
                self.state.replies.update(body.get("replies", {}))
                if "latency" in body:
                    self.state.latency = float(body["latency"])
            return self._send(200, {"ok": True})
        if not self._authorized():
            return None
        if self.protocol == "gemini":
            m = re.fullmatch(r"/v1[a-z0-9]*/models/([^/:]+):(generateContent|batchGenerateContent)", path)
            if m and m.group(2) == "generateContent":
                return self._answer(body, _gemini_prompt(body), _gemini_answer)
            if m:
                return self._batch_create(m.group(1), body)
        elif self.protocol == "openai" and path in ("/v1/chat/completions", "/chat/completions"):
            return self._answer(body, _openai_prompt(body), _openai_answer)
        return self._send(404, {"error": {"code": 404, "message": f"no route {path}", "status": "NOT_FOUND"}})

    def _answer(self, body: dict, prompt: str, answer_fn):
        action = self.state.next_action(prompt)
        kind, _, arg = action.partition(":")
        if self.state.latency:
            time.sleep(self.state.latency)
        gemini = self.protocol == "gemini"
        if kind == "429":
            delay = arg or "1"
            err = {
                "error": {
                    "code": 429,
                    "message": "Resource has been exhausted (e.g. check quota).",
                    "status": "RESOURCE_EXHAUSTED",
                    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay}s"}],
                }
            }
            return self._send(429, err, headers={"Retry-After": delay})
        if kind in ("500", "503"):
            status = "INTERNAL" if kind == "500" else "UNAVAILABLE"
            return self._send(int(kind), {"error": {"code": int(kind), "message": "scripted fault", "status": status}})
        if kind == "400":  # a permanent refusal: clients do not retry it
            refusal = {"code": 400, "message": "scripted refusal", "status": "INVALID_ARGUMENT"}
            return self._send(400, {"error": refusal})
        if kind == "leak":
            key = self.headers.get("x-goog-api-key") or self.headers.get("Authorization") or ""
            msg = f"bad request from {key} at https://example.invalid/v1beta/models/x:generateContent?key={key}"
            return self._send(400, {"error": {"code": 400, "message": msg, "status": "INVALID_ARGUMENT"}})
        if kind == "slow":
            time.sleep(float(arg or 5))
        if kind == "malformed":
            return self._send(200, None, raw=b'{"candidates": [{"content": {"parts": [{"text": "trunc')
        if kind == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        if kind == "safety":
            if gemini:
                payload = {
                    "candidates": [
                        {
                            "finishReason": "SAFETY",
                            "index": 0,
                            "safetyRatings": [
                                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
                            ],
                        }
                    ],
                    "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 3},
                }
            else:
                payload = {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": None},
                            "finish_reason": "content_filter",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3},
                }
            return self._send(200, payload)
        if kind == "empty":
            if gemini:
                payload = {"promptFeedback": {"blockReason": "OTHER"}, "usageMetadata": {"promptTokenCount": 3}}
            else:
                payload = {"id": "x", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 3}}
            return self._send(200, payload)
        payload = answer_fn(self.state, body, prompt)
        with self.state.lock:
            self.state.completed[prompt] += 1
        return self._send(200, payload)

    # Gemini Batch API: create returns an operation whose metadata is the batch; it runs on first poll.
    def _batch_create(self, model: str, body: dict):
        batch = body.get("batch") or {}
        reqs = ((batch.get("inputConfig") or {}).get("requests") or {}).get("requests") or []
        with self.state.lock:
            name = f"batches/loopback{len(self.state.batches) + 1}"
            self.state.batches[name] = {
                "model": f"models/{model}",
                "requests": reqs,
                "polls": 0,
                "display": batch.get("displayName", ""),
                "output": None,
            }
        return self._send(200, self._batch_view(name))

    def _batch_view(self, name: str) -> dict:
        b = self.state.batches[name]
        state = (
            "BATCH_STATE_PENDING"
            if b["output"] is None and b["polls"] == 0
            else ("BATCH_STATE_RUNNING" if b["output"] is None else "BATCH_STATE_SUCCEEDED")
        )
        meta = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "name": name,
            "model": b["model"],
            "displayName": b["display"],
            "state": state,
            "createTime": "2026-01-01T00:00:00Z",
            "updateTime": "2026-01-01T00:00:00Z",
        }
        if b["output"] is not None:
            meta["output"] = {"inlinedResponses": {"inlinedResponses": b["output"]}}
        return {"name": name, "metadata": meta, "done": b["output"] is not None}

    def _batch_get(self, batch_id: str):
        name = f"batches/{batch_id}"
        if name not in self.state.batches:
            return self._send(404, {"error": {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}})
        b = self.state.batches[name]
        b["polls"] += 1
        if b["output"] is None and b["polls"] >= 2:  # pending, then running, then done
            out = []
            for item in b["requests"]:
                req = item.get("request") or {}
                prompt = _gemini_prompt(req)
                kind = self.state.next_action(prompt).split(":")[0]
                entry: dict[str, Any] = {"metadata": item.get("metadata") or {}}
                if kind in ("429", "500", "503"):
                    entry["error"] = {"code": int(kind), "message": "scripted fault"}
                elif kind == "safety":
                    entry["response"] = {"candidates": [{"finishReason": "SAFETY", "index": 0}]}
                elif kind == "empty":
                    entry["response"] = {"promptFeedback": {"blockReason": "OTHER"}}
                else:
                    entry["response"] = _gemini_answer(self.state, req, prompt)
                    with self.state.lock:
                        self.state.completed[prompt] += 1
                out.append(entry)
            b["output"] = out
        return self._send(200, self._batch_view(name))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog (5) drops SYNs under concurrency: 1 s connect stalls


class LoopbackServer:
    """A Gemini- or OpenAI-protocol HTTP server on 127.0.0.1 in a background thread."""

    def __init__(
        self,
        protocol: str = "gemini",
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        script: dict[str, list[str]] | None = None,
        replies: dict[str, str] | None = None,
        port: int = 0,
    ):
        if protocol not in ("gemini", "openai"):
            raise ValueError(f"LoopbackServer: protocol must be 'gemini' or 'openai', got {protocol!r}")
        self.protocol = protocol
        self.state = _State(latency, api_key, script or {}, replies or {})
        handler = type("Handler", (_Handler,), {"state": self.state, "protocol": protocol})
        self.httpd = _Server(("127.0.0.1", port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """Gemini: the SDK's base_url. OpenAI: the API root including /v1."""
        root = f"http://127.0.0.1:{self.port}"
        return root if self.protocol == "gemini" else root + "/v1"

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="loopback-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def set_script(self, script: dict[str, list[str]]) -> None:
        with self.state.lock:
            for k, v in script.items():
                self.state.script[k] = list(v)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server_subprocess(
    protocol: str = "gemini",
    *,
    latency: float = 0.0,
    api_key_env: str | None = None,
    script: dict[str, list[str]] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start a server in a child process; returns (process, base_url). The key, if any, is read by
    the child from the environment variable `api_key_env` (never passed on the command line)."""
    cmd = [sys.executable, "-m", "undo_jax.testing.servers", "--protocol", protocol, "--latency", str(latency)]
    if api_key_env:
        cmd += ["--api-key-env", api_key_env]
    if script:
        cmd += ["--script", json.dumps(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    try:
        port = int(json.loads(line)["port"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        proc.kill()
        raise RuntimeError(f"loopback server subprocess did not report its port (got {line!r})") from e
    root = f"http://127.0.0.1:{port}"
    return proc, (root if protocol == "gemini" else root + "/v1")


def _root(base_url: str) -> str:
    return re.sub(r"/v1/?$", "", base_url.rstrip("/"))


def fetch_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(_root(base_url) + "/_stats", timeout=10) as r:
        return json.loads(r.read())


def post_script(base_url: str, script: dict[str, list[str]] | None = None, *, latency: float | None = None) -> None:
    payload: dict[str, Any] = {"script": script or {}}
    if latency is not None:
        payload["latency"] = latency
    req = urllib.request.Request(
        _root(base_url) + "/_script",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10):
        pass


def main(argv: list[str] | None = None) -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=["gemini", "openai"], default="gemini")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the key to require")
    p.add_argument("--script", default=None, help="JSON {prompt: [fault, ...]}")
    a = p.parse_args(argv)
    key = os.environ.get(a.api_key_env) if a.api_key_env else None
    server = LoopbackServer(
        a.protocol, latency=a.latency, api_key=key, script=json.loads(a.script) if a.script else None, port=a.port
    )
    print(json.dumps({"port": server.port}), flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
