"""Resource limits and abandoned requests over real HTTP (docs/api.md, "Limits" and "Concurrency").

A request whose response would be too large is a 413 before it runs, naming the fields to lower.
A client that disconnects costs nothing more: its request is dropped from the queue, or stopped at
the next check of its pass, and what runs next is not kept waiting; a request past its deadline is a
504. `/health` shows what the model runs and what waits.

The 413s use the session's subprocess server. The other tests serve the real app (create_app, the
real default model) with uvicorn on a local port in this process, so that a forward hook can hold
the model thread inside a pass (tests/server/gates.py): every step then waits for an event (a hook
reached, a state in /health), and the outcome is read from counters and hook points, never from
durations. Clients are real sockets, closed mid-request."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from activation_server.app import create_app
from activation_server.state import Settings
from neuron_explainer.activations import Engine, SubRequest
from neuron_explainer.activations.limits import format_bytes
from neuron_explainer.models import HookedTransformer
from tests.server.gates import gated
from tests.servers import Server, call, free_port

IOI = "When Mary and John went to the store, John gave a drink to"


def tdb(prompt: str = IOI, **fields: Any) -> dict[str, Any]:
    sub = {"prompt": prompt, "targetTokens": [" Mary"], "distractorTokens": [" John"]}
    return {"subRequests": [sub | fields]}


# ---- 413: too large a response, refused before it runs ------------------------------------------


def test_a_small_request_for_a_huge_response_is_refused_before_it_runs(server: Server) -> None:
    """About 200 bytes asking for 1000 nodes per type and metric with 200-token views: over a
    gigabyte of JSON. Refused at once, naming the fields, with the limit as applied."""
    body = tdb(topAndBottomKForNodeTable=1000, tokenViewK=200)
    assert len(json.dumps(body)) < 600
    before = call(server, "/health")[1]["batchesRun"]
    status, out = call(server, "/batched_tdb", body)
    assert status == 413, out
    assert out["detail"] == {"field": "subRequests[0].tokenViewK", "kind": "too_large"}
    message = out["message"]
    assert message.startswith("subRequests[0].tokenViewK: the result would be up to 1.1 GiB")
    assert "the limit is 512 MiB (the server's --max-response-mb)" in message
    assert message.endswith(
        "; lower subRequests[0].tokenViewK or subRequests[0].topAndBottomKForNodeTable"
    )
    assert call(server, "/health")[1]["batchesRun"] == before  # no pass ran

    # Four of them: also "send fewer sub-requests".
    status, out = call(server, "/batched_tdb", {"subRequests": body["subRequests"] * 4})
    assert status == 413 and out["message"].endswith(", or send fewer sub-requests")


def test_batched_names_its_own_fields_when_too_large(server: Server) -> None:
    """/batched sets the table's k in its top_k spec: the error names that field."""
    spec = {"specType": "top_k", "k": 1000}
    sub = {"inferenceRequestSpec": {"prompt": IOI, "lossFn": "zero"}}
    body = {"subRequests": [sub | {"processingRequestSpecByName": {"table": spec}}] * 8}
    status, out = call(server, "/batched", body)
    assert status == 413, out
    field = "subRequests[0].processingRequestSpecByName.table.k"
    assert out["detail"] == {"field": field, "kind": "too_large"}
    assert out["message"].endswith(f"; lower {field}, or send fewer sub-requests")


# ---- a server in this process -------------------------------------------------------------------


@contextmanager
def live_server(model: HookedTransformer, settings: Settings) -> Iterator[str]:
    """The app on uvicorn in a thread of this process; yields its URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(model, settings), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(6000):
            if server.started:
                break
            time.sleep(0.01)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/health", timeout=60) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def until_health(url: str, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /health until `condition` holds (an event, not a duration); returns that answer."""
    for _ in range(6000):
        h = health(url)
        if condition(h):
            return h
        time.sleep(0.05)
    raise AssertionError(f"/health never got there: {h}")


