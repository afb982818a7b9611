"""Real servers for the API and browser tests: `python -m activation_server` subprocesses on free
local ports (the fixtures are in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_PROMPT_TOKENS = 1024
AUTH_TOKEN = "test-token-2f9c"  # the --auth-token of the token_server fixture


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_environ() -> dict[str, str]:
    """This environment less TDB_AUTH_TOKEN: a token set in the shell running the tests would make
    every test server require it."""
    return {k: v for k, v in os.environ.items() if k != "TDB_AUTH_TOKEN"}


def start_server(
    args: list[str], log: Path, timeout_s: float = 120.0, env: dict[str, str] | None = None
) -> Server:
    """`python -m activation_server ARGS` on a free port; `env` adds environment variables."""
    port = free_port()
    out = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "activation_server", "--port", str(port), *args],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**server_environ(), "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return Server(url, process, log)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"server did not start in {timeout_s}s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


def call(server: Server, path: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
    """GET `path` (body None) or POST `body` as JSON; (status, decoded JSON body), errors too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        server.url + path,
        data=data,
        method="GET" if body is None else "POST",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(server: Server, path: str, body: dict[str, object]) -> Any:
    """POST `body` as JSON and return the decoded answer; an error status fails the test."""
    status, answer = call(server, path, body, timeout=60)
    assert status == 200, f"{path}: {status} {answer}"
    return answer


class Proxy(http.server.BaseHTTPRequestHandler):
    """A local HTTP proxy in front of a real server (`upstream`), for what an endpoint may do that
    tdb serve never does: a subclass changes `answer` (by default the upstream's, passed on)."""

    upstream = ""

    def forward(self, body: bytes | None) -> bytes:
        """The upstream's answer to this request (the same method, path and JSON body)."""
        request = urllib.request.Request(
            type(self).upstream + self.path,
            data=body,
            method=self.command,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as resp:
            return bytes(resp.read())

    def answer(self, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, JSON body) to send back."""
        return 200, {}, self.forward(body)

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        status, headers, data = self.answer(body)
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _handle

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def proxy_to(server: Server, handler: type[Proxy]) -> Iterator[str]:
    """Serve `handler` in front of `server` on a free port; yields its /v1 base URL."""
    handler.upstream = server.url
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}/v1"
    finally:
        proxy.shutdown()
