"""Unexpected failures: a 500 with the contract's body and a request id, the traceback only in the
server log, CORS headers intact. Served by a real uvicorn server in a thread."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import uvicorn

from activation_server.app import create_app
from activation_server.state import Settings
from tests.servers import free_port


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # No UI (an empty folder): the catch-all UI mount would otherwise shadow the route added here.
    no_ui = tmp_path_factory.mktemp("no_ui")
    app = create_app(None, Settings(cors_origins=["http://localhost:5173"], ui_dir=str(no_ui)))

    @app.get("/explode")
    async def explode() -> dict[str, str]:
        raise Boom("secret internal detail")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_unexpected_error_is_a_500_with_request_id(
    broken_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    req = urllib.request.Request(
        broken_server + "/explode", headers={"origin": "http://localhost:5173"}
    )
    with (
        caplog.at_level(logging.ERROR, logger="activation_server"),
        pytest.raises(urllib.error.HTTPError) as info,
    ):
        urllib.request.urlopen(req, timeout=10)
    err = info.value
    body = json.loads(err.read())
    assert err.code == 500
    assert body["requestId"] and body["requestId"] in body["message"]
    assert "secret internal detail" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    assert err.headers["x-request-id"] == body["requestId"]
    assert err.headers["access-control-allow-origin"] == "http://localhost:5173"
    # The server log has the traceback under the same request id.
    logged = [r for r in caplog.records if body["requestId"] in r.getMessage()]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is Boom
