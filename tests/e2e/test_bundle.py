"""The built UI's initial JavaScript stays small (issue 14: under 100 KB gzipped): the scripts
index.html loads at once (its module entry and the chunks it preloads), gzipped as a server would
send them. The debugger and component pages load on demand and are not counted."""

from __future__ import annotations

import gzip
import re

import pytest

from tests.servers import ROOT

DIST = ROOT / "neuron_viewer" / "dist"
LIMIT = 100 * 1024


def test_initial_javascript_is_under_100_kb_gzipped() -> None:
    index = DIST / "index.html"
    if not index.exists():
        pytest.fail("the UI is not built: run `make ui` (make test builds it)")
    html = index.read_text()
    scripts = re.findall(r'<script[^>]+src="(/assets/[^"]+\.js)"', html)
    scripts += re.findall(r'<link[^>]+rel="modulepreload"[^>]+href="(/assets/[^"]+\.js)"', html)
    assert scripts, html
    sizes = {s: len(gzip.compress((DIST / s.lstrip("/")).read_bytes(), 9)) for s in scripts}
    assert sum(sizes.values()) < LIMIT, sizes
