"""Dataset examples, the datasets on the home page and the jobs panel in a real browser (docs/ui.md),
against servers of the real default model started with a collated store (`--dataset`) or building
one in the background (`--auto-dataset`, conftest.py).

The `--auto-dataset` server lives for the session and collates once: the test watching its
collation start runs before every other browser test and test_jobs.py, which needs it finished,
after them (conftest.pytest_collection_modifyitems), so the collation runs while the other tests
do; this module's last test checks its progress."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect

from tests.e2e.conftest import (
    AUTO_TOKENS,
    MODEL,
    job_tokens,
    open_jobs_panel,
    open_page,
    screenshot,
    serve_store,
)
from tests.e2e.test_debugger import wait_for_table
from tests.servers import Server, call, post

IOI_QUERY = "When+Mary+and+John+went+to+the+store%2C+John+gave+a+drink+to"
FULL_RED = "rgba(220, 38, 38, 0.85)"  # lib/colors.ts at intensity 1 (the dataset max)


@pytest.fixture(scope="module")
def dataset_server(small_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_store(small_store, tmp_path_factory)


@pytest.fixture
def dpage(browser: Browser, dataset_server: Server) -> Iterator[Page]:
    yield from open_page(browser, dataset_server)


def test_jobs_indicator_shows_the_running_collation(collating_page: Page) -> None:
    """The first browser test to run (conftest.collating_page): starts the --auto-dataset server
    (for the whole session, so its collation runs while the other browser tests do)."""
    page = collating_page
    open_jobs_panel(page)
    job = page.get_by_test_id("job").first
    expect(job).to_have_attribute("data-status", "running")
    expect(job).to_contain_text(f"collate {AUTO_TOKENS:,} tokens")
    expect(job.get_by_test_id("job-tokens")).to_contain_text("tokens")
    expect(page.get_by_test_id("jobs-indicator")).to_contain_text("1 job running")


def _children(pid: int) -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _stat(int(p.name)).get("ppid") == pid
    ]


def _stat(pid: int) -> dict[str, str | int]:
    """State and parent of a process (/proc/PID/stat), {} once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    return {"state": fields[0], "ppid": int(fields[1])}


