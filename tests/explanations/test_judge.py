"""Delphi-style scorers with an LLM judge (detection, fuzzing): known answers from judges that are
rules over the prompt's text, the store table (resumable; stores without it stay readable), and a
real run of `tdb judge` with the local model."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from neuron_explainer.datasets import ActivationRecord, ComponentRecord, DatasetStore
from neuron_explainer.explanations import (
    BASELINE_METHOD,
    ExplanationError,
    best_explanations,
)
from neuron_explainer.explanations.judge import (
    JUDGE_PROMPT_VERSION,
    Judge,
    detection_items,
    fuzzing_items,
    judge_store,
    parse_answer,
)
from neuron_explainer.explanations.store import read_judge_scores
from tests.datasets.helpers import explained_copy
from tests.servers import ROOT

WORD = " cat"


def _excerpt(words: list[str], hot: set[int]) -> ActivationRecord:
    return ActivationRecord(words, [5.0 if i in hot else 0.0 for i in range(len(words))])


def cat_record() -> ComponentRecord:
    """A neuron that fires on " cat" and nothing else: top excerpts hold the word, the random
    ones (some of which also hold it) are otherwise plain."""
    top = [
        _excerpt(["The", WORD, " sat", " on", " a", " mat", " today"], {1}),
        _excerpt(["A", WORD, " and", " a", " dog", " ran", " off"], {1}),
        _excerpt(["My", WORD, " is", " black", " and", " very", " old"], {1}),
        _excerpt(["One", WORD, " slept", " while", " it", " was", " hot"], {1}),
        _excerpt(["Her", WORD, " ate", " the", " fish", " at", " noon"], {1}),
        _excerpt(["No", WORD, " came", " to", " the", " door", " yet"], {1}),
        _excerpt(["Each", WORD, " has", " a", " name", " and", " home"], {1}),
        _excerpt(["That", WORD, " was", " the", " best", " of", " all"], {1}),
    ]
    plain = [
        _excerpt(["It", " rained", " all", " day", " in", " the", " town"], set()),
        _excerpt(["We", " read", " a", " book", " by", " the", " fire"], set()),
        _excerpt(["Prices", " rose", " again", " this", " year", " in", " May"], set()),
        _excerpt(["The", WORD, " hid", " under", " the", " bed", " again"], {1}),
        _excerpt(["Trains", " were", " late", " on", " the", " north", " line"], set()),
    ]
    return ComponentRecord(
        "mlp_neuron", 0, 7, 5.0, top, plain, None, None, 0.1, 1.0, 0.0, 0.0, 0.05, False
    )


class RuleJudge:
    """A deterministic judge over the prompt's text: detection says yes when the excerpt holds
    `word`; fuzzing says yes when every marked token is `word`. With the true word it answers
    every question right; `reply` shapes how it says so."""

    def __init__(self, word: str = WORD, reply: str = "{answer}.") -> None:
        self.word, self.reply, self.name = word, reply, "rule-judge"
        self.asked: list[str] = []

    def chat(self, messages: Sequence[tuple[str, str]], max_tokens: int) -> str:
        user = messages[-1][1]
        self.asked.append(user)
        excerpt = user.split('Excerpt:\n"""', 1)[1].rsplit('"""', 1)[0]
        marked = re.findall(r"<<(.*?)>>", excerpt)
        if marked:
            yes = all(m == self.word for m in marked)
        else:
            yes = self.word in excerpt
        return self.reply.format(answer="Yes" if yes else "No")

    def prompt_logprobs(self, prompt: str, top: int) -> list[tuple[int, dict[str, float]]]:
        return []


def test_items_are_held_out_balanced_and_seeded() -> None:
    record = cat_record()
    items = detection_items(record, n=3, seed=0)
    held_out_top = {"".join(r.tokens) for r in record.most_positive_activation_records[1::2]}
    positives = [it.text for it in items if it.label]
    negatives = [it.text for it in items if not it.label]
    assert len(positives) == 3 and set(positives) <= held_out_top
    # Negatives: random excerpts below a tenth of the maximum (the random " cat" one is not).
    assert len(negatives) == 3 and all(WORD not in t for t in negatives)
    assert detection_items(record, n=3, seed=0) == items  # the same draw every time
    assert [it.text for it in detection_items(record, n=3, seed=1)] != [it.text for it in items]
    fuzz = fuzzing_items(record, n=4, seed=0)
    assert len(fuzz) == 8 and sum(it.label for it in fuzz) == 4
    assert all(("<<" + WORD + ">>" in it.text) == it.label for it in fuzz)
    assert all(it.text.count("<<") == 1 for it in fuzz)  # as many marked tokens either way


def test_a_judge_that_is_always_right_scores_one() -> None:
    judge = Judge(RuleJudge(), n=3)
    record = cat_record()
    detection = judge.score("detection", record, "the word cat")
    assert (detection.accuracy, detection.balanced_accuracy) == (1.0, 1.0)
    assert (detection.n_items, detection.n_unanswered) == (6, 0)
    fuzzing = judge.score("fuzzing", record, "the word cat")
    assert (fuzzing.accuracy, fuzzing.balanced_accuracy, fuzzing.n_items) == (1.0, 1.0, 6)
    # The prompt holds the explanation and asks for yes or no.
    assert "Explanation of the feature: the word cat" in judge.backend.asked[0]  # type: ignore[attr-defined]


def test_wrong_or_unreadable_judges_score_what_they_earn() -> None:
    record = cat_record()
    # A judge that looks for the wrong word says no to everything: right on the negatives only.
    wrong = Judge(RuleJudge(word=" dog"), n=3).score("detection", record, "dogs")
    assert (wrong.accuracy, wrong.balanced_accuracy) == (0.5, 0.5)
    # Fuzzing with that judge: every decoy rejected (3 of 6 right), every true marking too.
    fuzz = Judge(RuleJudge(word=" dog"), n=3).score("fuzzing", record, "dogs")
    assert (fuzz.accuracy, fuzz.balanced_accuracy) == (0.5, 0.5)
    # Answers in other words are read: "true"/"false", any case, after other words.
    wordy = Judge(RuleJudge(reply="I think the answer is {answer}!"), n=3)
    assert wordy.score("detection", record, "cats").accuracy == 1.0
    # A reply with no yes or no in it counts as wrong; none at all is a failure with the reason.
    with pytest.raises(ExplanationError, match="none of the judge's 6 replies says yes or no"):
        Judge(RuleJudge(reply="maybe"), n=3).score("detection", record, "cats")
    assert parse_answer("TRUE") is True and parse_answer("no, it doesn't") is False
    assert parse_answer("unknown") is None and parse_answer("yesterday") is None
    head = ComponentRecord("attention_head", 0, 0, 1.0, [], [], None, None, 0, 0, 0, 0)
    with pytest.raises(ExplanationError, match="per-token families only"):
        detection_items(head)


@pytest.fixture
def explained(tiny_store: Path, tmp_path: Path) -> Path:
    return explained_copy(tiny_store, tmp_path, ["mlp_neuron"], limit=3)


class LabelJudge(RuleJudge):
    """Answers every question about a real store's explanations right: it knows each item's
    label, keyed by the explanation and the excerpt its prompt shows (the scorer's seeded draw)."""

    def __init__(self, labels: dict[tuple[str, str], bool]) -> None:
        super().__init__()
        self.labels = labels

    def chat(self, messages: Sequence[tuple[str, str]], max_tokens: int) -> str:
        user = messages[-1][1]
        explanation = user.split("Explanation of the feature: ", 1)[1].split("\n\nExcerpt:", 1)[0]
        excerpt = user.split('Excerpt:\n"""', 1)[1].rsplit('"""', 1)[0]
        return "yes" if self.labels[explanation, excerpt] else "no"


def test_judge_store_writes_resumes_and_old_stores_read(explained: Path) -> None:
    with DatasetStore(explained) as store, sqlite3.connect(explained) as conn:
        labels: dict[tuple[str, str], bool] = {}
        for (family, layer, index), e in best_explanations(conn).items():
            record = store.record(family, layer, index)
            for draw in (detection_items, fuzzing_items):
                with contextlib.suppress(ExplanationError):
                    labels.update({(e.explanation or "", it.text): it.label for it in draw(record)})
    judge = Judge(LabelJudge(labels))
    summary = judge_store(explained, judge, progress=False)
    assert summary.total == 3 * 2 and summary.scored + summary.failed == 6
    with sqlite3.connect(explained) as conn:
        rows = conn.execute(
            "SELECT family, layer, idx, scorer, judge_model, judge_prompt_version, accuracy, "
            "balanced_accuracy, n_items, error FROM explanation_judge_scores"
        ).fetchall()
        best = best_explanations(conn)
    assert len(rows) == 6
    for family, layer, idx, _, model, version, acc, bal, n_items, error in rows:
        assert (family, model, version) == ("mlp_neuron", "rule-judge", JUDGE_PROMPT_VERSION)
        assert (family, layer, idx) in best
        if error is None:  # the judge knows every label: every answer right
            assert acc == 1.0 and bal in (1.0, None) and n_items > 0
        else:  # a random model's component may lack inactive or active held-out excerpts
            assert "needs held-out" in error and acc is None
    # A rerun asks nothing: every row is there.
    other = RuleJudge(reply="maybe")
    other.name = "other-judge"  # another judge's scores are rows of their own
    again = judge_store(explained, Judge(other), progress=False)
    assert (again.total, again.skipped, again.scored, again.failed) == (6, 0, 0, 6)
    rerun = judge_store(explained, judge, progress=False)
    assert (rerun.skipped, rerun.scored, rerun.failed) == (6, 0, 0)
    # A store from before the judge table: explanations read as before, judge scores as none.
    with sqlite3.connect(explained) as conn:
        conn.execute("DROP TABLE explanation_judge_scores")
        node = next(iter(best_explanations(conn)))
        assert read_judge_scores(conn, *node) == []
        assert best_explanations(conn).keys() == best.keys()
    judge_store(explained, judge, progress=False)  # the writer adds the table back
    with sqlite3.connect(explained) as conn:
        found = read_judge_scores(conn, *node)
    assert {(r.scorer, r.judge_model) for r in found} == {
        ("detection", "rule-judge"),
        ("fuzzing", "rule-judge"),
    }
    assert all(r.method == BASELINE_METHOD for r in found)


def test_tdb_judge_with_the_local_model(explained: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "neuron_explainer.cli", "judge", str(explained), "--judge",
         "local", "--limit", "1", "--n", "1", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "judge smollm2-135m (delphi-1 n=1 seed=0)" in run.stderr
    with sqlite3.connect(explained) as conn:
        rows = conn.execute(
            "SELECT scorer, judge_model, accuracy, balanced_accuracy, n_items, n_unanswered, "
            "error FROM explanation_judge_scores ORDER BY scorer"
        ).fetchall()
    assert [r[:2] for r in rows] == [("detection", "smollm2-135m"), ("fuzzing", "smollm2-135m")]
    for _, _, acc, bal, n_items, n_unanswered, error in rows:
        if error is None:  # one item of each label: accuracy in halves
            assert n_items == 2 and acc in (0.0, 0.5, 1.0) and bal == acc
            assert 0 <= n_unanswered <= n_items
        else:
            assert acc is None and ("needs held-out" in error or "yes or no" in error)
