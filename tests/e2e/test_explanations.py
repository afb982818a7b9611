"""Explanations in a real browser (docs/ui.md): the node table's explanation column and a component
page's explanations card (the stored ones, Explain, scoring a typed explanation, and the simulated
vs true activations on the held-out excerpts scored), against the real default model serving a
small store explained by `tdb explain` (the no-LLM baseline; conftest.explained_store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from neuron_explainer.explanations import ExplanationReader, StoredExplanation
from tests.e2e.conftest import MODEL, open_page, screenshot, serve_store
from tests.e2e.test_debugger import IOI_URL, wait_for_table
from tests.servers import Server, post

# What the table's rows show, read in one go: the row's component (from its link) and its
# explanation cell (text, hover title, and whether the text is cut to fit).
ROWS_JS = """rows => rows.map(r => {
    const cell = r.querySelector('[data-testid=node-explanation]');
    const text = cell.querySelector('.explanation-text');
    return {
        href: r.querySelector('a.node-link').getAttribute('href'),
        cell: cell.textContent,
        text: text ? text.textContent : null,
        title: cell.getAttribute('title'),
        cut: cell.scrollWidth > cell.clientWidth,
    };
})"""


@pytest.fixture(scope="module")
def explained_server(
    explained_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from serve_store(explained_store, tmp_path_factory)


@pytest.fixture
def epage(browser: Browser, explained_server: Server) -> Iterator[Page]:
    yield from open_page(browser, explained_server)


@pytest.fixture(scope="module")
def reader(explained_store: Path) -> Iterator[ExplanationReader]:
    """The explanations `tdb explain` wrote into the store the server reads."""
    reader = ExplanationReader(explained_store)
    yield reader
    reader.close()


def score_text(stored: StoredExplanation) -> str:
    """A stored explanation's headline score as the UI writes it."""
    return "no score" if stored.score is None else f"{stored.score:.2f}"


def test_node_table_shows_explanations(epage: Page, reader: ExplanationReader) -> None:
    epage.goto(IOI_URL)
    wait_for_table(epage)
    rows: list[dict[str, Any]] = epage.locator(
        "[data-testid=node-table] tbody tr[data-node]"
    ).evaluate_all(ROWS_JS)
    explained = 0
    for row in rows:
        family, layer, index = row["href"].split("?")[0].split("/")[2:5]
        stored = reader.best(family, int(layer), int(index))
        if stored is None:  # layers 2-29, embeddings: nothing shown
            assert row["cell"] == "" and row["title"] is None, row
            continue
        explained += 1
        assert row["text"] == stored.explanation, row
        # The whole text and the score on hover.
        assert row["title"].startswith(f"{stored.explanation}\nscore {score_text(stored)} "), row
    # The prompt's top nodes include explained neurons and heads of layers 0-1, and others.
    assert explained >= 3 and len(rows) - explained >= 3, rows
    # Long explanations are cut to one line (the baseline's run to ~200 characters).
    assert any(r["cut"] for r in rows if r["text"])
    # The expanded row has the whole explanation.
    first = (
        epage.locator("[data-testid=node-table] tbody tr[data-node]")
        .filter(has=epage.locator(".explanation-text"))
        .first
    )
    text = first.locator(".explanation-text").inner_text()
    first.get_by_role("button", name="expand").click()
    expect(epage.get_by_test_id("details-explanation")).to_contain_text(text)
    screenshot(epage, "node-table-explanations")


