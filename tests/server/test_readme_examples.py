"""The README's server examples work as written: each `curl` and Python block of its server section
runs against a real server and prints the output the README shows after it."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.servers import ROOT, Server

README_URL = "http://127.0.0.1:8000"


def examples() -> list[tuple[str, str, str]]:
    """(language, code, expected output) for each example of the server section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The activation server") : text.index("## Performance")]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
    out = []
    for (lang, code), (next_lang, output) in itertools.pairwise(blocks):
        if lang in ("bash", "python") and next_lang == "":
            out.append((lang, code, output))
    return out


def test_readme_has_curl_and_client_examples() -> None:
    found = examples()
    assert any(lang == "bash" and "curl" in code for lang, code, _ in found)
    assert any(lang == "python" and "activation_server.client" in code for lang, code, _ in found)


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_runs_as_written(server: Server, index: int) -> None:
    lang, code, expected = examples()[index]
    code = code.replace(README_URL, server.url)
    if lang == "bash":
        assert shutil.which("curl"), "curl is needed to check the README's curl examples"
        run = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=300)
    else:
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
        )
    assert run.returncode == 0, run.stderr
    if expected.startswith("{"):  # a JSON error body: equal except for the request id
        got, want = json.loads(run.stdout), json.loads(expected.replace("…", "x"))
        assert got["requestId"] and {**got, "requestId": ""} == {**want, "requestId": ""}
    else:
        assert run.stdout.strip() == expected.strip()
