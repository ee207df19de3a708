"""A scripted OpenAI chat-completions server on loopback, for judge tests through the real client.

The ``judge_server`` and ``judge_key`` fixtures are registered in tests/conftest.py::

    from tests.judge_server import JUDGE_KEY_ENV, Scripted, scores_reply

    def test_x(judge_server, judge_key):
        judge_server.push(scores_reply(0.6, 1.0))                       # the next request
        judge_server.responder = lambda body: Scripted(status=500)      # every later one
        config = JudgeConfig(base_url=judge_server.base_url, api_key_env=JUDGE_KEY_ENV)

Each request takes the next scripted :class:`Scripted` response from the queue; when the queue is
empty, ``responder(request_json)`` decides (default: a 500). Every request is recorded (headers and
JSON body) and the most requests in flight at once is tracked. With ``accepted_keys`` set, a request
whose bearer key is not in it gets a 401 before any script. ``Scripted(hang=True)`` never
answers: it waits until the client closes the connection (counted in ``abandoned``) or the server
is closed.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer


@dataclass
class Scripted:
    """One response: ``delay`` seconds before answering; ``drop`` closes the socket unanswered;
    ``hang`` never answers."""

    status: int = 200
    body: Any = None  # dict -> JSON, str -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    hang: bool = False


def completion_body(
    content: str | None, refusal: str | None = None, prompt_tokens: int = 100, completion_tokens: int = 10,
    finish_reason: str = "stop",
) -> dict:
    """A chat.completion object as OpenAI returns it."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "judge-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def reply(content: str | None, **kwargs: Any) -> Scripted:
    """A 200 whose message content is ``content`` (kwargs: refusal, token counts, delay ...)."""
    body_keys = {"refusal", "prompt_tokens", "completion_tokens", "finish_reason"}
    body = completion_body(content, **{k: v for k, v in kwargs.items() if k in body_keys})
    return Scripted(body=body, **{k: v for k, v in kwargs.items() if k not in body_keys})


def scores_reply(integrity: float, knowledge: float, **kwargs: Any) -> Scripted:
    return reply(json.dumps({"integrity_score": integrity, "knowledge_score": knowledge}), **kwargs)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 refuses connections when 16 requests arrive at once


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]
    body: dict
    arrived: float


class JudgeServer:
    """The server; ``base_url`` is what goes in ``JudgeConfig.base_url``."""

    def __init__(self) -> None:
        self.queue: deque[Scripted] = deque()
        self.responder: Callable[[dict], Scripted] = lambda body: Scripted(status=500, body={"error": "unscripted"})
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.abandoned = 0  # hanging requests whose connection the client closed
        self.accepted_keys: set[str] | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def push(self, *responses: Scripted) -> None:
        with self._lock:
            self.queue.extend(responses)

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, body: dict, headers: dict[str, str]) -> Scripted:
        key = headers.get("authorization", "").removeprefix("Bearer ")
        if self.accepted_keys is not None and key not in self.accepted_keys:
            return Scripted(status=401, body={"error": {"message": "Incorrect API key provided"}})
        with self._lock:
            if self.queue:
                return self.queue.popleft()
        return self.responder(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    headers = {name.lower(): value for name, value in self.headers.items()}
                    server.requests.append(Seen(self.path, headers, body, time.monotonic()))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(server._next(body, headers))
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _wait_for_the_client_to_leave(self) -> None:
                while not server._closing.is_set():
                    readable, _, _ = select.select([self.connection], [], [], 0.02)
                    if not readable:
                        continue
                    try:
                        gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                    except OSError:
                        gone = True
                    if gone:
                        with server._lock:
                            server.abandoned += 1
                        break
                self.close_connection = True

            def _answer(self, scripted: Scripted) -> None:
                if scripted.hang:
                    self._wait_for_the_client_to_leave()
                    return
                time.sleep(scripted.delay)
                if scripted.drop:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                payload = scripted.body if isinstance(scripted.body, str) else json.dumps(scripted.body or {})
                data = payload.encode("utf-8")
                try:
                    self.send_response(scripted.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in scripted.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    self.close_connection = True

        return Handler


@pytest.fixture
def judge_server() -> Iterator[JudgeServer]:
    server = JudgeServer()
    yield server
    server.close()


JUDGE_KEY_ENV = "PATHVLM_TEST_JUDGE_KEY"
"""The variable the judge tests keep their (fake) key in, so a real OPENAI_API_KEY is never used."""


@pytest.fixture
def judge_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """Sets :data:`JUDGE_KEY_ENV` to a fake key and returns that key."""
    key = "sk-test-not-a-real-key"
    monkeypatch.setenv(JUDGE_KEY_ENV, key)
    return key


class KeyOnRank(Callback):
    """For multi-process fits: at ``setup``, on rank ``rank`` only, sets the judge key's variable to
    ``value`` (``None`` unsets it). List it before the ``ProcessReward`` callback."""

    def __init__(self, rank: int = 1, value: str | None = None) -> None:
        self.rank = rank
        self.value = value

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.global_rank != self.rank:
            return
        if self.value is None:
            os.environ.pop(JUDGE_KEY_ENV, None)
        else:
            os.environ[JUDGE_KEY_ENV] = self.value
