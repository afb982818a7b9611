"""Autoencoder latents over HTTP: `tdb serve --autoencoder` with autoencoders written here in the
three formats (native folder, SAELens folder, OpenAI state dict through the HOOK=PATH form), a
real uvicorn server, and the library's engine on the same model with the same files as the
reference. Errors are 4xx naming the field."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from neuron_explainer.activations import (
    Engine,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    SubRequest,
)
from neuron_explainer.models import HookedTransformer
from neuron_explainer.models.autoencoder_formats import (
    load_autoencoder_specs,
    parse_autoencoder_spec,
    save_autoencoder,
)
from neuron_explainer.models.autoencoders import SparseAutoencoder
from tests.activations.test_autoencoder_latents import random_autoencoder
from tests.server.test_api import IOI, LIB_METRICS, METRICS, http
from tests.servers import ROOT, Server, start_server, stop_server

MLP_LATENT, ATTN_LATENT = NodeType.MLP_AUTOENCODER_LATENT, NodeType.ATTENTION_AUTOENCODER_LATENT


def write_saelens(folder: Path, ae: SparseAutoencoder) -> Path:
    """A SAELens (>= 6) TopK folder: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec."""
    folder.mkdir(parents=True)
    weights = {"W_enc": ae.W_enc.T, "W_dec": ae.W_dec, "b_enc": ae.b_enc, "b_dec": ae.b_pre}
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors")
    )
    cfg = {
        "architecture": "topk",
        "k": ae.cfg.k,
        "d_in": ae.d_in,
        "d_sae": ae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": ae.hook_name, "model_name": "smollm2-135m"},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_openai(path: Path, ae: SparseAutoencoder) -> Path:
    """An OpenAI `sparse_autoencoder` ReLU state dict, saved where its layout says nothing about
    the hook point (so HOOK= must give it)."""
    state = {
        "encoder.weight": ae.W_enc.contiguous(),  # [n, d]
        "latent_bias": ae.b_enc,
        "decoder.weight": ae.W_dec.T.contiguous(),  # [d, n]
        "pre_bias": ae.b_pre,
        "activation": "ReLU",
        "activation_state_dict": {},
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def autoencoder_specs(
    tmp_path_factory: pytest.TempPathFactory, default_model: HookedTransformer
) -> list[str]:
    folder = tmp_path_factory.mktemp("autoencoders")
    mlp_out = random_autoencoder(
        default_model, "blocks.5.hook_mlp_out", "relu", None, "none", 512, 0
    )
    attn_out = random_autoencoder(
        default_model, "blocks.6.hook_attn_out", "topk", 16, "none", 384, 1
    )
    post = random_autoencoder(default_model, "blocks.3.mlp.hook_post", "relu", None, "none", 256, 2)
    return [
        str(save_autoencoder(mlp_out, folder / "native")),
        str(write_saelens(folder / "saelens", attn_out)),
        f"blocks.3.mlp.hook_post={write_openai(folder / 'post.pt', post)}",
    ]


@pytest.fixture(scope="module")
def ae_server(
    tmp_path_factory: pytest.TempPathFactory, autoencoder_specs: list[str]
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("ae_server") / "server.log"
    args = ["--model", "smollm2-135m", "--device", "cpu", "--cors-origin", "http://localhost:5173"]
    for spec in autoencoder_specs:
        args += ["--autoencoder", spec]
    srv = start_server(args, log)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def engine(default_model: HookedTransformer, autoencoder_specs: list[str]) -> Iterator[Engine]:
    """The reference: the library's engine on the session's model with the same files attached."""
    attached = [
        default_model.attach_autoencoder(ae) for ae in load_autoencoder_specs(autoencoder_specs)
    ]
    yield Engine(default_model)
    for ae in attached:
        default_model.detach_autoencoder(ae.hook_name)


def wire_node(node: NodeIndex) -> dict[str, Any]:
    out: dict[str, Any] = {
        "nodeType": "autoencoder_latent" if node.node_type.is_latent else node.node_type.value,
        "layerIndex": node.layer,
        "tokenIndex": node.token,
        "componentIndex": node.component,
        "attendedTokenIndex": node.attended_token,
    }
    if node.node_type.is_latent:
        out["autoencoderSide"] = node.node_type.autoencoder_side
    return out


LATENTS = {
    "componentTypeForMlp": "autoencoder_latent",
    "componentTypeForAttention": "autoencoder_latent",
}
LEFT = {"prompt": IOI, "targetTokens": [" Mary"], "distractorTokens": [" John"]}


def library_request(**kw: Any) -> SubRequest:
    return SubRequest(
        IOI,
        [" Mary"],
        [" John"],
        component_type_for_mlp="autoencoder_latent",
        component_type_for_attention="autoencoder_latent",
        **kw,
    )


def test_model_info_lists_the_autoencoders(ae_server: Server) -> None:
    status, _, info = http(ae_server, "/model_info", None, method="GET")
    assert status == 200, info
    assert "autoencoder_latent" in info["nodeTypes"]
    by_hook = {a["hookName"]: a for a in info["autoencoders"]}
    assert set(by_hook) == {
        "blocks.3.mlp.hook_post",
        "blocks.5.hook_mlp_out",
        "blocks.6.hook_attn_out",
    }
    native, saelens, openai = (
        by_hook["blocks.5.hook_mlp_out"],
        by_hook["blocks.6.hook_attn_out"],
        by_hook["blocks.3.mlp.hook_post"],
    )
    assert native | {"source": None} == {
        "name": "blocks.5.hook_mlp_out",
        "hookName": "blocks.5.hook_mlp_out",
        "layerIndex": 5,
        "autoencoderSide": "mlp",
        "nLatents": 512,
        "dIn": 576,
        "activation": "relu",
        "k": None,
        "inputNormalization": "none",
        "format": "native",
        "source": None,
    }
    assert native["source"].endswith("native")
    assert (saelens["autoencoderSide"], saelens["activation"], saelens["k"]) == (
        "attention",
        "topk",
        16,
    )
    assert (saelens["format"], saelens["nLatents"]) == ("saelens", 384)
    assert (openai["autoencoderSide"], openai["format"], openai["dIn"]) == ("mlp", "openai", 1536)
    # The node type descriptions say where the latents are: the layers holding an autoencoder of
    # each side, with its width; latents replace neurons / heads there.
    status, _, served = http(ae_server, "/node_types", None, method="GET")
    assert status == 200 and served["nodeTypes"] == info["nodeTypeDescriptions"]
    described = {d["name"]: d for d in served["nodeTypes"]}
    mlp, attn = described["mlp_autoencoder_latent"], described["attention_autoencoder_latent"]
    assert (mlp["nodeType"], mlp["autoencoderSide"], mlp["replaces"]) == (
        "autoencoder_latent",
        "mlp",
        "mlp_neuron",
    )
    assert (mlp["layers"], mlp["widths"]) == ([3, 5], [openai["nLatents"], 512])
    assert (attn["layers"], attn["widths"], attn["replaces"]) == ([6], [384], "attention_head")


def test_latent_node_table_equals_library(ae_server: Server, engine: Engine) -> None:
    status, _, out = http(ae_server, "/batched_tdb", {"subRequests": [LEFT | LATENTS]})
    assert status == 200, out
    [lib] = engine.run([library_request()])
    [wire] = out["subResponses"]
    assert [row["node"] for row in wire["nodeTable"]] == [wire_node(n) for n in lib.nodes]
    for metric, lib_metric in zip(METRICS, LIB_METRICS, strict=True):
        for row, want in zip(wire["nodeTable"], lib.metrics[lib_metric], strict=True):
            assert want is not None and math.isclose(row[metric], want, rel_tol=1e-5, abs_tol=1e-6)
    latent_rows = [r for r in wire["nodeTable"] if r["node"]["nodeType"] == "autoencoder_latent"]
    assert {(r["node"]["autoencoderSide"], r["node"]["layerIndex"]) for r in latent_rows} == {
        ("mlp", 3),
        ("mlp", 5),
        ("attention", 6),
    }
    # Neurons and heads of the other layers stay; the replaced ones are gone.
    others = {(r["node"]["nodeType"], r["node"]["layerIndex"]) for r in wire["nodeTable"]}
    assert not others & {("mlp_neuron", 3), ("mlp_neuron", 5), ("attention_head", 6)}
    assert any(t == "mlp_neuron" for t, _ in others) and any(
        t == "attention_head" for t, _ in others
    )
    assert {"mlp_autoencoder_latent", "attention_autoencoder_latent"} <= set(wire["tokenSums"])
    attn = [r for r in latent_rows if r["node"]["autoencoderSide"] == "attention"]
    assert attn and all(r["tokenViews"]["upvotedOutputTokens"] for r in latent_rows)
    assert any(r["tokenViews"]["tokenPairAttributions"] for r in attn)
    for r in attn:
        view = lib.token_views[next(n for n in lib.nodes if wire_node(n) == r["node"])]
        assert [a["keyTokenIndex"] for a in r["tokenViews"]["tokenPairAttributions"]] == [
            a.key_token_index for a in view.token_pair_attributions
        ]


def test_latent_ablation_and_trace_equal_library(ae_server: Server, engine: Engine) -> None:
    [table] = engine.run([library_request(token_views=False)])
    node = max(
        (n for n in table.nodes if n.node_type == MLP_LATENT and n.layer == 5),
        key=lambda n: abs(table.metrics["direct_effect"][table.nodes.index(n)] or 0),
    )
    # The side may be left out: layer 5 holds one autoencoder.
    short = {k: v for k, v in wire_node(node).items() if k != "autoencoderSide"}
    ablated = LEFT | LATENTS | {"nodeAblations": [{"node": short}]}
    traced = {"prompt": IOI, "lossFn": "zero", "upstreamNodeToTrace": {"node": wire_node(node)}}
    status, _, out = http(
        ae_server, "/batched_tdb", {"subRequests": [LEFT | LATENTS, ablated, traced | LATENTS]}
    )
    assert status == 200, out
    base, abl, trace = engine.run(
        [
            library_request(),
            library_request(node_ablations=[NodeAblation(node)]),
            library_request(loss_fn="zero", upstream_node_to_trace=NodeToTrace(node)),
        ]
    )
    got = [s["directionValue"] for s in out["subResponses"]]
    want = [base.direction_value, abl.direction_value, trace.direction_value]
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got[1] - got[0]) > 1e-4  # the ablation moved D
    assert "latent" in out["subResponses"][2]["traceDescription"]


def test_derived_scalars_of_a_latent(
    ae_server: Server, default_model: HookedTransformer, engine: Engine
) -> None:
    prompt = "The capital of France is"
    body = {
        "prompt": prompt,
        "nodeType": "autoencoder_latent",
        "layerIndex": 6,
        "componentIndex": 7,
    }
    status, _, out = http(ae_server, "/derived_scalars", body)
    assert status == 200, out
    ae = default_model.autoencoders["blocks.6.hook_attn_out"]
    _, cache = default_model.run_with_cache(torch.tensor([out["tokenIds"]]), names=[ae.hook_name])
    assert out["values"] == pytest.approx(
        ae.encode(cache[ae.hook_name][0])[:, 7].tolist(), abs=1e-5
    )

    # /batched: a whole layer of latents, and a top-k table with latents, from one pass.
    spec = {"prompt": prompt, "targetTokens": [" Paris"], "distractorTokens": [" London"]}
    queries = {
        "layer": {
            "specType": "derived_scalars",
            "nodeType": "autoencoder_latent",
            "layerIndex": 3,
            "autoencoderSide": "mlp",
            "metric": "activation",
        },
        "table": {"specType": "top_k", "nodeTypes": ["embedding", "autoencoder_latent"], "k": 3},
    }
    status, _, out = http(
        ae_server,
        "/batched",
        {"subRequests": [{"inferenceRequestSpec": spec, "processingRequestSpecByName": queries}]},
    )
    assert status == 200, out
    results = out["subResponses"][0]["processingResultsByName"]
    post_ae = default_model.autoencoders["blocks.3.mlp.hook_post"]
    _, cache = default_model.run_with_cache(
        torch.tensor([out["subResponses"][0]["tokenIds"]]), names=[post_ae.hook_name]
    )
    want = post_ae.encode(cache[post_ae.hook_name][0])
    assert torch.tensor(results["layer"]["values"]) == pytest.approx(want, abs=1e-5)
    types = {r["node"]["nodeType"] for r in results["table"]["nodeTable"]}
    assert types == {"embedding", "autoencoder_latent"}


def error(server: Server, path: str, body: dict[str, Any]) -> tuple[int, str]:
    status, headers, out = http(server, path, body)
    assert set(out) == {"message", "detail", "requestId"}
    assert headers.get("access-control-allow-origin") == "http://localhost:5173"
    return status, out["message"]


def ablate(node: dict[str, Any]) -> dict[str, Any]:
    return {"subRequests": [LEFT | LATENTS | {"nodeAblations": [{"node": node}]}]}


LATENT_NODE = {
    "nodeType": "autoencoder_latent",
    "layerIndex": 5,
    "tokenIndex": 2,
    "componentIndex": 1,
}


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        (
            ablate(LATENT_NODE | {"layerIndex": 4}),
            400,
            ["subRequests[0].nodeAblations[0].node.layerIndex", "layer 4 holds no autoencoder"],
        ),
        (
            ablate(LATENT_NODE | {"componentIndex": 512}),
            400,
            ["subRequests[0].nodeAblations[0].node.componentIndex", "out of range [0, 512)"],
        ),
        (
            ablate(LATENT_NODE | {"autoencoderSide": "attention"}),
            400,
            ["subRequests[0].nodeAblations[0].node.layerIndex", "attention-side"],
        ),
        (
            ablate(
                {
                    "nodeType": "mlp_neuron",
                    "layerIndex": 5,
                    "tokenIndex": 2,
                    "autoencoderSide": "mlp",
                }
            ),
            400,
            ["subRequests[0].nodeAblations[0].node.autoencoderSide"],
        ),
        (
            ablate(LATENT_NODE | {"autoencoderSide": "resid"}),
            422,
            ["subRequests[0].nodeAblations[0].node.autoencoderSide"],
        ),
    ],
    ids=[
        "layer without an autoencoder",
        "latent out of range",
        "wrong side",
        "side on a neuron",
        "unknown side",
    ],
)
def test_latent_errors_name_the_field(
    ae_server: Server, body: dict[str, Any], status: int, needles: list[str]
) -> None:
    got, message = error(ae_server, "/batched_tdb", body)
    assert got == status, message
    for needle in needles:
        assert needle in message, message


def test_derived_scalars_errors(ae_server: Server) -> None:
    body = {"prompt": IOI, "nodeType": "autoencoder_latent", "layerIndex": 7, "componentIndex": 0}
    status, message = error(ae_server, "/derived_scalars", body)
    assert status == 400 and message.startswith("layerIndex: layer 7 holds no autoencoder"), message
    status, message = error(
        ae_server, "/derived_scalars", body | {"layerIndex": 5, "componentIndex": 9999}
    )
    assert status == 400 and message.startswith("componentIndex"), message


def test_server_without_autoencoders_refuses_latents(server: Server) -> None:
    status, message = error(server, "/batched_tdb", ablate(LATENT_NODE))
    assert status == 400 and "subRequests[0].nodeAblations[0].node.nodeType" in message
    assert "--autoencoder" in message
    status, _, info = http(server, "/model_info", None, method="GET")
    assert info["autoencoders"] == [] and "autoencoder_latent" not in info["nodeTypes"]


def test_autoencoder_specs_and_cli_errors(tmp_path: Path, autoencoder_specs: list[str]) -> None:
    assert parse_autoencoder_spec("blocks.6.hook_mlp_out=/a/b=c.pt") == (
        "blocks.6.hook_mlp_out",
        Path("/a/b=c.pt"),
    )
    assert parse_autoencoder_spec("/a/b=c.pt") == (None, Path("/a/b=c.pt"))
    # A folder holding several autoencoders loads each; HOOK= cannot name several.
    folder = Path(autoencoder_specs[0]).parent
    hooks = {
        ae.hook_name
        for ae in load_autoencoder_specs([str(folder / "native"), str(folder / "saelens")])
    }
    assert hooks == {"blocks.5.hook_mlp_out", "blocks.6.hook_attn_out"}
    with pytest.raises(ValueError, match="names one hook point"):
        load_autoencoder_specs([f"blocks.1.hook_mlp_out={folder}"])
    with pytest.raises(ValueError, match="cannot tell which hook point"):
        load_autoencoder_specs([str(folder / "post.pt")])  # an OpenAI file outside their layout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "activation_server",
            "--no-model",
            "--autoencoder",
            autoencoder_specs[0],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--autoencoder needs a model" in run.stderr
