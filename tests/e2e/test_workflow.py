"""The researcher's workflow in a real browser (docs/ui.md, issue 14): errors and retries, traces
through a head's value, the prompt card's top k, the JSON inspector, typed token glyphs, a page
whose code cannot load; against the real default model."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from urllib.parse import parse_qs, quote_plus, urlparse

from playwright.sync_api import Page, expect

from tests.e2e.conftest import expect_console_errors, screenshot
from tests.e2e.test_debugger import DE_LEFT, IOI_URL, node_keys, numbers, wait_for_table
from tests.servers import ROOT

ROWS = "[data-testid=node-table] tbody tr[data-node]"
LATENCY = ROOT / "test-artifacts" / "latency.json"


def open_actions(page: Page, row_selector: str) -> None:
    page.locator(row_selector).first.get_by_role("button", name="actions").click()


def shown_count(page: Page) -> int:
    text = page.get_by_test_id("nodes-card").get_by_text(re.compile(r"^\d+ nodes$")).inner_text()
    return int(text.split(" ")[0])


def test_an_error_marks_the_previous_results_as_stale(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    d_before = page.get_by_test_id("d-left").inner_text()
    page.get_by_test_id("targets").get_by_role("button", name="remove  Mary").click()
    page.get_by_label("add Targets").fill(" Paris London")
    page.get_by_label("add Targets").press("Enter")
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_test_id("error-left")).to_contain_text("not a single token")
    # The results below are those of the previous request, and say so.
    expect(page.get_by_test_id("stale-results")).to_contain_text("previous request")
    summary = page.get_by_test_id("summary")
    expect(summary).to_contain_text("Mary")
    expect(summary).not_to_contain_text("Paris")
    assert page.get_by_test_id("d-left").inner_text() == d_before
    screenshot(page, "debugger-stale-after-error")


def test_submit_reruns_after_the_server_could_not_be_reached(page: Page) -> None:
    page.route("**/batched_tdb", lambda route: route.abort())
    page.goto(IOI_URL)
    expect(page.get_by_test_id("error-both")).to_contain_text("cannot reach the server")
    page.unroute("**/batched_tdb")
    page.get_by_role("button", name="Submit").click()  # the same state: it must run again
    wait_for_table(page)
    expect(page.get_by_role("alert")).to_have_count(0)


def test_a_page_whose_code_cannot_load_says_so(page: Page) -> None:
    expect_console_errors(page, "Failed to fetch dynamically imported module")
    page.goto("/")
    expect(page.get_by_test_id("model-name")).to_contain_text("·")
    page.route(re.compile(r".*/assets/NodePage-.*\.js$"), lambda route: route.abort())
    page.get_by_label("layer:index", exact=True).fill("3:14")
    page.get_by_label("layer:index", exact=True).press("Enter")
    error = page.get_by_test_id("page-error")
    expect(error).to_contain_text("could not be loaded")
    expect(
        page.get_by_role("link", name="Debugger", exact=True)
    ).to_be_visible()  # the header stays
    page.unroute(re.compile(r".*/assets/NodePage-.*\.js$"))
    error.get_by_role("button", name="Reload").click()
    expect(page.get_by_test_id("node-title")).to_have_text("mlp L3 #14")


def test_a_value_trace_offers_the_traced_node_as_downstream(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    mlp = page.locator(f"{ROWS}[data-node^='mlp:']").first
    mlp_key = mlp.get_attribute("data-node") or ""
    layer, component = mlp_key.split(":")[1], mlp_key.split(":")[3]
    mlp.get_by_role("button", name="actions").click()
    page.get_by_role("menuitem", name="Trace upstream").click()
    wait_for_table(page)
    # In the neuron's upstream table, a head can be traced through its value into the neuron.
    head = page.locator(f"{ROWS}[data-node^='attn:']").first
    head_key = head.get_attribute("data-node") or ""
    head.get_by_role("button", name="actions").click()
    page.get_by_role("menuitem", name=f"Trace value into mlp L{layer} #{component}").click()
    wait_for_table(page)
    expect(page.get_by_role("alert")).to_have_count(0)
    trace = parse_qs(urlparse(page.url).query)["trace"][0]
    assert trace == f"{head_key}@value>{mlp_key}"
    expect(page.get_by_test_id("trace")).to_contain_text(f"mlp L{layer} #{component}")
    # Its rows are upstream of the head: none of them can be a downstream node.
    open_actions(page, ROWS)
    expect(page.get_by_role("menuitem", name="Ablate", exact=True)).to_be_visible()
    expect(page.get_by_role("menuitem", name="Use as downstream node")).to_have_count(0)
    screenshot(page, "debugger-value-trace-downstream")


def test_a_value_trace_is_described_as_one(page: Page) -> None:
    page.goto(f"{IOI_URL}&trace={quote_plus('attn:10:13:2:1@value>mlp:11:13:5')}")
    wait_for_table(page)
    caption = page.get_by_test_id("direction-values").locator("p").first  # "D = ..."
    expect(caption).to_contain_text("through its value")
    expect(caption).to_contain_text("mlp L11 #5")
    expect(caption).not_to_contain_text("pre-activation of the traced")
    sentence = page.get_by_test_id("trace-sentence")
    expect(sentence).to_contain_text("through its value")
    expect(sentence).to_contain_text("mlp L11 #5")
    expect(sentence).not_to_contain_text("What caused")
    page.goto(f"{IOI_URL}&trace={quote_plus('attn:10:13:2:1@value')}")  # no downstream: the loss
    wait_for_table(page)
    expect(caption).to_contain_text("logit( Mary)")
    expect(caption).to_contain_text("through its value")


def test_the_prompt_cards_top_k_shows_more_rows(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    at_10 = shown_count(page)
    page.get_by_label("top k", exact=True).fill("30")
    page.get_by_role("button", name="Submit").click()
    wait_for_table(page)
    assert page.get_by_label("top k per column").input_value() == "30"
    assert shown_count(page) > at_10
    assert len(node_keys(page)) == shown_count(page)


def test_the_json_inspector_opens_over_the_page(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    head = page.get_by_test_id("summary").locator(".card-head")
    height = head.bounding_box()["height"]  # type: ignore[index]
    page.get_by_test_id("summary").get_by_role("button", name="JSON").click()
    dialog = page.get_by_test_id("json-inspector")
    expect(dialog).to_be_visible()
    box = dialog.bounding_box()
    assert box is not None and box["width"] >= 700  # not squeezed into the card's header
    assert head.bounding_box()["height"] == height  # type: ignore[index]
    expect(dialog).to_contain_text('"subResponses"')
    screenshot(page, "debugger-json-inspector", full_page=False)
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)


def test_typed_space_glyphs_are_spaces(page: Page) -> None:
    page.goto("/debugger?prompt=The+capital+of+France+is")
    for label, typed in (("add Targets", "␣Paris"), ("add Distractors", "·London")):
        page.get_by_label(label).fill(typed)
        page.get_by_label(label).press("Enter")
    expect(page.get_by_test_id("targets").locator(".chip")).to_have_text(re.compile("·Paris"))
    page.get_by_role("button", name="Submit").click()
    wait_for_table(page)
    query = parse_qs(urlparse(page.url).query)
    assert query["target"] == [" Paris"] and query["distractor"] == [" London"]
    expect(page.locator(".chip.warn")).to_have_count(0)
    expect(page.get_by_role("alert")).to_have_count(0)


def test_a_prompt_over_the_limit_states_the_limit(page: Page) -> None:
    """A 413: the message names the limit the server applied (docs/api.md, Limits)."""
    page.goto("/debugger?prompt=" + "+word" * 1100 + "&target=+Mary")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("exceed the maximum of 1024")


ABLATED_HEAD = "attn:24:13:4:1"  # attn L24 H4 from ' to' (13) to ' Mary' (1), a top IOI head


def test_comparison_heat_maps_show_ablated_diff_and_baseline(page: Page) -> None:
    page.goto(f"{IOI_URL}&ablate={quote_plus(ABLATED_HEAD)}")
    wait_for_table(page)
    maps = page.get_by_test_id("heatmaps")
    group = maps.locator(".heatmap-group").first
    labels = group.locator(".heatmap-row .label").all_inner_texts()
    assert labels == ["Ablated", "Diff", "Baseline (no ablations)"]
    expect(maps.get_by_test_id("heatmap-legend")).to_contain_text("raises D")
    # Diff is left − right token by token: ablating a head changes some token's effect.
    diff_titles = maps.locator("[data-side=diff] .token").evaluate_all(
        "els => els.map(e => e.title)"
    )
    diffs = [float(t.rsplit("= ", 1)[1]) for t in diff_titles if "= " in t]
    assert diffs and any(abs(v) > 1e-4 for v in diffs)
    # The ablated run is named so, in the summary as in the heat maps, and its row is marked.
    expect(page.get_by_test_id("summary").locator("th").first).to_have_text("Ablated")
    expect(page.locator(f"tr[data-node='{ABLATED_HEAD}']")).to_have_attribute(
        "data-ablated", "true"
    )
    screenshot(page, "debugger-comparison-heatmaps")


def test_position_zero_rows_without_effect_are_hidden_by_default(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    toggle = page.get_by_test_id("hide-sink")
    expect(toggle).to_be_checked()

    def at_zero(keys: list[str]) -> list[str]:
        return [k for k in keys if k.split(":")[2] == "0" or k.split(":")[4:] == ["0"]]

    shown = node_keys(page)
    des = [abs(v) for v in numbers(page, DE_LEFT)]
    top = max(des)
    for key in at_zero(shown):  # what stays at position 0 has an effect
        row = page.locator(f"tr[data-node='{key}']")
        de = float(row.locator("td[data-metric=directEffect]").inner_text())
        te = float(row.locator("td[data-metric=estimatedTotalEffect]").inner_text())
        assert max(abs(de), abs(te)) >= 0.01 * top * 0.99
    toggle.uncheck()
    everything = node_keys(page)
    assert len(at_zero(everything)) > len(at_zero(shown))
    assert len(everything) > len(shown)


def test_ablate_a_whole_head(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    row = page.locator(f"{ROWS}[data-node^='attn:']").first
    key = row.get_attribute("data-node") or ""
    whole = ":".join(key.split(":")[:4])  # without the attended token
    row.get_by_role("button", name="actions").click()
    page.get_by_role("menuitem", name="Ablate whole head (all keys)").click()
    wait_for_table(page)
    assert parse_qs(urlparse(page.url).query)["ablate"] == [whole]
    expect(page.get_by_test_id("ablations")).to_contain_text("all keys")
    d_left = float(page.get_by_test_id("d-left").inner_text())
    d_right = float(page.get_by_test_id("d-right").inner_text())
    assert abs(d_left - d_right) > 1e-3
    # Every pair of that head at that query token is ablated: its attention is 0 on the left.
    pairs = page.locator(f"{ROWS}[data-node^='{whole}:']")
    assert pairs.count() >= 1
    for i in range(pairs.count()):
        expect(pairs.nth(i)).to_have_attribute("data-ablated", "true")
        left = pairs.nth(i).locator("td[data-metric=activation][data-side=left]").inner_text()
        assert float(left) == 0


def test_trace_breadcrumb_returns_up_the_chain(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    mlp = page.locator(f"{ROWS}[data-node^='mlp:']").first
    mlp_key = mlp.get_attribute("data-node") or ""
    mlp_name = mlp.locator("a.node-link").inner_text()
    mlp.get_by_role("button", name="actions").click()
    page.get_by_role("menuitem", name="Trace upstream").click()
    wait_for_table(page)
    head = page.locator(f"{ROWS}[data-node^='attn:']").first
    head_name = head.locator("a.node-link").inner_text()
    head.get_by_role("button", name="actions").click()
    page.get_by_role("menuitem", name="Trace query", exact=True).click()
    wait_for_table(page)
    crumb = page.get_by_test_id("trace-breadcrumb")
    expect(crumb).to_have_text(f"loss › {mlp_name} › {head_name} (query)")
    crumb.get_by_role("button", name=mlp_name).click()  # one click back to the neuron's trace
    wait_for_table(page)
    query = parse_qs(urlparse(page.url).query)
    assert query["trace"] == [mlp_key] and "trail" not in query
    expect(page.get_by_test_id("trace-sentence")).to_contain_text(mlp_name)
    page.get_by_test_id("trace-breadcrumb").get_by_role("button", name="loss").click()
    wait_for_table(page)
    expect(page.get_by_test_id("trace")).to_have_count(0)
    page.go_back()  # and Back steps through the chain
    wait_for_table(page)
    expect(page.get_by_test_id("trace-breadcrumb")).to_have_text(f"loss › {mlp_name}")


SHORT = "When Mary and John went to the store, John gave a"  # 12 tokens
LONG = (  # ~200 tokens
    "The committee met on Tuesday to review the budget for the coming year. After a long "
    "discussion about the costs of the new library, the roads and the schools, the members "
    "agreed to postpone the vote until the next meeting. Mary, who had chaired the committee "
    "for six years, said that the town could not afford to wait much longer, because the "
    "prices of materials were rising every month and the contractors would not hold their "
    "offers forever. John disagreed: he thought the town should first ask the residents what "
    "they wanted, and he proposed a public hearing in the town hall. In the end they settled "
    "on a compromise. The hearing would take place in two weeks, and the vote would follow "
    "immediately afterwards, whatever the outcome. When the meeting was over, Mary and John "
    "walked to the station together. It had been a long evening, and both of them were tired, "
    "but they agreed that the meeting had gone better than expected, and John gave the report to"
)


# Clicks Submit and resolves with the milliseconds until the results of that request are shown: a
# request runs (the spinner, or "Running the model…" before any result), then the results of the
# URL's state are in the page with nothing loading, painted (the next animation frame).
CLICK_TO_RENDERED = """() => new Promise((resolve) => {
    let ran = false;
    const check = () => {
        const r = document.querySelector('[data-testid=results]');
        if ((r && r.dataset.loading === 'true') || document.querySelector('p.loading')) ran = true;
        return ran && r && r.dataset.loading === 'false'
            && r.dataset.query === window.location.search.slice(1)
            && r.querySelector('[data-testid=node-table] tbody tr');
    };
    const start = performance.now();
    const observer = new MutationObserver(() => {
        if (check()) {
            observer.disconnect();
            requestAnimationFrame(() => resolve(performance.now() - start));
        }
    });
    observer.observe(document.body, {subtree: true, childList: true, attributes: true});
    [...document.querySelectorAll('button')].find((b) => b.textContent === 'Submit').click();
})"""


def test_latency_from_submit_to_rendered_table(page: Page) -> None:
    """Click to rendered (docs in README): Submit on a 12-token and a ~200-token prompt, timed in
    the browser from the click until the node table of that request is shown. Each prompt runs
    twice (the first run of a shape warms the model up); the second is reported."""
    timings: dict[str, float] = {}
    for prompt in (SHORT, LONG):
        page.goto("/debugger")
        page.get_by_label("prompt", exact=True).fill(prompt)
        page.get_by_label("add Targets").fill(" Mary")
        page.get_by_label("add Targets").press("Enter")
        live = page.get_by_test_id("live-tokens")
        expect(live).to_contain_text(" tokens")
        n = int(re.search(r"(\d+) tokens", live.inner_text()).group(1))  # type: ignore[union-attr]
        for _ in range(2):
            ms = page.evaluate(CLICK_TO_RENDERED)
        timings[f"{n} tokens"] = ms / 1000
        wait_for_table(page)
    LATENCY.parent.mkdir(parents=True, exist_ok=True)
    LATENCY.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"click to rendered: {timings}")
    assert len(timings) == 2 and all(0 < s < 120 for s in timings.values())


def test_csv_export_follows_the_visible_sort_and_filter(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    page.locator("[data-testid=node-type-filter][data-kind-label='attention heads']").uncheck()
    page.locator("th[data-metric=writeMagnitude]").click()  # sort by write magnitude, descending
    shown = node_keys(page)
    names = page.locator(f"{ROWS} a.node-link").all_inner_texts()
    assert shown and not any(k.startswith("attn:") for k in shown)
    with page.expect_download() as download:
        page.get_by_test_id("nodes-card").get_by_role("button", name="CSV").click()
    header, *rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    assert all(re.fullmatch(r"[a-z_]+", c) for c in header), header  # one naming style
    column = header.index("write_magnitude")
    assert [r[0] for r in rows] == names  # the rows shown, in the order shown
    magnitudes = [float(r[column]) for r in rows]
    assert magnitudes == sorted(magnitudes, reverse=True)


def test_cancel_a_running_request(page: Page) -> None:
    page.goto(f"/debugger?prompt={quote_plus(LONG)}&target=+Mary")
    running = page.get_by_test_id("running")
    expect(running).to_contain_text("running")
    running.get_by_role("button", name="Cancel").click()
    expect(page.get_by_test_id("cancelled")).to_be_visible()
    expect(running).to_have_count(0)
    expect(page.get_by_test_id("results")).to_have_count(0)
    # The long prompt's live preview shows its ends, all of it on demand.
    live = page.get_by_test_id("live-tokens")
    expect(live.get_by_role("button", name=re.compile(r"show all \d+"))).to_be_visible()
    assert live.locator(".token").count() == 2 * 48 + 1
    page.get_by_role("button", name="Submit").click()  # and it runs again
    wait_for_table(page)
    expect(page.get_by_test_id("cancelled")).to_have_count(0)
