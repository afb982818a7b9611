"""`tdb serve --model gemma3-270m`, the second real model, through its API and in the browser. Gemma
expects BOS before a prompt; its tokenizer says so, and requests that leave `prependBos` unset (as
the UI does) get it. One server for the module: the model loads in ~10 s, its 262k-token vocabulary
makes every request heavier than the default model's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.conftest import open_page, screenshot
from tests.e2e.test_debugger import IOI, submit_ioi_as_typed
from tests.servers import Server, call, post, start_server, stop_server


@pytest.fixture(scope="module")
def gemma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("gemma_server") / "server.log"
    srv = start_server(["--model", "gemma3-270m", "--device", "cpu"], log, timeout_s=300)
    yield srv
    stop_server(srv)


@pytest.fixture
def gpage(browser: Browser, gemma_server: Server) -> Iterator[Page]:
    yield from open_page(browser, gemma_server)


def test_bos_by_default_and_the_ioi_fact(gemma_server: Server) -> None:
    """The debugger's request on the IOI prompt, `prependBos` unset: BOS is the first token, " Mary"
    is the top next token and beats " John" by more than 2 logits; asked for no BOS, the prompt
    starts with its own first word."""
    status, info = call(gemma_server, "/model_info")
    assert status == 200 and info["bosByDefault"] is True and info["bosToken"] == "<bos>"
    tokens = post(gemma_server, "/tokenize", {"text": IOI})["tokenStrings"]
    assert tokens[0] == "<bos>" and tokens[1] == "When"
    bare = post(gemma_server, "/tokenize", {"text": IOI, "prependBos": False})["tokenStrings"]
    assert bare == tokens[1:]
    body = {
        "subRequests": [{"prompt": IOI, "targetTokens": [" Mary"], "distractorTokens": [" John"]}]
    }
    status, answer = call(gemma_server, "/batched_tdb", body, timeout=300)  # ~5 s idle
    assert status == 200, answer
    [wire] = answer["subResponses"]
    assert wire["tokenStrings"][0] == "<bos>"
    assert wire["topOutputTokens"][0]["text"] == " Mary"
    assert wire["directionValue"] > 2.0
    node_types = {row["node"]["nodeType"] for row in wire["nodeTable"]}
    assert {"attention_head", "mlp_neuron"} <= node_types


def test_debugger_runs_the_ioi_prompt(gpage: Page) -> None:
    """The debugger page on the Gemma server, as a user types it: the table fills, D is positive
    and " Mary" heads the model's own predictions."""
    submit_ioi_as_typed(gpage, "15 tokens", "<bos>When")  # <bos>, 13 words and the comma
    assert float(gpage.get_by_test_id("d-left").inner_text()) > 2
    predictions = gpage.locator(".candidates tbody tr:not(.target):not(.distractor) code")
    expect(predictions.first).to_have_text("·Mary")
    assert gpage.locator("[data-testid=node-table] tbody tr[data-node^='attn']").count() > 0
    assert gpage.locator("[data-testid=node-table] tbody tr[data-node^='mlp']").count() > 0
    screenshot(gpage, "debugger-gemma3-ioi")
