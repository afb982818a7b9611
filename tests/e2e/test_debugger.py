"""The debugger and node pages in a real browser (docs/ui.md), against the real default model."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from playwright.sync_api import Page, expect

from tests.e2e.conftest import screenshot

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_URL = (
    "/debugger?prompt=When+Mary+and+John+went+to+the+store%2C+John+gave+a+drink+to"
    "&target=+Mary&distractor=+John"
)
DE_LEFT = "[data-testid=node-table] tbody td[data-metric=directEffect][data-side=left]"


def numbers(page: Page, selector: str) -> list[float]:
    return [
        float(t) if t != "–" else float("nan") for t in page.locator(selector).all_inner_texts()
    ]


def wait_for_table(page: Page) -> None:
    """Until the results shown are those of the state in the URL, and nothing is loading."""
    page.wait_for_function(
        """() => {
            const r = document.querySelector('[data-testid=results]');
            return r && r.dataset.loading === 'false'
                && r.dataset.query === window.location.search.slice(1);
        }"""
    )
    expect(page.locator("[data-testid=node-table] tbody tr").first).to_be_visible()


def node_keys(page: Page) -> list[str]:
    rows = page.locator("[data-testid=node-table] tbody tr[data-node]")
    return [rows.nth(i).get_attribute("data-node") or "" for i in range(rows.count())]


def submit_ioi_as_typed(page: Page, *live_tokens: str) -> None:
    """On the empty debugger page: type the IOI prompt (the live tokenization then shows each of
    `live_tokens`), add " Mary" and " John" as target and distractor, submit, wait for the table."""
    page.goto("/debugger")
    page.get_by_label("prompt", exact=True).fill(IOI)
    for text in live_tokens:
        expect(page.get_by_test_id("live-tokens")).to_contain_text(text)
    page.get_by_label("add Targets").fill(" Mary")
    page.get_by_label("add Targets").press("Enter")
    page.get_by_label("add Distractors").fill(" John")
    page.get_by_label("add Distractors").press("Enter")
    page.get_by_role("button", name="Submit").click()
    wait_for_table(page)


def test_submit_ioi_and_see_nodes_sorted_by_direct_effect(page: Page) -> None:
    submit_ioi_as_typed(page, "14 tokens")  # live tokenization
    values = numbers(page, DE_LEFT)
    assert len(values) >= 10
    assert values == sorted(values, reverse=True)  # the default sort: direct effect, descending
    assert float(page.get_by_test_id("d-left").inner_text()) > 3  # D = logit(Mary) - logit(John)
    query = parse_qs(urlparse(page.url).query)
    assert query["prompt"] == [IOI] and query["target"] == [" Mary"]
    screenshot(page, "debugger-ioi")


def test_ablate_from_actions_menu_shows_left_diff_right(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    first = page.locator("[data-testid=node-table] tbody tr[data-node^='attn']").first
    key = first.get_attribute("data-node")
    first.get_by_role("button", name="actions").click()
    page.get_by_role("menuitem", name="Ablate", exact=True).click()
    expect(page.get_by_test_id("ablations")).to_be_visible()
    wait_for_table(page)
    expect(page.get_by_test_id("d-right")).to_be_visible()  # the unablated baseline
    d_left = float(page.get_by_test_id("d-left").inner_text())
    d_right = float(page.get_by_test_id("d-right").inner_text())
    d_diff = float(page.get_by_test_id("d-diff").inner_text())
    assert d_left < d_right  # ablating a head that pushes " Mary" lowers D
    assert abs(d_diff - (d_left - d_right)) < 1e-3
    diff_cells = numbers(page, "td[data-metric=directEffect][data-side=diff]")
    assert any(abs(v) > 1e-6 for v in diff_cells if v == v)
    # The ablated node's own activation is 0 on the left and not on the right.
    row = page.locator(f"tr[data-node='{key}']")
    assert float(row.locator("td[data-metric=activation][data-side=left]").inner_text()) == 0
    assert float(row.locator("td[data-metric=activation][data-side=right]").inner_text()) > 0
    assert "ablate=" in page.url
    screenshot(page, "debugger-ablation")


def test_trace_a_neuron_upstream(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    row = page.locator("[data-testid=node-table] tbody tr[data-node^='mlp']").first
    key = row.get_attribute("data-node") or ""
    layer = int(key.split(":")[1])
    row.get_by_role("button", name="actions").click()
    page.get_by_role("menuitem", name="Trace upstream").click()
    expect(page.get_by_test_id("trace-sentence")).to_contain_text(f"mlp L{layer}")
    wait_for_table(page)
    keys = node_keys(page)
    assert keys and all(int(k.split(":")[1]) <= layer for k in keys)  # only upstream nodes
    screenshot(page, "debugger-trace")


def test_second_prompt_side_by_side(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    page.get_by_role("button", name="Add second prompt").click()
    page.get_by_label("second prompt").fill(IOI.replace("Mary and John", "John and Mary"))
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_test_id("d-right")).to_be_visible()
    wait_for_table(page)
    expect(page.locator("th[data-side=diff]").first).to_be_visible()
    expect(page.locator(".token-table td.differ").first).to_be_visible()  # differing tokens
    assert "prompt2=" in page.url
    screenshot(page, "debugger-two-prompts")


def test_reload_restores_state_from_url(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    page.locator("[data-testid=node-table] tbody tr[data-node^='attn']").first.get_by_role(
        "button", name="actions"
    ).click()
    page.get_by_role("menuitem", name="Ablate", exact=True).click()
    expect(page.get_by_test_id("d-right")).to_be_visible()
    wait_for_table(page)
    before = (node_keys(page), page.get_by_test_id("d-left").inner_text(), page.url)
    page.reload()
    wait_for_table(page)
    expect(page.get_by_test_id("ablations")).to_be_visible()
    after = (node_keys(page), page.get_by_test_id("d-left").inner_text(), page.url)
    assert after == before
    assert page.get_by_label("prompt", exact=True).input_value() == IOI
    page.go_back()  # the state before the ablation
    expect(page.get_by_test_id("ablations")).to_have_count(0)


def test_open_node_page_from_table(page: Page) -> None:
    page.goto(IOI_URL)
    wait_for_table(page)
    link = page.locator("[data-testid=node-table] tbody tr[data-node^='mlp'] a.node-link").first
    name = link.inner_text()
    link.click()
    expect(page.get_by_test_id("node-title")).to_have_text(name)
    expect(page.get_by_test_id("activations").first).to_be_visible()  # the prompt passed along
    expect(page.get_by_test_id("logit-lens")).to_contain_text("Upvoted output tokens")
    screenshot(page, "node-page")
    layer, index = name.split(" L")[1].split(" #")
    page.keyboard.press("ArrowRight")  # next component
    expect(page.get_by_test_id("node-title")).to_have_text(f"mlp L{layer} #{int(index) + 1}")


def test_error_when_target_is_not_one_token(page: Page) -> None:
    page.goto("/debugger?prompt=The+capital+of+France+is&target=+Paris+London")
    alert = page.get_by_test_id("error-left")
    expect(alert).to_contain_text("targetTokens[0]")
    expect(alert).to_contain_text("not a single token")
    expect(page.get_by_test_id("targets")).to_contain_text("is 2 tokens, not one")
    screenshot(page, "debugger-error")


def test_debugger_screenshots_at_two_sizes(page: Page) -> None:
    for width, height in ((1280, 800), (1920, 1080)):
        page.set_viewport_size({"width": width, "height": height})
        page.goto(IOI_URL)
        wait_for_table(page)
        # Usable: the prompt, Submit and the start of the node table fit without sideways scroll.
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        screenshot(page, f"debugger-{width}x{height}", full_page=False)