def test_the_collation_waits_while_the_model_runs_a_request(
    collating_page: Page, auto_server: Server
) -> None:
    """The server stops its background collation (the child process) while the model runs a
    request, so a request keeps its speed, and lets it go on afterwards."""
    [child] = [
        pid
        for pid in _children(auto_server.process.pid)
        if b"collate" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    states: list[str | int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            states.append(_stat(child).get("state", "gone"))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    prompt = (
        "The harbour town woke slowly on winter mornings, and the gulls followed the boats. " * 12
    )
    body = {
        "subRequests": [{"prompt": prompt, "targetTokens": [" the"], "distractorTokens": [" a"]}]
    }
    try:
        status, answer = call(auto_server, "/batched_tdb", body, timeout=300)
    finally:
        done.set()
        watcher.join()
    assert status == 200, answer
    assert "T" in states  # stopped (SIGSTOP) while the request ran
    deadline = time.monotonic() + 10
    while _stat(child).get("state") == "T" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stat(child).get("state") != "T"  # and continued once the model was idle
    open_jobs_panel(collating_page)
    expect(collating_page.get_by_test_id("jobs-indicator")).to_contain_text("1 job running")


def test_node_page_shows_neuron_dataset_examples(dpage: Page, dataset_server: Server) -> None:
    record = post(dataset_server, "/neuron_record", {"layerIndex": 1, "componentIndex": 5})
    dpage.goto(f"/{MODEL}/mlp_neuron/1/5?prompt=When+Mary+and+John+went+to+the+store")
    card = dpage.get_by_test_id("dataset-examples")
    expect(card.get_by_test_id("dataset-stats")).to_contain_text("max")
    expect(card.get_by_test_id("dataset-stats")).to_contain_text("4,096 tokens")
    expect(card.get_by_test_id("dataset-name")).to_have_text("small")
    top = card.get_by_test_id("top-examples")
    expect(top.get_by_test_id("excerpt")).to_have_count(5)
    # Heat-mapped tokens: the strongest token of the top excerpt is at the dataset max.
    first = top.get_by_test_id("excerpt-tokens").first
    colours = first.locator(".token").evaluate_all("els => els.map(e => e.style.background)")
    assert len(colours) == len(record["mostPositiveActivationRecords"][0]["tokens"])
    assert FULL_RED in colours
    assert sum(c not in ("", "transparent") for c in colours) > 5
    card.get_by_test_id("show-all").click()
    n_top = len(record["mostPositiveActivationRecords"])
    expect(top.get_by_test_id("excerpt")).to_have_count(n_top)
    expect(card.get_by_test_id("random-examples").get_by_test_id("excerpt")).to_have_count(
        len(record["randomSample"])
    )
    # The histogram holds every token of the random sample, with the quantile boundaries marked.
    histogram = card.get_by_test_id("activation-histogram")
    expect(histogram.get_by_test_id("histogram-marker")).to_have_count(
        len(record["quantileBoundaries"])
    )
    counts = histogram.get_by_test_id("histogram-bar").evaluate_all(
        "els => els.map(e => Number(e.dataset.count))"
    )
    assert sum(counts) == sum(len(r["tokens"]) for r in record["randomSample"])
    # The prompt of interest is scaled like the dataset examples.
    expect(dpage.get_by_test_id("activation-scale").first).to_contain_text("dataset max")
    card.get_by_test_id("show-all").click()
    screenshot(dpage, "node-page-dataset-neuron")


def test_node_page_shows_head_dataset_examples(dpage: Page, dataset_server: Server) -> None:
    record = post(dataset_server, "/attention_head_record", {"layerIndex": 1, "headIndex": 3})
    dpage.goto(f"/{MODEL}/attention_head/1/3")
    card = dpage.get_by_test_id("dataset-examples")
    expect(card.get_by_test_id("dataset-stats")).to_contain_text("small")
    top = card.get_by_test_id("top-examples")
    expect(top.get_by_test_id("excerpt")).to_have_count(5)
    tokens = top.get_by_test_id("excerpt-tokens").first.locator(".token")
    before = tokens.evaluate_all("els => els.map(e => e.style.background)")
    assert sum(c not in ("", "transparent") for c in before) > 0
    # Toggle: coloured by how much each token attends (max out) instead of being attended to.
    expect(card.get_by_test_id("head-mode-in")).to_have_attribute("aria-pressed", "true")
    card.get_by_test_id("head-mode-out").click()
    expect(card.get_by_test_id("head-mode-out")).to_have_attribute("aria-pressed", "true")
    after = tokens.evaluate_all("els => els.map(e => e.style.background)")
    assert after != before
    # Hovering a token shows what it attends to (its row of pairs), nothing after it.
    tokens.nth(10).hover()
    caption = top.get_by_test_id("pair-caption")
    expect(caption).to_contain_text("(10) attends to:")
    hovered = tokens.evaluate_all("els => els.map(e => e.style.background)")
    assert all(c in ("", "transparent") for c in hovered[11:])
    assert any(c not in ("", "transparent") for c in hovered[:11])
    # And in the other mode, which later tokens attend to it.
    card.get_by_test_id("head-mode-in").click()
    tokens.nth(10).hover()
    expect(caption).to_contain_text("(10) is attended from by:")
    hovered = tokens.evaluate_all("els => els.map(e => e.style.background)")
    assert all(c in ("", "transparent") for c in hovered[:10])
    # The histogram has every token pair of the random sample.
    counts = (
        card.get_by_test_id("activation-histogram")
        .get_by_test_id("histogram-bar")
        .evaluate_all("els => els.map(e => Number(e.dataset.count))")
    )
    pairs = sum(len(r["activations"]) for r in record["randomSample"])
    assert sum(counts) == pairs
    tokens.nth(10).hover()
    screenshot(dpage, "node-page-dataset-head")


def alphas(tokens: Locator) -> list[float]:
    """The opacity of each token's heat-map colour (0 for none)."""
    colours = tokens.evaluate_all("els => els.map(e => e.style.background)")
    return [float(c.rsplit(",", 1)[1].rstrip(")")) if c.startswith("rgba") else 0 for c in colours]


def test_head_prompt_is_coloured_on_the_scale_of_the_quantity_shown(
    dpage: Page, dataset_server: Server
) -> None:
    """The prompt of interest and "your own text" of a head are scaled by the dataset max of the
    quantity the page shows (the dataset's metric): the prompt's strongest pair is visible."""
    record = post(dataset_server, "/attention_head_record", {"layerIndex": 1, "headIndex": 3})
    dpage.goto(f"/{MODEL}/attention_head/1/3?prompt={IOI_QUERY}&token=13&attended=1")
    view = dpage.get_by_test_id("prompt-of-interest").get_by_test_id("activations")
    expect(view.get_by_test_id("activation-scale")).to_contain_text("dataset max")
    strongest = max(alphas(view.locator(".token")))
    print(f"strongest token colour alpha: {strongest}")
    assert strongest > 0.1  # not a (nearly) blank heat map
    expect(view.get_by_test_id("activation-scale")).to_contain_text(
        "write magnitude, scaled by its dataset max"
    )
    prompt_max = float(view.get_by_test_id("pair-max").inner_text())
    assert prompt_max / record["maxActivation"] > 0.05  # the same quantity as the dataset max
    dpage.get_by_label("your text").fill("The cat sat on the mat because it was tired")
    dpage.get_by_role("button", name="Run").click()
    own = dpage.get_by_test_id("own-text").get_by_test_id("activations")
    expect(own.get_by_test_id("activation-scale")).to_contain_text("write magnitude")
    assert max(alphas(own.locator(".token"))) > 0.1
    screenshot(dpage, "node-page-head-prompt-scaled")


def test_quantile_bins_and_precision_of_the_max_are_explained(
    dpage: Page, dataset_server: Server
) -> None:
    """Empty by-quantile bins are not listed (they are named once), and where the top excerpt's
    value and the statistics' max differ in the digits shown, the page says why."""
    chosen = None
    for index in range(64):
        record = post(dataset_server, "/neuron_record", {"layerIndex": 0, "componentIndex": index})
        groups = record["randomSampleByQuantile"] or []
        top = max(record["mostPositiveActivationRecords"][0]["activations"])
        if any(len(g) == 0 for g in groups) and f"{top:.3f}" != f"{record['maxActivation']:.3f}":
            chosen = index, record
            break
    assert chosen, "no neuron of layer 0 among the first 64 has an empty by-quantile bin"
    index, record = chosen
    dpage.goto(f"/{MODEL}/mlp_neuron/0/{index}")
    card = dpage.get_by_test_id("dataset-examples")
    expect(card.get_by_test_id("precision-note")).to_contain_text("float16")
    quantiles = card.get_by_test_id("quantile-examples")
    quantiles.locator("summary").click()
    non_empty = sum(1 for g in record["randomSampleByQuantile"] if g)
    expect(quantiles.get_by_test_id("quantile-bin")).to_have_count(non_empty)
    expect(quantiles.get_by_test_id("empty-bins")).to_contain_text("excerpt max")
    for text in quantiles.get_by_test_id("quantile-bin").locator("h4").all_inner_texts():
        assert not text.endswith("(0)")
    histogram = card.get_by_test_id("activation-histogram")  # with its axes named
    expect(histogram.get_by_test_id("histogram-x-label")).to_have_text("activation of a token")
    expect(histogram.get_by_test_id("histogram-y-axis")).to_contain_text("count")


def test_home_lists_the_dataset_and_jumps_to_a_node_page(dpage: Page) -> None:
    dpage.goto("/")
    row = dpage.locator("[data-testid=dataset][data-name=small]")
    expect(row).to_contain_text("4,096 tokens")
    expect(row).to_contain_text("layers 0–1")
    jump = row.get_by_test_id("dataset-jump")
    for bad, message in [
        ("seven", "use the form layer:index"),
        ("5:1", "layer 5 is not in this dataset"),
        ("1:99999", "index 99999 is out of range"),
    ]:
        jump.fill(bad)
        jump.press("Enter")
        expect(row.get_by_test_id("dataset-jump-error")).to_contain_text(message)
    screenshot(dpage, "home-datasets")
    jump.fill("0:7")
    row.get_by_test_id("dataset-go").click()
    expect(dpage).to_have_url(re.compile(rf"/{MODEL}/mlp_neuron/0/7$"))
    expect(dpage.get_by_test_id("node-title")).to_have_text("mlp L0 #7")
    expect(dpage.get_by_test_id("top-examples").get_by_test_id("excerpt").first).to_be_visible()
    dpage.go_back()
    row.get_by_test_id("dataset-kind").select_option("attention_head")
    jump.fill("1:9")
    jump.press("Enter")
    expect(row.get_by_test_id("dataset-jump-error")).to_contain_text("index 9 is out of range")
    jump.fill("1:2")
    jump.press("Enter")
    expect(dpage.get_by_test_id("node-title")).to_have_text("attn L1 H2")
    expect(dpage.get_by_test_id("top-examples").get_by_test_id("excerpt").first).to_be_visible()


def test_node_page_without_datasets_shows_the_servers_message(page: Page) -> None:
    """The default server has no datasets: the card says so, the rest of the page works."""
    page.goto(f"/{MODEL}/mlp_neuron/3/14")
    card = page.get_by_test_id("dataset-examples")
    expect(card.get_by_test_id("no-dataset")).to_contain_text("no collated datasets")
    expect(card.get_by_test_id("no-dataset")).to_contain_text("--dataset")
    expect(card.get_by_role("alert")).to_have_count(0)  # a fact to explain, not an error
    expect(page.get_by_test_id("logit-lens")).to_contain_text("Upvoted output tokens")
    page.get_by_label("your text").fill("The cat sat on the mat")
    page.get_by_role("button", name="Run").click()
    expect(page.get_by_test_id("activation-scale")).to_contain_text("this prompt's max")
    expect(page.get_by_test_id("jobs-indicator")).to_have_count(0)  # no jobs, no indicator
    screenshot(page, "node-page-no-dataset")


def test_jobs_panel_polls_until_no_job_runs(dpage: Page) -> None:
    """/jobs answered by the test (running, running, then failed): the panel follows each poll,
    shows the message and log tail of the failure, and stops polling once nothing runs."""
    job = {
        "id": "collate-default",
        "kind": "collate",
        "description": "collate 8,192 tokens of the default corpus for smollm2-135m",
        "status": "running",
        "output": "/tmp/x.sqlite",
        "tokens": 2048,
        "totalTokens": 8192,
        "tokensPerSecond": 100.0,
        "etaSeconds": 61.4,
        "log": [],
    }
    answers = [
        {**job},
        {**job, "tokens": 4096, "etaSeconds": 40.9},
        {
            **job,
            "status": "failed",
            "tokens": 6144,
            "message": "tdb collate exited with status 1: out of disk",
            "log": ["Traceback (most recent call last):", "OSError: out of disk"],
        },
    ]
    calls: list[int] = []

    def answer(route: Route) -> None:
        calls.append(1)
        body = answers[min(len(calls), len(answers)) - 1]
        route.fulfill(json={"jobs": [body]})

    dpage.route("**/jobs", answer)
    open_jobs_panel(dpage)
    row = dpage.get_by_test_id("job").first
    expect(row.get_by_test_id("job-tokens")).to_contain_text("4,096 / 8,192 tokens (50.0%)")
    expect(row).to_contain_text("ETA 41s")
    expect(row).to_have_attribute("data-status", "failed")
    expect(row.get_by_role("alert")).to_contain_text("out of disk")
    expect(row.get_by_test_id("job-log")).to_contain_text("OSError: out of disk")
    expect(dpage.get_by_test_id("jobs-indicator")).to_contain_text("1 job failed")
    polls = len(calls)
    dpage.wait_for_timeout(7000)  # two polling periods
    assert len(calls) == polls == 3
    screenshot(dpage, "jobs-panel-failed-routed")


def test_jobs_panel_shows_the_collation_progress(apage: Page) -> None:
    """Later in the session: the panel (polling, no reload) shows the tokens collated so far."""
    open_jobs_panel(apage)
    job = apage.get_by_test_id("job").first
    # Progress comes per batch of 2,048 tokens; the first takes ~20-60 s on 2 busy CPUs.
    expect(job.get_by_test_id("job-tokens")).to_contain_text(
        re.compile(rf"[1-9][\d,]* / {AUTO_TOKENS:,} tokens"), timeout=300_000
    )
    assert job_tokens(apage) > 0
    if job.get_attribute("data-status") == "running":
        bar = job.get_by_role("progressbar")
        assert int(bar.get_attribute("aria-valuenow") or "0") > 0
        expect(apage.get_by_test_id("jobs-indicator")).to_contain_text(
            re.compile(r"running · \d+%")
        )
    screenshot(apage, "jobs-panel-running")


def test_mean_ablation_and_an_ablation_value(dpage: Page, dataset_server: Server) -> None:
    """An ablated neuron's value can be typed, or set to its mean over the collated dataset."""
    record = post(dataset_server, "/neuron_record", {"layerIndex": 1, "componentIndex": 5})
    dpage.goto(
        f"/debugger?prompt={IOI_QUERY}&target=+Mary&distractor=+John&ablate=mlp%3A1%3A13%3A5"
    )
    wait_for_table(dpage)
    ablations = dpage.get_by_test_id("ablations")
    ablations.get_by_role("button", name="dataset mean").click()
    dpage.wait_for_url(re.compile(r"ablate=mlp%3A1%3A13%3A5%3D"))
    wait_for_table(dpage)
    value = float(parse_qs(urlparse(dpage.url).query)["ablate"][0].split("=")[1])
    assert value == pytest.approx(record["mean"], rel=1e-5)
    field = ablations.get_by_label("value of mlp L1 #5")
    field.fill("2.5")
    field.press("Enter")
    dpage.wait_for_url(re.compile(r"ablate=mlp%3A1%3A13%3A5%3D2.5"))
    wait_for_table(dpage)
    expect(dpage.get_by_role("alert")).to_have_count(0)
