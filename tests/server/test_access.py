"""Who may talk to the server (docs/api.md, "Access"), on real servers: the Host check of a loopback
server (DNS rebinding), the refusal to expose one without a token, the access token, and the API
docs served from this machine."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.servers import (
    AUTH_TOKEN,
    ROOT,
    Server,
    free_port,
    server_environ,
    start_server,
    stop_server,
)


def request(
    server: Server,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    """One request with exactly these headers (a Host among them sets the Host header; otherwise
    it is the server's 127.0.0.1:PORT): (status, response, body)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    headers = dict(headers or {})
    conn.putrequest(method, path, skip_host="Host" in headers)
    data = b"" if body is None else json.dumps(body).encode()
    if body is not None:
        headers |= {"content-type": "application/json", "content-length": str(len(data))}
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders(data or None)
    resp = conn.getresponse()
    content = resp.read()
    conn.close()
    return resp.status, resp, content


def error_body(resp: http.client.HTTPResponse, content: bytes) -> dict[str, Any]:
    """The error contract's body, checked: {message, detail, requestId}, the id in the header."""
    body: dict[str, Any] = json.loads(content)
    assert set(body) == {"message", "detail", "requestId"}
    assert body["requestId"] and body["requestId"] == resp.getheader("x-request-id")
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- The Host check (a server bound to loopback) ---------------------------------------------


def test_a_foreign_host_is_refused_by_a_loopback_server(no_model_server: Server) -> None:
    port = urlparse(no_model_server.url).port
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example"):
        status, resp, content = request(no_model_server, "GET", "/health", {"Host": host})
        assert status == 400, (host, content)
        body = error_body(resp, content)
        assert body["message"].startswith(f"Host {host!r} is not allowed")
        assert "--allowed-host" in body["message"]
        assert body["detail"] == {"field": "Host", "kind": "invalid"}
    # The UI's page too: a rebound page could otherwise read what the server serves.
    status, _, _ = request(no_model_server, "GET", "/", {"Host": "evil.example"})
    assert status == 400


def test_loopback_names_are_answered_with_any_port(no_model_server: Server) -> None:
    port = urlparse(no_model_server.url).port
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", "[::1]:80"):
        status, _, content = request(no_model_server, "GET", "/health", {"Host": host})
        assert status == 200, (host, content)


@pytest.fixture(scope="module")
def allowed_host_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("allowed_host") / "server.log"
    args = ["--no-model", "--allowed-host", "tdb.example.org", "--allowed-host", "*.lab.example"]
    srv = start_server(args, log)
    yield srv
    stop_server(srv)


def test_allowed_hosts_are_answered_too(allowed_host_server: Server) -> None:
    for host in ("tdb.example.org", "TDB.example.org:8000", "gpu1.lab.example", "localhost"):
        status, _, content = request(allowed_host_server, "GET", "/health", {"Host": host})
        assert status == 200, (host, content)
    for host in ("example.org", "lab.example", "tdb.example.org.evil.example"):
        status, resp, content = request(allowed_host_server, "GET", "/health", {"Host": host})
        assert status == 400, (host, content)
        assert "tdb.example.org, *.lab.example" in error_body(resp, content)["message"]


# --- Binding beyond loopback --------------------------------------------------------------------

ENTRY_POINTS = {
    "python -m activation_server": [sys.executable, "-m", "activation_server"],
    "tdb serve": [sys.executable, "-m", "neuron_explainer.cli", "serve"],
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_non_loopback_server_without_token_refuses_to_start(entry_point: str) -> None:
    command = [*ENTRY_POINTS[entry_point], "--host", "0.0.0.0", "--port", str(free_port())]
    started = time.monotonic()
    result = subprocess.run(
        [*command, "--model", "smollm2-135m"],
        cwd=ROOT,
        env=server_environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback, no model loaded first
    assert "--host 0.0.0.0 exposes the server" in lines[0]
    assert "--auth-token" in lines[0] and "TDB_AUTH_TOKEN" in lines[0] and "--no-auth" in lines[0]
    assert time.monotonic() - started < 60


def test_no_auth_serves_every_host_with_a_warning(tmp_path: Path) -> None:
    srv = start_server(["--no-model", "--host", "0.0.0.0", "--no-auth"], tmp_path / "server.log")
    try:
        assert "WARNING: --no-auth" in srv.log_text()
        # Users reach an exposed server by the machine's name or address: no Host check.
        headers = {"Host": "workstation.example:8000"}
        status, _, content = request(srv, "GET", "/neuron_datasets_metadata", headers)
        assert status == 200, content
    finally:
        stop_server(srv)


def test_the_token_can_come_from_the_environment(tmp_path: Path) -> None:
    srv = start_server(
        ["--no-model", "--host", "0.0.0.0"],
        tmp_path / "server.log",
        env={"TDB_AUTH_TOKEN": "from-the-environment"},
    )
    try:
        assert request(srv, "GET", "/neuron_datasets_metadata")[0] == 401
        headers = bearer("from-the-environment")
        assert request(srv, "GET", "/neuron_datasets_metadata", headers)[0] == 200
    finally:
        stop_server(srv)


# --- The access token ---------------------------------------------------------------------------


def test_api_requests_need_the_token(token_server: Server) -> None:
    body = {"text": "Hello world"}
    status, resp, content = request(token_server, "POST", "/tokenize", body=body)
    assert status == 401
    assert resp.getheader("www-authenticate") == "Bearer"
    message = error_body(resp, content)["message"]
    assert message.startswith("this server requires an access token")
    assert "Authorization: Bearer TOKEN" in message and "?access_token=" in message

    for wrong in (bearer("not-the-token"), bearer(AUTH_TOKEN + "x"), {"Authorization": AUTH_TOKEN}):
        status, resp, content = request(token_server, "POST", "/tokenize", wrong, body)
        assert status == 401
        assert error_body(resp, content)["message"].startswith("wrong access token")

    status, _, content = request(token_server, "POST", "/tokenize", bearer(AUTH_TOKEN), body)
    assert status == 200, content
    assert json.loads(content)["tokenStrings"] == ["Hello", " world"]
    status, _, content = request(token_server, "GET", "/model_info", bearer(AUTH_TOKEN))
    assert status == 200 and json.loads(content)["nLayers"] == 30
    # Every endpoint, GET ones included, and any other request than a page's GET.
    for method, path in [("GET", "/model_info"), ("GET", "/jobs"), ("POST", "/no_such_thing")]:
        assert request(token_server, method, path)[0] == 401, path


def test_the_ui_docs_and_health_load_without_the_token(token_server: Server) -> None:
    status, resp, content = request(token_server, "GET", "/")
    assert status == 200 and resp.getheader("content-type", "").startswith("text/html")
    html = content.decode()
    assets = re.findall(r'(?:src|href)="(/assets/[^"]+)"', html)
    assert assets, html
    for asset in assets:
        assert request(token_server, "GET", asset)[0] == 200, asset
    # A shared link to a UI route loads the page; the page then asks for the token.
    assert request(token_server, "GET", "/debugger?prompt=Hi")[0] == 200
    # /health is public: liveness probes carry no secret, and it tells no data.
    status, _, content = request(token_server, "GET", "/health")
    assert status == 200 and json.loads(content)["modelLoaded"] is True
    for path in ("/docs", "/redoc", "/docs-assets/swagger-ui-bundle.js"):
        assert request(token_server, "GET", path)[0] == 200, path
    # The OpenAPI document says which endpoints need the token, so /docs offers "Authorize".
    status, _, content = request(token_server, "GET", "/openapi.json")
    schema = json.loads(content)
    assert status == 200
    assert schema["components"]["securitySchemes"]["accessToken"]["scheme"] == "bearer"
    assert schema["security"] == [{"accessToken": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []


# --- The API docs, offline ------------------------------------------------------------------------


def test_the_docs_pages_reference_no_external_url(no_model_server: Server) -> None:
    for page in ("/docs", "/redoc"):
        status, resp, content = request(no_model_server, "GET", page)
        assert status == 200 and resp.getheader("content-type", "").startswith("text/html")
        # The browser is told to load nothing from elsewhere (Redoc would fetch its logo).
        assert "default-src 'self'" in resp.getheader("content-security-policy", "")
        html = content.decode()
        assert not re.search(r"(https?:)?//[\w.-]", html), html  # no http(s)://, no //host
        references = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html)
        assert any(r.endswith(".js") for r in references), html
        for ref in references:
            assert ref.startswith("/"), ref
            status, _, body = request(no_model_server, "GET", ref)
            assert status == 200, (page, ref)
            # Redoc's bundle shows its maker's logo from a CDN: served pointing at a local image.
            assert b"cdn.redoc.ly" not in body, ref
