"""The progress line of long jobs: tokens done, rate and ETA on stderr, and the callback the jobs
API reads."""

from __future__ import annotations

import pytest

from neuron_explainer.progress import Progress, duration


def test_progress_line_and_callback(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[tuple[int, int, float]] = []
    progress = Progress("collate", total=4096, done=1024, callback=lambda *a: seen.append(a))
    progress.update(2048, " (committed)", force=True)
    progress.update(3072)  # within the interval, not a terminal: not printed, still reported
    line = capsys.readouterr().err.strip()
    assert line.startswith("collate: 2,048/4,096 tokens (50.0%) ")
    assert "tok/s ETA " in line and line.endswith(" (committed)")
    assert [(d, t) for d, t, _ in seen] == [(2048, 4096), (3072, 4096)]
    assert all(rate > 0 for _, _, rate in seen)


def test_duration() -> None:
    assert duration(245) == "4m05s"
    assert duration(3725) == "1h02m"
    assert duration(float("inf")) == "?"
