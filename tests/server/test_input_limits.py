"""What the server accepts (docs/api.md, "Limits"), over real HTTP: every number within its bounds
or a 422 naming the field (never a 500 from an overflow deeper down), strict types, finite numbers
only, a bounded request body, and a prompt that cannot fit refused before it waits for the model."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.servers import MAX_PROMPT_TOKENS, Server, call, start_server, stop_server

BEYOND_64_BITS = 2**70
PROMPT = "When Mary and John went to the store, John gave a drink to"


def raw_post(
    server: Server, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST bytes as they are (JSON's NaN, invalid UTF-8, ...); (status, decoded JSON answer)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def assert_422(status: int, out: dict[str, Any], field: str) -> None:
    assert status == 422, out
    assert out["message"].startswith(f"{field}: "), out
    assert out["detail"][0]["field"] == field and out["requestId"], out


def node(**fields: Any) -> dict[str, Any]:
    return {"nodeType": "mlp_neuron", "layerIndex": 0, "tokenIndex": 0, **fields}


def test_integers_beyond_their_bounds_are_422_naming_the_field(server: Server) -> None:
    """Every integer of the API has an upper bound: 2**70 (past SQLite's and torch's 64 bits)
    is a 422 naming the field, on every endpoint and in every nesting."""
    huge = BEYOND_64_BITS
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/neuron_record", {"layerIndex": 0, "componentIndex": huge}, "componentIndex"),
        ("/attention_head_record", {"layerIndex": huge, "headIndex": 0}, "layerIndex"),
        ("/attention_head_record", {"layerIndex": 0, "headIndex": huge}, "headIndex"),
        ("/generate", {"prompt": PROMPT, "seed": huge, "temperature": 1.0}, "seed"),
        ("/generate", {"prompt": PROMPT, "topK": huge, "temperature": 1.0}, "topK"),
        ("/generate", {"prompt": [1, huge]}, "prompt[1]"),
        ("/derived_scalars", {"prompt": PROMPT, "componentIndex": huge}, "componentIndex"),
        (
            "/derived_attention_scalars",
            {"prompt": PROMPT, "layerIndex": 0, "headIndex": huge},
            "headIndex",
        ),
        (
            "/batched_tdb",
            {
                "subRequests": [
                    {"prompt": PROMPT, "nodeAblations": [{"node": node(layerIndex=huge)}]}
                ]
            },
            "subRequests[0].nodeAblations[0].node.layerIndex",
        ),
        (
            "/batched_tdb",
            {"subRequests": [{"prompt": PROMPT, "targetTokens": [huge]}]},
            "subRequests[0].targetTokens[0]",
        ),
        (
            "/batched",
            {
                "subRequests": [
                    {
                        "inferenceRequestSpec": {"prompt": PROMPT, "lossFn": "zero"},
                        "processingRequestSpecByName": {
                            "x": {
                                "specType": "derived_scalars",
                                "nodeType": "mlp_neuron",
                                "componentIndices": [huge],
                            }
                        },
                    }
                ]
            },
            "subRequests[0].processingRequestSpecByName.x.derived_scalars.componentIndices[0]",
        ),
    ]
    for path, body, field in cases:
        status, out = call(server, path, body)
        assert_422(status, out, field)
    # The bounds themselves are accepted: a 64-bit seed samples.
    status, out = call(
        server,
        "/generate",
        {"prompt": PROMPT, "maxNewTokens": 2, "temperature": 1.0, "seed": 2**64 - 1},
    )
    assert status == 200 and len(out["tokenIds"]) == 2


def test_ablation_values_must_be_finite_and_bounded(server: Server) -> None:
    """An ablation value beyond ±1e6 (1e308 overflowed float32: a 500), NaN or Infinity (D came back
    null, /generate emitted token 0 forever) is a 422 naming it; within the bound every node type's
    ablation gives a finite D."""
    for value in (1e308, -1e7):
        ablation = [{"node": node(), "value": value}]
        status, out = call(
            server,
            "/batched_tdb",
            {"subRequests": [{"prompt": PROMPT, "lossFn": "zero", "nodeAblations": ablation}]},
        )
        assert_422(status, out, "subRequests[0].nodeAblations[0].value")
        status, out = call(server, "/generate", {"prompt": PROMPT, "nodeAblations": ablation})
        assert_422(status, out, "nodeAblations[0].value")
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = '{"prompt": "%s", "maxNewTokens": 2, "nodeAblations": [{"node": %s, "value": %s}]}'
        status, out = raw_post(
            server, "/generate", (body % (PROMPT, json.dumps(node()), literal)).encode()
        )
        assert_422(status, out, "nodeAblations[0].value")
        body = '{"subRequests": [{"prompt": "%s", "lossFn": "zero", "nodeAblations": [{"node": %s, "value": %s}]}]}'
        status, out = raw_post(
            server, "/batched_tdb", (body % (PROMPT, json.dumps(node()), literal)).encode()
        )
        assert_422(status, out, "subRequests[0].nodeAblations[0].value")
    n = 14  # tokens of PROMPT
    nodes = [
        {"nodeType": "embedding", "tokenIndex": 3},
        node(layerIndex=20, tokenIndex=5, componentIndex=7),
        {
            "nodeType": "attention_head",
            "layerIndex": 29,
            "tokenIndex": n - 1,
            "attendedTokenIndex": 1,
        },
    ]
    for value in (1e6, -1e6):
        subs = [
            {
                "prompt": PROMPT,
                "targetTokens": [" Mary"],
                "distractorTokens": [" John"],
                "nodeAblations": [{"node": abl, "value": value}],
                "topAndBottomKForNodeTable": 3,
                "tokenViewK": 3,
            }
            for abl in nodes
        ]
        status, out = call(server, "/batched_tdb", {"subRequests": subs})
        assert status == 200, out
        assert all(isinstance(sub["directionValue"], float) for sub in out["subResponses"])


def test_request_types_are_strict(server: Server) -> None:
    """No coercion: a boolean, a numeric string or a fraction is no integer, a string no boolean.
    (JSON Schema's integers are numbers without a fraction: 1.0 is 1.)"""
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/neuron_record", {"layerIndex": True, "componentIndex": 0}, "layerIndex"),
        ("/neuron_record", {"layerIndex": 0, "componentIndex": "5"}, "componentIndex"),
        ("/generate", {"prompt": PROMPT, "maxNewTokens": 1.5}, "maxNewTokens"),
        ("/tokenize", {"text": "hi", "prependBos": "true"}, "prependBos"),
        ("/tokenize", {"text": 5}, "text"),
        (
            "/batched_tdb",
            {
                "subRequests": [
                    {"prompt": PROMPT, "nodeAblations": [{"node": node(tokenIndex="1")}]}
                ]
            },
            "subRequests[0].nodeAblations[0].node.tokenIndex",
        ),
    ]
    for path, body, field in cases:
        status, out = call(server, path, body)
        assert_422(status, out, field)
    # An integer is a number: JSON's 1 is an ablation value of 1.0; and 1.0 is the integer 1.
    ablation = {"node": node(), "value": 1}
    body = {"prompt": PROMPT, "maxNewTokens": 1.0, "nodeAblations": [ablation]}
    status, out = call(server, "/generate", body)
    assert status == 200 and len(out["tokenIds"]) == 1, out


