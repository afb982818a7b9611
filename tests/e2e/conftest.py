"""Browser tests: Playwright drives Debian's headless Chromium against a real server with the real
default model, serving the built UI. Screenshots go to test-artifacts/screenshots/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from neuron_explainer.datasets.corpus import default_corpus_dir
from tests.servers import ROOT, Server, call, start_server, stop_server

MODEL = "smollm2-135m"
AUTO_TOKENS = 8192  # --auto-dataset-tokens of the auto_server fixture
COLLATION_LIMIT_S = 1200  # for the auto_server collation to end, however busy the CPUs are
# A debugger request takes ~1 s here, several when the 2 CPUs are busy: wait generously.
expect.set_options(timeout=90_000)
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
# Without the background-networking flags Chromium floods a closed network with connection
# attempts (it looks up Google's hosts at every start).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for candidate in (
        os.environ.get("CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        message = "Debian's chromium is not installed (`make test` installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the browser tests, never skip them
        pytest.skip(message)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def ui_server(server: Server) -> Server:
    if not (ROOT / "neuron_viewer" / "dist" / "index.html").exists():
        pytest.fail("the UI is not built: run `make ui` (make test builds it)")
    return server


# Console errors a page may log without failing its test: failed requests (Chromium logs every
# 4xx/5xx answer and refused connection, which tests provoke on purpose). Anything else logged with
# console.error, and any uncaught page error, fails the test unless it declared it.
EXPECTED_CONSOLE = ("Failed to load resource",)
_expected: dict[int, list[str]] = {}


def expect_console_errors(page: Page, *fragments: str) -> None:
    """Console errors containing one of `fragments` are expected in this test's page."""
    _expected.setdefault(id(page), []).extend(fragments)


def watch_console(context: BrowserContext) -> list[str]:
    """The console errors and uncaught errors of every page of `context`, as they happen."""
    errors: list[str] = []
    context.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    context.on("weberror", lambda e: errors.append(f"uncaught: {e.error}"))
    return errors


def assert_no_console_errors(errors: list[str], *expected: str) -> None:
    """Fails on any of `errors` but failed requests and those containing one of `expected`."""
    allowed = (*EXPECTED_CONSOLE, *expected)
    unexpected = [e for e in errors if not any(a in e for a in allowed)]
    assert not unexpected, f"console errors in the page: {unexpected}"


