"""The REST API over real HTTP against a real uvicorn server with the default model (docs/api.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import urllib.error
import urllib.request
from typing import Any

import pytest

from activation_server.client import AsyncClient, Client
from neuron_explainer.activations import (
    REGISTRY,
    Engine,
    NodeAblation,
    NodeIndex,
    NodeType,
    SubRequest,
    SubResult,
    describe,
    node_types,
)
from neuron_explainer.models import HookedTransformer
from tests.servers import MAX_PROMPT_TOKENS, Server

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_SWAPPED = "When John and Mary went to the store, Mary gave a drink to"
METRICS = ("activation", "writeMagnitude", "directEffect", "estimatedTotalEffect")
LIB_METRICS = ("activation", "write_magnitude", "direct_effect", "estimated_total_effect")


def http(
    server: Server, path: str, body: bytes | dict[str, Any] | None = None, method: str = "POST"
) -> tuple[int, dict[str, str], dict[str, Any]]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        server.url + path,
        data=data,
        method=method,
        headers={"content-type": "application/json", "origin": "http://localhost:5173"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, dict(e.headers), json.loads(raw)


def wire_node(node: NodeIndex) -> dict[str, Any]:
    return {
        "nodeType": node.node_type.value,
        "layerIndex": node.layer,
        "tokenIndex": node.token,
        "componentIndex": node.component,
        "attendedTokenIndex": node.attended_token,
    }


def assert_same(wire: dict[str, Any], lib: SubResult, tol: float = 1e-5) -> None:
    """An HTTP sub-response equals the library's result: tokens, D, node table, every metric."""
    assert wire["tokenIds"] == lib.tokens
    assert wire["tokenStrings"] == lib.token_strings
    assert math.isclose(wire["directionValue"], lib.direction_value, rel_tol=tol, abs_tol=tol)
    assert [row["node"] for row in wire["nodeTable"]] == [wire_node(n) for n in lib.nodes]
    for metric, lib_metric in zip(METRICS, LIB_METRICS, strict=True):
        got = [row[metric] for row in wire["nodeTable"]]
        want = lib.metrics[lib_metric]
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None and w is not None:
                assert math.isclose(g, w, rel_tol=tol, abs_tol=tol), (metric, g, w)


def test_batched_tdb_equals_library(server: Server, default_model: HookedTransformer) -> None:
    body = {
        "subRequests": [{"prompt": IOI, "targetTokens": [" Mary"], "distractorTokens": [" John"]}]
    }
    status, headers, out = http(server, "/batched_tdb", body)
    assert status == 200
    [lib] = Engine(default_model).run([SubRequest(IOI, [" Mary"], [" John"])])
    [wire] = out["subResponses"]
    assert_same(wire, lib)
    # Among the top heads by direct effect: heads at the last token attending to " Mary" (1).
    heads = [r for r in wire["nodeTable"] if r["node"]["nodeType"] == "attention_head"]
    heads.sort(key=lambda r: -r["directEffect"])
    assert any(
        r["node"]["tokenIndex"] == len(wire["tokenIds"]) - 1
        and r["node"]["attendedTokenIndex"] == 1
        for r in heads[:5]
    )
    top = heads[0]
    assert top["tokenViews"]["upvotedOutputTokens"]
    assert wire["targetTokens"][0]["text"] == " Mary"
    assert set(wire["tokenSums"]) == {
        "embedding",
        "mlp_neuron",
        "attention_head_attended_from",
        "attention_head_attended_to",
    }
    assert headers.get("x-request-id")