def send(url: str, path: str, body: Any) -> http.client.HTTPConnection:
    """POST on a connection of its own, without waiting for the answer (`getresponse()` reads
    it; `close()` hangs up)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    return conn


def post(url: str, path: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- abandoned requests -------------------------------------------------------------------------


def test_clients_that_hang_up_cost_nothing_more(default_model: HookedTransformer) -> None:
    """A debugger request is held inside its pass; a generation waits behind it. The generation's
    client hangs up: it leaves the queue and never runs. Then the debugger request's client hangs
    up: its pass stops at the next block. The next request runs with nothing in front of it:
    exactly one pass ran (its own), and only it reached the last block. /health shows each state."""
    with (
        gated(default_model) as (gate, reached_last),
        live_server(default_model, Settings()) as url,
    ):
        first = send(url, "/batched_tdb", tdb())
        assert gate.reached.wait(300), "the pass never started"
        [running] = health(url)["running"]
        assert running["endpoint"] == "/batched_tdb" and running["subRequests"] == 1
        assert running["startedAt"] is not None and running["secondsRunning"] >= 0
        assert not running["abandoned"] and running["requestId"]

        second = send(url, "/generate", {"prompt": IOI, "maxNewTokens": 50})
        h = until_health(url, lambda h: len(h["queue"]) == 1)
        assert h["queuedRequests"] == 1 and h["queue"][0]["endpoint"] == "/generate"
        assert h["queue"][0]["startedAt"] is None and h["queue"][0]["secondsRunning"] is None
        second.close()  # hangs up while queued
        until_health(url, lambda h: h["requestsCancelled"] == 1 and not h["queue"])

        first.close()  # hangs up while its pass runs
        h = until_health(url, lambda h: h["requestsCancelled"] == 2)
        assert h["running"][0]["abandoned"]  # being stopped
        gate.release.set()
        h = until_health(url, lambda h: h["runsStopped"] == 1 and not h["running"])
        assert reached_last == []  # the stopped pass never got to the last block

        status, out = post(url, "/batched_tdb", tdb())
        assert status == 200, out
        h = health(url)
        # One pass (the last request's); the abandoned generation would have reached the last
        # block too, had it run.
        assert h["batchesRun"] == 1 and reached_last == [1]
        assert h["requestsTimedOut"] == 0 and not h["running"] and not h["queue"]


def test_a_request_past_its_deadline_is_a_504_and_its_work_stops(
    default_model: HookedTransformer,
) -> None:
    """--request-timeout 1: the request is held in its pass until its client has the 504 (so
    the outcome does not depend on the machine's speed); released, the pass stops at its next
    check."""
    settings = Settings(request_timeout_s=1.0)
    with gated(default_model) as (gate, reached_last), live_server(default_model, settings) as url:
        conn = send(url, "/batched_tdb", tdb())
        assert gate.reached.wait(300)
        response = conn.getresponse()
        out = json.loads(response.read())
        assert response.status == 504, out
        assert out["message"].startswith(
            "the request did not finish within the server's limit of 1 s (--request-timeout)"
        )
        assert "its work was stopped" in out["message"]
        assert out["requestId"] == response.getheader("x-request-id")
        gate.release.set()
        h = until_health(url, lambda h: h["runsStopped"] == 1 and not h["running"])
        assert h["requestsTimedOut"] == 1 and h["batchesRun"] == 0 and reached_last == []


def test_the_response_cap_applies_to_the_estimate(default_model: HookedTransformer) -> None:
    """With the cap set to a request's estimate, that request runs and its response is within
    it; one more token per view list puts it over, a 413 naming the cap."""
    fields = {"topAndBottomKForNodeTable": 40, "tokenViewK": 8}
    sub = SubRequest(IOI, [" Mary"], [" John"], top_and_bottom_k=40, token_view_k=8)
    cap = Engine(default_model).estimate([sub]).result_bytes
    with live_server(default_model, Settings(max_response_bytes=cap)) as url:
        req = urllib.request.Request(
            url + "/batched_tdb",
            json.dumps(tdb(**fields)).encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=300) as resp:
            assert resp.status == 200
            assert len(resp.read()) <= cap
        status, out = post(url, "/batched_tdb", tdb(**(fields | {"tokenViewK": 9})))
        assert status == 413 and out["detail"]["kind"] == "too_large"
        assert (
            f"the limit is {format_bytes(cap)} (the server's --max-response-mb)" in out["message"]
        )