def open_page(browser: Browser, server: Server) -> Iterator[Page]:
    """A fresh browser context on `server` (a generator for fixtures). The test fails on a console
    error or uncaught page error it did not expect (expect_console_errors)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.url)
    errors = watch_console(context)
    page = context.new_page()
    page.set_default_timeout(90_000)
    yield page
    context.close()
    assert_no_console_errors(errors, *_expected.pop(id(page), []))


@pytest.fixture
def page(browser: Browser, ui_server: Server) -> Iterator[Page]:
    yield from open_page(browser, ui_server)


def tdb_command() -> list[str]:
    """The `tdb` CLI of this environment (the console script next to the interpreter)."""
    script = Path(sys.executable).parent / "tdb"
    return [str(script)] if script.exists() else [sys.executable, "-m", "neuron_explainer.cli"]


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small collated store of the default model, built once with the real CLI: 4,096 tokens of
    the default corpus, layers 0 and 1, neurons and heads (~20-40 s here)."""
    out = tmp_path_factory.mktemp("store") / "small.sqlite"
    command = [*tdb_command(), "collate", "--model", "smollm2-135m", "--tokens", "4096"]
    command += ["--layers", "0,1", "--out", str(out), "--commit-every", "4"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"tdb collate failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return out


@pytest.fixture(scope="session")
def explained_store(small_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of small_store explained by the real CLI (`tdb explain`, the no-LLM baseline;
    ~20 s here): every neuron and head of layers 0 and 1 carries an explanation and its score."""
    out = tmp_path_factory.mktemp("explained") / "explained.sqlite"
    shutil.copy(small_store, out)
    command = [*tdb_command(), "explain", str(out), "--quiet"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"tdb explain failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return out


def serve_store(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of the real default model reading the collated `store` (--dataset), for a
    module's tests (a generator for fixtures)."""
    log = tmp_path_factory.mktemp(f"{store.stem}_server") / "server.log"
    srv = start_server(["--model", MODEL, "--device", "cpu", "--dataset", str(store)], log)
    yield srv
    stop_server(srv)


def screenshot(page: Page, name: str, full_page: bool = True) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


@pytest.fixture(scope="session")
def auto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """--auto-dataset in a fresh TDB_CACHE (the prepared default corpus linked in, so nothing is
    downloaded): the server starts at once and collates 8,192 tokens of all layers in a child
    process (1-2 minutes here, longer while other tests share the CPUs). Without the baseline
    explanations that would follow (46,080 neurons, minutes more of CPU beside every other browser
    test): that step is tested on the tiny model (tests/datasets/test_read_api.py) and explained
    stores in the browser by test_explanations.py."""
    cache = tmp_path_factory.mktemp("tdb_cache")
    corpus = default_corpus_dir()
    if corpus.is_dir():
        (cache / "corpora").mkdir()
        (cache / "corpora" / corpus.name).symlink_to(corpus, target_is_directory=True)
    args = ["--model", MODEL, "--device", "cpu", "--auto-dataset", "--no-auto-explain"]
    srv = start_server(
        [*args, "--auto-dataset-tokens", str(AUTO_TOKENS)],
        cache / "server.log",
        env={"TDB_CACHE": str(cache)},
    )
    yield srv
    stop_server(srv)


@pytest.fixture
def apage(browser: Browser, auto_server: Server) -> Iterator[Page]:
    yield from open_page(browser, auto_server)


@pytest.fixture
def collating_page(apage: Page) -> Page:
    """A page on auto_server for a test that watches its collation run: such tests run before the
    other browser tests (pytest_collection_modifyitems), so the first of them starts the server
    and sees the collation at its beginning."""
    return apage


@pytest.fixture(scope="session")
def collated_auto_server(auto_server: Server) -> Server:
    """auto_server once its collation has ended (done or failed). Tests that need it run after
    the other browser tests (pytest_collection_modifyitems), so it overlaps them; run alone, this
    waits for the whole collation."""
    deadline = time.monotonic() + COLLATION_LIMIT_S
    while True:
        status, answer = call(auto_server, "/jobs")
        assert status == 200, answer
        if all(job["status"] not in ("queued", "running") for job in answer["jobs"]):
            return auto_server
        if time.monotonic() > deadline:
            pytest.fail(
                f"the collation has not ended after {COLLATION_LIMIT_S} s: {answer['jobs']}\n"
                + auto_server.log_text()[-4000:]
            )
        time.sleep(2)


@pytest.fixture
def collated_page(browser: Browser, collated_auto_server: Server) -> Iterator[Page]:
    yield from open_page(browser, collated_auto_server)


# Browser tests that use these fixtures run first and last: auto_server collates once per session,
# so a test watching the collation run must come before one waiting for it to end, whatever order
# the tests were named in on the command line.
RUN_FIRST, RUN_LAST = "collating_page", "collated_auto_server"


@pytest.hookimpl(trylast=True)  # after any plugin that shuffles the tests
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Reorders the browser tests among themselves (in their own places in the session; pytest's
    order otherwise): those using RUN_FIRST first, those using RUN_LAST last."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in item.path.parents]

    def phase(item: pytest.Item) -> int:
        names = getattr(item, "fixturenames", ())
        return 0 if RUN_FIRST in names else 2 if RUN_LAST in names else 1

    for slot, item in zip(slots, sorted((items[i] for i in slots), key=phase), strict=True):
        items[slot] = item


def open_jobs_panel(page: Page) -> None:
    page.goto("/")
    indicator = page.get_by_test_id("jobs-indicator")
    expect(indicator).to_be_visible()
    indicator.click()
    expect(page.get_by_test_id("jobs-panel")).to_be_visible()


def job_tokens(page: Page) -> int:
    """The tokens the first job has done, as the panel shows them."""
    text = page.get_by_test_id("job-tokens").first.inner_text()
    return int(text.split(" ")[0].replace(",", ""))