def test_left_right_and_ablated_baseline_in_one_call(
    server: Server, default_model: HookedTransformer
) -> None:
    """Left and right prompts plus an ablated copy of the left with its unablated baseline."""
    engine = Engine(default_model)
    [baseline] = engine.run([SubRequest(IOI, [" Mary"], [" John"])])
    top_heads = sorted(
        (n for n in baseline.nodes if n.node_type == NodeType.ATTENTION_HEAD),
        key=lambda n: -(baseline.metrics["direct_effect"][baseline.nodes.index(n)] or 0),
    )[:3]
    ablations = [NodeAblation(n) for n in top_heads]
    left = {"prompt": IOI, "targetTokens": [" Mary"], "distractorTokens": [" John"]}
    right = {"prompt": IOI_SWAPPED, "targetTokens": [" John"], "distractorTokens": [" Mary"]}
    ablated = left | {"nodeAblations": [{"node": wire_node(a.node)} for a in ablations]}
    status, _, out = http(server, "/batched_tdb", {"subRequests": [left, right, ablated, left]})
    assert status == 200
    lib = engine.run(
        [
            SubRequest(IOI, [" Mary"], [" John"]),
            SubRequest(IOI_SWAPPED, [" John"], [" Mary"]),
            SubRequest(IOI, [" Mary"], [" John"], node_ablations=ablations),
            SubRequest(IOI, [" Mary"], [" John"]),
        ]
    )
    for wire, want in zip(out["subResponses"], lib, strict=True):
        assert_same(wire, want)
    # One node table for all sub-requests, so Left/Diff/Right columns line up.
    tables = [[r["node"] for r in sub["nodeTable"]] for sub in out["subResponses"]]
    assert all(t == tables[0] for t in tables)
    d_ablated, d_base = (
        out["subResponses"][2]["directionValue"],
        out["subResponses"][3]["directionValue"],
    )
    assert d_ablated < d_base
    # The ablated row equals an independent solo run with the same ablations.
    [solo] = engine.run([SubRequest(IOI, [" Mary"], [" John"], node_ablations=ablations)])
    assert math.isclose(d_ablated, solo.direction_value, rel_tol=1e-5)


def test_trace_through_http(server: Server, default_model: HookedTransformer) -> None:
    neuron = NodeIndex(NodeType.MLP_NEURON, 20, 13, 5)
    body = {
        "subRequests": [
            {"prompt": IOI, "upstreamNodeToTrace": {"node": wire_node(neuron)}, "lossFn": "zero"}
        ]
    }
    status, _, out = http(server, "/batched_tdb", body)
    assert status == 200, out
    from neuron_explainer.activations import NodeToTrace

    [lib] = Engine(default_model).run(
        [SubRequest(IOI, loss_fn="zero", upstream_node_to_trace=NodeToTrace(neuron))]
    )
    assert_same(out["subResponses"][0], lib)
    assert out["subResponses"][0]["traceDescription"]
    assert all(row["node"]["layerIndex"] <= 20 for row in out["subResponses"][0]["nodeTable"])


