"""A local OpenAI-compatible HTTP server for tests (stdlib only, 127.0.0.1, a free port).

Usage::

    from openai_server import OpenAITestServer, Reply   # tests/ is on sys.path (pytest rootdir conftest)

    with OpenAITestServer(handler=lambda req: "refuse") as server:   # or the `openai_server` fixture
        backend = OpenAICompatibleBackend(server.url, "test-model")
        ...
        server.requests[-1].body["messages"]     # every request the server got, in order

What the server answers, for ``POST /v1/chat/completions`` and ``POST /v1/completions``:

1. the next item of the queue, if any (``server.enqueue(item, ...)``; each item answers one request);
2. else ``handler(request)`` if a handler was given (``server.handler = ...`` works too);
3. else the text ``"ok"``.

An item (or a handler's return value) is one of:

* ``str`` -- every one of the ``n`` choices has this text;
* ``list[str]`` -- one choice per text (the server does not pad it to ``n``: tests of servers that
  ignore ``n`` use this);
* ``dict`` -- sent as the JSON body as it is (a full response, or something malformed);
* :class:`Reply` -- full control: HTTP ``status``, a JSON ``json`` body or a ``raw`` body (bytes or
  str, e.g. broken JSON), extra ``headers`` (e.g. ``{"Retry-After": "0"}``), a ``delay`` in
  seconds before answering, or ``drop=True`` to close the connection without a reply;
  ``trickle=SECONDS`` sends the whole reply (status line and headers included) one byte every
  SECONDS; ``flood=N`` answers a valid reply whose one choice holds N bytes of text, streamed in
  64 KiB chunks without a Content-Length (``declare_length=True`` declares it). Both stop as soon
  as the client hangs up or the server stops;
* an ``Exception`` instance -- answered with HTTP 500 and the exception's text.

A handler gets a :class:`RecordedRequest` (``path``, ``body`` as parsed JSON, ``headers``) and may
be called from several threads at once. ``server.requests`` records every request (also those to
unknown paths, which get a 404). Responses follow the OpenAI format (``choices[i].message.content``
for chat, ``choices[i].text`` for completions, ``usage``, ``model``, ``id``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass
class RecordedRequest:
    path: str
    body: Any
    headers: dict[str, str]

    @property
    def n(self) -> int:
        return int((self.body or {}).get("n") or 1) if isinstance(self.body, dict) else 1

    @property
    def is_chat(self) -> bool:
        return self.path.split("?", 1)[0] == CHAT_PATH

    def last_user_text(self) -> str:
        """The text of the last user message (chat) or the prompt (completions)."""
        if not isinstance(self.body, dict):
            return ""
        if "prompt" in self.body:
            return str(self.body["prompt"])
        for m in reversed(self.body.get("messages", [])):
            if m.get("role") == "user":
                c = m.get("content")
                return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if p.get("type") == "text")
        return ""


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    raw: bytes | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    trickle: float = 0.0
    flood: int = 0
    declare_length: bool = False


def openai_response(texts: list[str], chat: bool, model: str = "test-model") -> dict:
    """A response in the OpenAI format with one choice per text."""
    if chat:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
            for i, t in enumerate(texts)
        ]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None} for i, t in enumerate(texts)]
        obj = "text_completion"
    return {
        "id": "test-" + str(time.monotonic_ns()),
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": 1, "completion_tokens": sum(len(t.split()) for t in texts), "total_tokens": 1},
    }


class OpenAITestServer:
    def __init__(self, handler: Callable[[RecordedRequest], Any] | None = None, responses: list | None = None):
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        self._queue: deque = deque(responses or [])
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- control -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43121`` (append ``/v1`` or not: the backend takes both)."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def enqueue(self, *items: Any) -> None:
        with self._lock:
            self._queue.extend(items)

    def start(self) -> "OpenAITestServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", "replace")
                req = RecordedRequest(self.path, body, {k: v for k, v in self.headers.items()})
                with server._lock:
                    server.requests.append(req)
                if self.path.split("?", 1)[0] not in (CHAT_PATH, COMPLETIONS_PATH):  # a query string is fine
                    return self._send(Reply(status=404, json={"error": {"message": f"no route {self.path}"}}))
                with server._lock:
                    item = server._queue.popleft() if server._queue else None
                if item is None:
                    try:
                        item = server.handler(req) if server.handler is not None else "ok"
                    except Exception as exc:  # a broken handler is a 500, and the test sees it
                        item = exc
                self._send(server._to_reply(item, req))

            def _send(self, reply: Reply):
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.flood:
                    return self._flood(reply)
                if reply.trickle:
                    return self._trickle(reply)
                if reply.drop:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass
                    return
                if reply.raw is not None:
                    data = reply.raw.encode("utf-8") if isinstance(reply.raw, str) else reply.raw
                else:
                    data = json.dumps(reply.json).encode("utf-8")
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _flood(self, reply: Reply):
                head, tail = json.dumps(openai_response(["\x00"], True)).encode().split(b"\\u0000")
                total = len(head) + reply.flood + len(tail)
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                if reply.declare_length:
                    self.send_header("Content-Length", str(total))
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                chunk, left = b"x" * 65536, reply.flood
                try:
                    self.wfile.write(head)
                    while left > 0 and not server._stopping.is_set():
                        self.wfile.write(chunk[: min(left, len(chunk))])
                        left -= len(chunk)
                    self.wfile.write(tail)
                except OSError:  # the client hung up: what a size cap does
                    pass

            def _trickle(self, reply: Reply):
                data = json.dumps(reply.json if reply.json is not None else openai_response(["ok"], True)).encode()
                head = f"HTTP/1.1 {reply.status} OK\r\nContent-Type: application/json\r\n"
                head += f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                self.close_connection = True
                try:
                    for byte in head.encode() + data:
                        if server._stopping.wait(reply.trickle):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                except OSError:  # the client hung up: what a deadline does
                    pass

        self._stopping.clear()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- responses -----------------------------------------------------------------------------

    @staticmethod
    def _to_reply(item: Any, req: RecordedRequest) -> Reply:
        chat = req.is_chat
        model = req.body.get("model", "test-model") if isinstance(req.body, dict) else "test-model"
        if isinstance(item, Reply):
            return item
        if isinstance(item, BaseException):
            return Reply(status=500, json={"error": {"message": str(item), "type": type(item).__name__}})
        if isinstance(item, str):
            return Reply(json=openai_response([item] * req.n, chat, model))
        if isinstance(item, (list, tuple)):
            return Reply(json=openai_response([str(t) for t in item], chat, model))
        if isinstance(item, dict):
            return Reply(json=item)
        raise TypeError(f"the test server cannot answer with {type(item).__name__}")