def test_malformed_bodies_are_422(server: Server) -> None:
    """Whatever is wrong with the JSON text, it is a 422 with `detail[0].field` "body"."""
    for body in (b'{"text": "hi"', b'{"text": "\xff"}', b"\xff\xfe{}", b"{'text': 'hi'}"):
        status, out = raw_post(server, "/tokenize", body)
        assert status == 422, (body, out)
        assert out["detail"][0]["field"] == "body" and out["message"].startswith("malformed JSON")


def test_body_over_the_limit_is_413_before_it_is_read(server: Server) -> None:
    """A declared 256 MiB body is refused at once, unread (the server's memory does not grow by
    it); a chunked body without a length is refused once it passes the limit (10 MiB)."""
    url = urlsplit(server.url)
    rss_before = rss_kib(server)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(
            b"POST /tokenize HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b'content-length: %d\r\n\r\n{"text": "' % (256 * 2**20)
        )
        status, out = read_response(sock)
    assert status == 413 and out["detail"] == {"field": "body", "kind": "too_large"}, out
    assert "268,435,456 bytes" in out["message"] and "--max-body-bytes" in out["message"]

    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(11 * 16):  # 11 MiB
            yield b"a" * 65536
        yield b'"}'

    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request(
        "POST",
        "/tokenize",
        body=chunks(),
        headers={"content-type": "application/json"},
        encode_chunked=True,
    )
    response = conn.getresponse()
    out = json.loads(response.read())
    conn.close()
    assert response.status == 413 and out["detail"] == {"field": "body", "kind": "too_large"}, out
    assert rss_kib(server) - rss_before < 64 * 1024


