"""The jobs panel once the --auto-dataset collation (conftest.auto_server) has ended. The test
waits for that itself (conftest.collated_auto_server) and runs after the other browser tests,
whatever order they were given in, so in a full run the collation overlaps them."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import AUTO_TOKENS, open_jobs_panel, screenshot


def test_jobs_panel_shows_the_collation_done(collated_page: Page) -> None:
    page = collated_page
    open_jobs_panel(page)
    job = page.get_by_test_id("job").first
    expect(job).to_have_attribute("data-status", re.compile("done|failed"))
    if job.get_attribute("data-status") == "failed":
        screenshot(page, "jobs-panel-failed")  # the message and the log tail are shown
        pytest.fail(f"the collation failed: {job.inner_text()}")
    expect(job.get_by_test_id("job-tokens")).to_contain_text(f"{AUTO_TOKENS:,} / {AUTO_TOKENS:,}")
    expect(page.get_by_test_id("jobs-indicator")).to_contain_text("1 job done")
    # The finished store is listed complete on the home page and can be browsed.
    row = page.get_by_test_id("dataset").first
    expect(row).to_contain_text(f"{AUTO_TOKENS:,} tokens")
    expect(row).not_to_contain_text("in progress")
    screenshot(page, "jobs-panel-done")
    row.get_by_test_id("dataset-jump").fill("29:100")
    row.get_by_test_id("dataset-go").click()
    expect(page.get_by_test_id("node-title")).to_have_text("mlp L29 #100")
    expect(page.get_by_test_id("top-examples").get_by_test_id("excerpt").first).to_be_visible()