def test_component_page_explains_on_click(
    epage: Page, explained_server: Server, reader: ExplanationReader
) -> None:
    stored = reader.best("mlp_neuron", 1, 5)
    assert stored is not None and stored.score is not None
    epage.goto(f"/{MODEL}/mlp_neuron/1/5")
    card = epage.get_by_test_id("explanations")
    # The stored explanation with its score and method.
    listed = card.get_by_test_id("stored-explanations").get_by_test_id("explanation")
    expect(listed).to_have_count(1)
    expect(listed.get_by_test_id("explanation-text")).to_have_text(stored.explanation or "")
    expect(listed.get_by_test_id("explanation-score")).to_have_text(score_text(stored))
    expect(listed.get_by_test_id("explanation-method")).to_contain_text(
        "explainer baseline · simulator baseline"
    )
    expect(card.get_by_test_id("new-explanation")).to_have_count(0)

    card.get_by_test_id("explain-button").click()
    fresh = card.get_by_test_id("new-explanation")
    # The baseline is deterministic: the explanation written now is the stored one, same score.
    expect(fresh.get_by_test_id("explanation-text")).to_have_text(stored.explanation or "")
    expect(fresh.get_by_test_id("explanation-score")).to_have_text(score_text(stored))
    # The held-out excerpts it was scored on, true and simulated activations side by side.
    answer = post(
        explained_server,
        "/explain",
        {"nodeType": "mlp_neuron", "layerIndex": 1, "componentIndex": 5},
    )
    scored = answer["explanations"][0]["scoredExcerpts"]
    assert len(scored) == stored.n_scored_excerpts > 5
    section = fresh.get_by_test_id("scored-excerpts")
    expect(section).to_contain_text(f"{len(scored)} held-out excerpts")
    excerpts = section.get_by_test_id("scored-excerpt")
    expect(excerpts).to_have_count(5)
    section.get_by_test_id("scored-show-all").click()
    expect(excerpts).to_have_count(len(scored))
    groups = excerpts.evaluate_all("els => els.map(e => e.dataset.group)")
    assert groups == [e["group"] for e in scored]
    # The first held-out top excerpt: every token on both sides, the simulator's strongest token
    # coloured on both, and its hover text gives both values.
    first, expected = excerpts.first, scored[0]
    true_tokens = first.get_by_test_id("true-activations").locator(".token")
    simulated_tokens = first.get_by_test_id("simulated-activations").locator(".token")
    expect(true_tokens).to_have_count(len(expected["tokens"]))
    expect(simulated_tokens).to_have_count(len(expected["tokens"]))
    sim = expected["simulatedActivations"]
    i = max(range(len(sim)), key=lambda j: sim[j])
    assert sim[i] > 0 and expected["activations"][i] > 0
    for side in (true_tokens, simulated_tokens):
        assert side.nth(i).evaluate("e => e.style.background") not in ("", "transparent")
    title = simulated_tokens.nth(i).get_attribute("title") or ""
    assert f"simulated {sim[i]:.2f}" in title and "true " in title
    screenshot(epage, "component-page-explained")

    # Scoring a typed explanation (another neuron's): its score, on the same excerpts.
    other = reader.best("mlp_neuron", 1, 6)
    assert other is not None and other.explanation
    card.get_by_label("an explanation to score").fill(other.explanation)
    card.get_by_test_id("score-button").click()
    expect(fresh).to_have_attribute("data-kind", "score")
    answer = post(
        explained_server,
        "/score",
        {"layerIndex": 1, "componentIndex": 5, "explanation": other.explanation},
    )
    expected_score = answer["score"]
    shown = "no score" if expected_score is None else f"{expected_score:.2f}"
    expect(fresh.get_by_test_id("explanation-score")).to_have_text(shown)
    expect(fresh.get_by_test_id("scored-excerpt")).to_have_count(5)


def test_head_page_explains_on_click(epage: Page, reader: ExplanationReader) -> None:
    stored = reader.best("attention_head", 1, 2)
    assert stored is not None and stored.scores.roc_auc_score is not None
    epage.goto(f"/{MODEL}/attention_head/1/2")
    card = epage.get_by_test_id("explanations")
    card.get_by_test_id("explain-button").click()
    fresh = card.get_by_test_id("new-explanation")
    expect(fresh.get_by_test_id("explanation-text")).to_have_text(stored.explanation or "")
    # A head's headline score is the ROC AUC.
    expect(fresh.get_by_test_id("explanation-score")).to_have_text(
        f"{stored.scores.roc_auc_score:.2f}"
    )
    expect(fresh.get_by_test_id("explanation-method")).to_contain_text("ROC AUC")
    # Token pairs summarized per token: one coloured token per token on each side.
    first = fresh.get_by_test_id("scored-excerpt").first
    n = first.get_by_test_id("true-activations").locator(".token").count()
    assert n > 1
    expect(first.get_by_test_id("simulated-activations").locator(".token")).to_have_count(n)
