"""A loopback OpenAI-compatible chat-completions server for tests (no tests here)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BodyResponder = Callable[[dict, int], tuple[int, str]]  # (request body, request number) -> (status, reply text)


def prompt_text(body: dict) -> str:
    """The text part of a request's (last) user message."""
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def image_count(body: dict) -> int:
    """How many images a request carries."""
    content = body["messages"][0]["content"]
    return 0 if isinstance(content, str) else sum(part.get("type") == "image_url" for part in content)


class ChatServer:
    """A bounded chat-completions server on 127.0.0.1 with an ephemeral port; records every request."""

    def __init__(self, responder: BodyResponder, delay_s: float = 0.0, echo_errors: bool = False) -> None:
        """``echo_errors``: a non-200 reply's body is an error object that echoes the request's Authorization
        header and path (query included), as careless servers do; otherwise every body is a completion."""
        self.responder = responder
        self.delay_s = delay_s
        self.echo_errors = echo_errors
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.paths.append(self.path)
                    number = len(outer.requests)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    time.sleep(outer.delay_s)
                    status, reply = outer.responder(body, number)
                finally:
                    # A request stops counting as in flight before its reply is written: once the client has
                    # the reply it may send the next request, which this thread must not still be counting
                    # (on a busy machine the old decrement-after-write raced with it).
                    with outer.lock:
                        outer.in_flight -= 1
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
                if outer.echo_errors and status != 200:
                    echoed = f"{reply}; you sent Authorization: {self.headers.get('Authorization')} to {self.path}"
                    payload = json.dumps({"error": {"message": echoed}})
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and closed the connection

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