ERROR_CASES = {
    "two-token target": (
        {"subRequests": [{"prompt": IOI, "targetTokens": [" Mary John"]}]},
        400,
        ["subRequests[0].targetTokens[0]", "not a single token"],
    ),
    "layer out of range": (
        {
            "subRequests": [
                {
                    "prompt": IOI,
                    "targetTokens": [" Mary"],
                    "nodeAblations": [
                        {"node": {"nodeType": "mlp_neuron", "layerIndex": 30, "tokenIndex": 0}}
                    ],
                }
            ]
        },
        400,
        ["subRequests[0].nodeAblations[0].node.layerIndex", "out of range"],
    ),
    "unknown node type": (
        {
            "subRequests": [
                {
                    "prompt": IOI,
                    "targetTokens": [" Mary"],
                    "nodeAblations": [
                        {"node": {"nodeType": "mlp_neurone", "layerIndex": 1, "tokenIndex": 0}}
                    ],
                }
            ]
        },
        422,
        ["subRequests[0].nodeAblations[0].node.nodeType", "mlp_neuron"],
    ),
    "malformed JSON": (b'{"subRequests": [{"prompt": "a",', 422, ["malformed JSON"]),
    "misspelled field": (
        {"subRequests": [{"prompt": IOI, "targetToken": [" Mary"]}]},
        422,
        ["subRequests[0].targetToken", "not permitted"],
    ),
    "missing targets": (
        {"subRequests": [{"prompt": IOI}]},
        400,
        ["subRequests[0].targetTokens", "target token"],
    ),
    "token out of range": (
        {
            "subRequests": [
                {
                    "prompt": IOI,
                    "targetTokens": [" Mary"],
                    "nodeAblations": [
                        {"node": {"nodeType": "mlp_neuron", "layerIndex": 1, "tokenIndex": 99}}
                    ],
                }
            ]
        },
        400,
        ["tokenIndex", "out of range"],
    ),
    "autoencoder latents without autoencoders": (
        {
            "subRequests": [
                {
                    "prompt": IOI,
                    "targetTokens": [" Mary"],
                    "componentTypeForMlp": "autoencoder_latent",
                }
            ]
        },
        400,
        ["componentTypeForMlp", "--autoencoder"],
    ),
    "over-long prompt": (
        {"subRequests": [{"prompt": " the" * (MAX_PROMPT_TOKENS + 10), "targetTokens": [" a"]}]},
        413,
        ["subRequests[0].prompt", f"maximum of {MAX_PROMPT_TOKENS}"],
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_contract(server: Server, case: str) -> None:
    body, status, needles = ERROR_CASES[case]
    got, headers, out = http(server, "/batched_tdb", body)
    assert got == status, out
    assert set(out) == {"message", "detail", "requestId"}
    for needle in needles:
        assert needle in out["message"], out["message"]
    assert "Traceback" not in json.dumps(out)
    if got in (400, 413):  # the library's errors: the field in `detail`, as in the message
        assert out["message"].startswith(f"{out['detail']['field']}: "), out
        assert out["detail"]["kind"] == ("too_large" if status == 413 else "invalid")
    assert headers.get("x-request-id") == out["requestId"]
    # Error responses carry the same CORS headers as successes, so the UI can read the message.
    assert headers.get("access-control-allow-origin") == "http://localhost:5173"


def test_other_endpoints_validate(server: Server) -> None:
    status, _, out = http(
        server,
        "/derived_scalars",
        {"prompt": IOI, "nodeType": "mlp_neuron", "layerIndex": 2, "componentIndex": 1536},
    )
    assert status == 400 and "componentIndex" in out["message"]
    status, _, out = http(server, "/generate", {"prompt": IOI, "maxNewTokens": 0})
    assert status == 422 and "maxNewTokens" in out["message"]
    status, _, out = http(server, "/no_such_thing", {})
    assert status == 404 and "/no_such_thing" in out["message"]
    status, _, out = http(server, "/batched_tdb", None, method="GET")
    assert status == 405 and out["message"]


def test_no_model_server_answers_503(no_model_server: Server) -> None:
    for path, body in (
        ("/batched_tdb", {"subRequests": [{"prompt": IOI, "targetTokens": [" Mary"]}]}),
        ("/tokenize", {"text": "hello"}),
        ("/generate", {"prompt": "hello"}),
    ):
        status, _, out = http(no_model_server, path, body)
        assert status == 503, out
        assert "--model" in out["message"] and out["requestId"]
    status, _, out = http(no_model_server, "/model_info", None, method="GET")
    assert status == 503
    # What the node types are answers without a model (the offline dataset viewer's labels).
    status, _, out = http(no_model_server, "/node_types", None, method="GET")
    assert status == 200 and [d["name"] for d in out["nodeTypes"]] == [
        t.value for t in node_types()
    ]
    assert all(d["layers"] is None for d in out["nodeTypes"])
    status, _, out = http(no_model_server, "/health", None, method="GET")
    assert status == 200 and out["modelLoaded"] is False


def test_concurrent_requests_equal_solo_results(server: Server) -> None:
    """16 concurrent requests with different prompts: all succeed, and each equals its result
    when sent alone, whether or not the server merged them into shared batches (which ones wait
    together depends on timing; tests/server/test_worker.py shows the merging deterministically)."""
    names = ["Mary", "Anna", "Paul", "Lucy", "Tom", "Kate", "Jack", "Emma"]
    prompts = []
    for i in range(16):
        a, b = names[i % 8], names[(i + 3) % 8]
        place = ["store", "park", "school", "beach"][i % 4]
        prompts.append(
            {
                "prompt": f"When {a} and {b} went to the {place}, {b} gave a drink to",
                "targetTokens": [f" {a}"],
                "distractorTokens": [f" {b}"],
                "topAndBottomKForNodeTable": 5,
            }
        )

    async def all_at_once() -> list[Any]:
        async with AsyncClient(server.url) as client:
            return await asyncio.gather(*(client.batched_tdb([p]) for p in prompts))

    # A fresh thread has no running event loop whatever other tests left in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        together = pool.submit(asyncio.run, all_at_once()).result()
    with Client(server.url) as client:
        for p, got in zip(prompts, together, strict=True):
            alone = client.batched_tdb([p])
            g, a = got.sub_responses[0], alone.sub_responses[0]
            assert g.token_ids == a.token_ids
            assert math.isclose(g.direction_value, a.direction_value, rel_tol=1e-5)
            assert [r.node for r in g.node_table] == [r.node for r in a.node_table]
            for rg, ra in zip(g.node_table, a.node_table, strict=True):
                assert rg.direct_effect is not None and ra.direct_effect is not None
                assert math.isclose(rg.direct_effect, ra.direct_effect, rel_tol=1e-4, abs_tol=1e-5)


def test_openapi_describes_every_endpoint(server: Server) -> None:
    status, _, spec = http(server, "/openapi.json", None, method="GET")
    assert status == 200
    paths = spec["paths"]
    for path in (
        "/batched_tdb",
        "/batched",
        "/derived_scalars",
        "/derived_attention_scalars",
        "/tokenize",
        "/generate",
    ):
        op = paths[path]["post"]
        assert "$ref" in op["requestBody"]["content"]["application/json"]["schema"], path
        assert "$ref" in op["responses"]["200"]["content"]["application/json"]["schema"], path
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
    for path in ("/model_info", "/health"):
        assert (
            "$ref"
            in paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        )
    schemas = spec["components"]["schemas"]
    assert "targetTokens" in schemas["TdbSubRequest"]["properties"]
    assert "nodeTable" in schemas["TdbSubResponse"]["properties"]


def test_node_types_describe_the_model(server: Server, default_model: HookedTransformer) -> None:
    """Each node type's description, served to the UI, is the library's: names, what is signed,
    where the loaded model has nodes of it."""
    status, _, out = http(server, "/node_types", None, method="GET")
    assert status == 200
    described = {d["name"]: d for d in out["nodeTypes"]}
    cfg = default_model.cfg
    for node_type in node_types():
        desc, served = describe(node_type), described[node_type.value]
        assert (served["nodeType"], served["label"], served["perTokenPair"]) == (
            desc.api_name,
            desc.label,
            desc.per_token_pair,
        )
        assert served["layers"] == desc.layers(default_model)
        for metric in served["metrics"]:
            assert metric["signed"] == REGISTRY[(node_type, metric["name"])].signed
    neurons, heads = described["mlp_neuron"], described["attention_head"]
    assert neurons["layers"] == list(range(cfg.n_layers)) and set(neurons["widths"]) == {cfg.d_mlp}
    assert set(heads["widths"]) == {cfg.n_heads} and heads["datasetMetric"] == "write_magnitude"
    assert described["mlp_autoencoder_latent"]["layers"] == []  # no autoencoder loaded


def test_client_model_info_tokenize_generate(
    server: Server, default_model: HookedTransformer
) -> None:
    with Client(server.url) as client:
        info = client.model_info()
        assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_mlp) == (30, 9, 3, 1536)
        assert info.max_prompt_tokens == MAX_PROMPT_TOKENS
        tokens = client.tokenize("The capital of France is")
        assert default_model.tokenizer is not None
        assert tokens.token_ids == default_model.tokenizer.encode("The capital of France is")
        assert tokens.token_strings[-1] == " is"
        out = client.generate({"prompt": "The capital of France is", "maxNewTokens": 3})
        assert out.token_strings[0] == " Paris"
        assert out.completion.startswith(" Paris")


def test_generate_under_ablation_equals_library(
    server: Server, default_model: HookedTransformer
) -> None:
    from neuron_explainer.activations.processing import generate

    ablations = [
        NodeAblation(NodeIndex(NodeType.ATTENTION_HEAD, layer, 13, head))
        for layer in range(20, 30)
        for head in range(9)
    ]
    body = {
        "prompt": IOI,
        "maxNewTokens": 4,
        "nodeAblations": [{"node": wire_node(a.node)} for a in ablations],
    }
    status, _, out = http(server, "/generate", body)
    assert status == 200, out
    assert out["tokenIds"] == generate(Engine(default_model), IOI, 4, node_ablations=ablations)
    status, _, plain = http(server, "/generate", {"prompt": IOI, "maxNewTokens": 4})
    assert plain["tokenStrings"][0] == " Mary"


def test_derived_scalars_equal_hooked_activations(
    server: Server, default_model: HookedTransformer
) -> None:
    import torch

    prompt = "The capital of France is"
    status, _, neuron = http(
        server,
        "/derived_scalars",
        {"prompt": prompt, "nodeType": "mlp_neuron", "layerIndex": 4, "componentIndex": 100},
    )
    assert status == 200, neuron
    status, _, head = http(
        server, "/derived_attention_scalars", {"prompt": prompt, "layerIndex": 4, "headIndex": 2}
    )
    assert status == 200, head
    tokens = torch.tensor([neuron["tokenIds"]])
    _, cache = default_model.run_with_cache(
        tokens, names=["blocks.4.mlp.hook_post", "blocks.4.attn.hook_pattern"]
    )
    want = cache["blocks.4.mlp.hook_post"][0, :, 100].tolist()
    assert neuron["values"] == pytest.approx(want, abs=1e-5)
    pattern = cache["blocks.4.attn.hook_pattern"][0, 2]
    assert [len(r) for r in head["values"]] == [1, 2, 3, 4, 5]
    for q, row in enumerate(head["values"]):
        assert row == pytest.approx(pattern[q, : q + 1].tolist(), abs=1e-5)
    assert head["totalOut"] == pytest.approx([1.0] * 5, abs=1e-5)


def test_batched_general_form(server: Server) -> None:
    """`/batched`: a node table, a layer of derived scalars and scored tokens from one pass; the
    node table equals `/batched_tdb`'s."""
    spec = {"prompt": IOI, "targetTokens": [" Mary"], "distractorTokens": [" John"]}
    node = {
        "nodeType": "attention_head",
        "layerIndex": 23,
        "tokenIndex": 13,
        "componentIndex": 0,
        "attendedTokenIndex": 1,
    }
    body = {
        "subRequests": [
            {
                "inferenceRequestSpec": spec,
                "processingRequestSpecByName": {
                    "table": {"specType": "top_k", "k": 5},
                    "mlp3": {
                        "specType": "derived_scalars",
                        "nodeType": "mlp_neuron",
                        "layerIndex": 3,
                        "componentIndices": [0, 1],
                    },
                    "views": {"specType": "scored_tokens", "nodes": [node], "k": 3},
                },
            }
        ]
    }
    status, _, out = http(server, "/batched", body)
    assert status == 200, out
    results = out["subResponses"][0]["processingResultsByName"]
    status, _, tdb = http(
        server, "/batched_tdb", {"subRequests": [spec | {"topAndBottomKForNodeTable": 5}]}
    )
    table = [(r["node"], r["directEffect"]) for r in results["table"]["nodeTable"]]
    assert table == [(r["node"], r["directEffect"]) for r in tdb["subResponses"][0]["nodeTable"]]
    assert len(results["mlp3"]["values"]) == len(tdb["subResponses"][0]["tokenIds"])
    assert all(len(row) == 2 for row in results["mlp3"]["values"])
    [views] = results["views"]["tokenViews"]
    assert len(views["upvotedOutputTokens"]) == 3 and len(views["upvotingKeyTokens"]) == 3