def rss_kib(server: Server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def small_body_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("small_body") / "server.log"
    srv = start_server(["--no-model", "--max-body-bytes", "1000"], log)
    yield srv
    stop_server(srv)


def test_max_body_bytes_sets_the_limit(small_body_server: Server) -> None:
    fits = json.dumps({"layerIndex": 0, "componentIndex": 0, "datasetName": "x" * 900}).encode()
    status, out = raw_post(small_body_server, "/neuron_record", fits)
    assert status == 404 and out["detail"] == {"field": "datasetName"}, out  # read and answered
    over = json.dumps({"layerIndex": 0, "componentIndex": 0, "datasetName": "x" * 1000}).encode()
    status, out = raw_post(small_body_server, "/neuron_record", over)
    assert status == 413 and "limit of 1,000 bytes" in out["message"], out


def test_prompt_that_cannot_fit_is_413_without_tokenizing(server: Server) -> None:
    """A 10 MB prompt is refused from its length alone (it used to be tokenized on the model's
    worker first): no text that long can encode to MAX_PROMPT_TOKENS tokens. Token-id lists by
    their length."""
    body = {"subRequests": [{"prompt": "a " * 5_000_000, "lossFn": "zero"}]}
    status, out = call(server, "/batched_tdb", body)
    assert status == 413 and out["detail"] == {
        "field": "subRequests[0].prompt",
        "kind": "too_large",
    }
    assert "10,000,000 characters cannot fit" in out["message"], out
    for path, extra in (("/generate", {"maxNewTokens": 1}), ("/derived_scalars", {})):
        ids = [1] * (MAX_PROMPT_TOKENS + 1)
        status, out = call(server, path, {"prompt": ids, **extra})
        assert status == 413 and out["detail"] == {"field": "prompt", "kind": "too_large"}, out
        assert (
            f"{MAX_PROMPT_TOKENS + 1} tokens exceed the maximum of {MAX_PROMPT_TOKENS}"
            in out["message"]
        )


def test_openapi_documents_what_is_returned(no_model_server: Server) -> None:
    """The document names the contract's error body for every error an operation can answer,
    and nothing of FastAPI's default 422 body; a processing spec's `specType` is required."""
    status, spec = call(no_model_server, "/openapi.json")
    assert status == 200
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            errors = {code: r for code, r in op["responses"].items() if code != "200"}
            for code, response in errors.items():
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, code)
            if "requestBody" in op:
                assert {"413", "422"} <= set(errors), (method, path)
    for name in ("/neuron_record", "/attention_head_record", "/derived_scalars"):
        assert "404" in spec["paths"][name]["post"]["responses"], name
    for name in ("DerivedScalarsSpec", "TopKSpec", "ScoredTokensSpec", "TokenPairAttributionSpec"):
        assert "specType" in schemas[name]["required"], name
