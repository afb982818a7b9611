"""The jobs panel once the --auto-dataset collation (started by test_datasets.py's first test, see
conftest.auto_server) has finished. Runs after the debugger tests so the collation overlaps them;
alone, it waits for the whole collation."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import AUTO_TOKENS, open_jobs_panel, screenshot


def test_jobs_panel_shows_the_collation_done(apage: Page) -> None:
    open_jobs_panel(apage)
    job = apage.get_by_test_id("job").first
    expect(job).to_have_attribute("data-status", re.compile("done|failed"), timeout=420_000)
    if job.get_attribute("data-status") == "failed":
        screenshot(apage, "jobs-panel-failed")  # the message and the log tail are shown
        pytest.fail(f"the collation failed: {job.inner_text()}")
    expect(job.get_by_test_id("job-tokens")).to_contain_text(f"{AUTO_TOKENS:,} / {AUTO_TOKENS:,}")
    expect(apage.get_by_test_id("jobs-indicator")).to_contain_text("1 job done")
    # The finished store is listed complete on the home page and can be browsed.
    row = apage.get_by_test_id("dataset").first
    expect(row).to_contain_text(f"{AUTO_TOKENS:,} tokens")
    expect(row).not_to_contain_text("in progress")
    screenshot(apage, "jobs-panel-done")
    row.get_by_test_id("dataset-jump").fill("29:100")
    row.get_by_test_id("dataset-go").click()
    expect(apage.get_by_test_id("node-title")).to_have_text("mlp L29 #100")
    expect(apage.get_by_test_id("top-examples").get_by_test_id("excerpt").first).to_be_visible()
