"""In a real browser: the API docs render with no network beyond the server (their scripts are
served by it), and the UI passes the access token of a server started with --auth-token."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect

from tests.e2e.conftest import assert_no_console_errors, screenshot, watch_console
from tests.e2e.test_debugger import IOI_URL, wait_for_table
from tests.servers import AUTH_TOKEN, ROOT, Server


class ServerOnly:
    """A browser context whose requests may reach `server` only: any other is aborted and
    recorded, as it would fail on a machine without internet."""

    def __init__(self, browser: Browser, server: Server) -> None:
        self.origin = server.url
        self.blocked: list[str] = []
        self.context: BrowserContext = browser.new_context(
            viewport={"width": 1280, "height": 800}, base_url=server.url
        )
        self.console_errors = watch_console(self.context)
        self.context.route("**/*", self._route)

    def _route(self, route: Route) -> None:
        url = route.request.url
        if url.startswith(self.origin + "/") or urlparse(url).scheme in ("data", "blob"):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def new_page(self) -> Page:
        page = self.context.new_page()
        page.set_default_timeout(90_000)
        return page


@pytest.fixture
def docs_context(browser: Browser, no_model_server: Server) -> Iterator[ServerOnly]:
    ctx = ServerOnly(browser, no_model_server)
    yield ctx
    ctx.context.close()
    assert_no_console_errors(ctx.console_errors)


def test_swagger_ui_renders_the_operations_offline(docs_context: ServerOnly) -> None:
    page = docs_context.new_page()
    page.goto("/docs")
    expect(page.locator(".opblock").filter(has_text="/batched_tdb").first).to_be_visible()
    assert page.locator(".opblock").count() >= 10  # every endpoint, as the schema lists them
    expect(page.locator(".opblock").filter(has_text="/neuron_record").first).to_be_visible()
    screenshot(page, "docs-swagger-offline", full_page=False)
    assert docs_context.blocked == []


def test_redoc_renders_offline(docs_context: ServerOnly) -> None:
    page = docs_context.new_page()
    page.goto("/redoc")
    expect(
        page.get_by_role("heading", name="Transformer debugger activation server")
    ).to_be_visible()
    expect(page.get_by_text("/batched_tdb").first).to_be_attached()
    screenshot(page, "docs-redoc-offline", full_page=False)
    assert docs_context.blocked == []


@pytest.fixture
def token_context(browser: Browser, token_server: Server) -> Iterator[BrowserContext]:
    if not (ROOT / "neuron_viewer" / "dist" / "index.html").exists():
        pytest.fail("the UI is not built: run `make ui` (make test builds it)")
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, base_url=token_server.url
    )
    context.set_default_timeout(90_000)
    errors = watch_console(context)
    yield context
    context.close()
    # The UI without a token, or with a wrong one, is answered 401: a failed request, expected.
    assert_no_console_errors(errors)


def test_the_ui_takes_the_token_from_its_address_and_sends_it(
    token_context: BrowserContext,
) -> None:
    page = token_context.new_page()
    page.goto(f"/?access_token={AUTH_TOKEN}")
    expect(page.get_by_test_id("model-name")).to_contain_text("smollm2")  # GET /model_info
    assert "access_token" not in page.url  # out of the address bar, shared links and history
    # Remembered: a debugger request from a link without the token runs.
    page.goto(IOI_URL)
    wait_for_table(page)
    assert float(page.get_by_test_id("d-left").inner_text()) > 3
    screenshot(page, "debugger-with-token", full_page=False)


def test_without_the_token_the_ui_says_how_to_give_it(token_context: BrowserContext) -> None:
    page = token_context.new_page()
    page.goto("/")
    prompt = page.get_by_test_id("token-required")
    expect(prompt).to_contain_text("This server requires an access token")
    expect(prompt).to_contain_text("?access_token=")
    expect(page.get_by_test_id("model-name")).to_have_text("access token needed")
    screenshot(page, "token-required", full_page=False)
    # Entered in the page: the same as ?access_token=.
    prompt.get_by_label("access token").fill(AUTH_TOKEN)
    prompt.get_by_role("button", name="Use token").click()
    expect(page.get_by_test_id("model-name")).to_contain_text("smollm2")
    expect(page.get_by_test_id("token-required")).to_have_count(0)


def test_a_wrong_token_is_reported_as_refused(token_context: BrowserContext) -> None:
    page = token_context.new_page()
    page.goto("/debugger?access_token=not-the-token")
    expect(page.get_by_test_id("token-required")).to_contain_text(
        "The server refused this page's access token"
    )


def test_swagger_ui_sends_the_token_once_authorized(token_context: BrowserContext) -> None:
    page = token_context.new_page()
    page.goto("/docs")
    page.get_by_role("button", name="Authorize").first.click()
    dialog = page.locator(".modal-ux")
    dialog.locator("input").first.fill(AUTH_TOKEN)
    dialog.get_by_role("button", name="Apply credentials").click()
    dialog.get_by_role("button", name="Close", exact=True).click()
    operation = page.locator(".opblock-get").filter(has_text="/model_info").first
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    expect(status).to_have_text("200")
