"""Corpus readers, windowing, and the pure-Python reader of R lazy-load data (on R-serialized
bytes the test writes itself in R's XDR format, so no apt or R is needed)."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import lzma
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from neuron_explainer.datasets.collate import parse_layers, parse_shard, shard_range
from neuron_explainer.datasets.corpus import (
    AUSTEN_NOVELS,
    CorpusError,
    austen_paragraphs,
    default_corpus,
    folder_corpus,
    jsonl_corpus,
    load_corpus,
    novels_from_rdata,
    tokenize,
)
from neuron_explainer.datasets.rdata import RDataError, read_lazyload_db, unserialize
from neuron_explainer.models import HookedTransformer

# ---- a minimal writer of R's XDR serialization format --------------------------------------------


def i32(x: int) -> bytes:
    return struct.pack(">i", x)


UTF8 = (1 << 3) << 12  # CHARSXP "levels" bit for UTF-8, in the flags word


def r_header() -> bytes:
    return b"X\n" + i32(3) + i32(0x040201) + i32(0x030500) + i32(5) + b"UTF-8"


def r_char(s: str | None) -> bytes:
    if s is None:
        return i32(9) + i32(-1)  # NA_character_
    data = s.encode()
    return i32(9 | UTF8) + i32(len(data)) + data


def r_strings(items: list[str | None]) -> bytes:
    return i32(16) + i32(len(items)) + b"".join(r_char(s) for s in items)


def r_ints(items: list[int]) -> bytes:
    return i32(13) + i32(len(items)) + b"".join(i32(i) for i in items)


class Writer:
    """Serializes named lists; the `names` symbol is written once, then referenced (REFSXP)."""

    def __init__(self) -> None:
        self.names_symbol_written = False

    def names_tag(self) -> bytes:
        if self.names_symbol_written:
            return i32(255 | (1 << 8))  # REFSXP to reference 1
        self.names_symbol_written = True
        return i32(1) + r_char("names")  # SYMSXP

    def named_list(self, items: dict[str, bytes]) -> bytes:
        body = i32(19 | (1 << 9)) + i32(len(items)) + b"".join(items.values())
        # attributes: pairlist(names = c(...)), tagged, then NULL
        attributes = i32(2 | (1 << 10)) + self.names_tag() + r_strings(list(items)) + i32(254)
        return body + attributes


def lazyload_db(folder: Path, objects: dict[str, bytes], compressed: int = 1) -> Path:
    """Write Rdata.rdb/.rdx holding `objects` (serialized items, header added here)."""
    rdb = bytearray()
    variables: dict[str, bytes] = {}
    for name, item in objects.items():
        raw = r_header() + item
        if compressed == 3:
            chunk = struct.pack(">I", len(raw)) + b"X" + lzma.compress(raw)
        else:
            chunk = struct.pack(">I", len(raw)) + zlib.compress(raw)
        variables[name] = r_ints([len(rdb), len(chunk)])
        rdb += chunk
    writer = Writer()
    index = writer.named_list(
        {
            "variables": writer.named_list(variables),
            "references": i32(19) + i32(0),
            # TRUE (zlib) is a logical; 2 and 3 are numbers
            "compressed": i32(10) + i32(1) + i32(1) if compressed == 1 else r_ints([compressed]),
        }
    )
    (folder / "Rdata.rdb").write_bytes(bytes(rdb))
    (folder / "Rdata.rdx").write_bytes(gzip.compress(r_header() + index))
    return folder / "Rdata.rdb"


@pytest.mark.parametrize("compressed", [1, 3])
def test_lazyload_db_reads_string_vectors(tmp_path: Path, compressed: int):
    objects = {
        "lines": r_strings(["It is a truth", None, "universally acknowledged — ünïcode"]),
        "numbers": r_ints([1, 2, -(2**31)]),
    }
    data = read_lazyload_db(lazyload_db(tmp_path, objects, compressed))
    assert list(data) == ["lines", "numbers"]
    assert data["lines"] == ["It is a truth", None, "universally acknowledged — ünïcode"]
    assert data["numbers"] == [1, 2, None]  # NA_integer_


def test_unserialize_rejects_other_formats():
    with pytest.raises(RDataError, match="format"):
        unserialize(b"A\n1\n")
    with pytest.raises(RDataError, match="ends early"):
        unserialize(r_header() + i32(16) + i32(3))


def test_novels_are_extracted_as_paragraphs(tmp_path: Path):
    lines = ["TITLE", "", "by Jane Austen", "", "", "First line of a", "paragraph.", "", "End."]
    objects = {name: r_strings(list(lines)) for name in AUSTEN_NOVELS}
    novels = novels_from_rdata(lazyload_db(tmp_path, objects))
    assert list(novels) == list(AUSTEN_NOVELS.values())
    expected = "TITLE\n\nby Jane Austen\n\nFirst line of a paragraph.\n\nEnd.\n"
    assert all(text == expected for text in novels.values())
    assert austen_paragraphs([None, "a", "b"]) == "a b\n"

    incomplete = lazyload_db(tmp_path, {"emma": r_strings(["x"])})
    with pytest.raises(CorpusError, match="lacks the novels"):
        novels_from_rdata(incomplete)


def test_default_corpus_reads_the_prepared_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "corpora" / "janeaustenr"
    folder.mkdir(parents=True)
    for i, name in enumerate(AUSTEN_NOVELS.values()):
        (folder / name).write_text(f"Novel {i}.\n")
    (folder / "SOURCE.json").write_text("{}")
    monkeypatch.setenv("TDB_CACHE", str(tmp_path))
    corpus = load_corpus("default")
    assert corpus.name == "default"
    docs = list(corpus.documents())
    assert docs == [f"Novel {i}.\n" for i in range(6)]
    assert corpus.hash == hashlib.sha256("\n\n".join(docs).encode()).hexdigest()
    assert default_corpus().hash == corpus.hash


# ---- readers and windows ----------------------------------------------------------------------


def test_folder_and_jsonl_corpora(tmp_path: Path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    (tmp_path / "docs" / "sub" / "c.txt").write_text("third")
    (tmp_path / "docs" / "skip.md").write_text("not a .txt")
    assert list(load_corpus(tmp_path / "docs").documents()) == ["first", "second", "third"]

    lines = [{"body": "one"}, {"body": "two", "id": 3}]
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert list(load_corpus(path, text_field="body").documents()) == ["one", "two"]
    with pytest.raises(CorpusError, match=r":1: no 'text' field"):
        list(jsonl_corpus(path).documents())
    (tmp_path / "bad.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(CorpusError, match="not a string"):
        list(load_corpus(tmp_path / "bad.jsonl").documents())
    with pytest.raises(CorpusError, match="neither"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        list(load_corpus(tmp_path / "latin1.txt").documents())


def test_windows_cut_the_joined_token_stream(tiny_model: HookedTransformer, tmp_path: Path):
    tok = tiny_model.tokenizer
    assert tok is not None
    docs = ["The first document, short.", "A second one <|im_end|> with special text. " * 5]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    windows = tokenize(folder_corpus(tmp_path), tok, 8)
    stream = (
        tok.encode(docs[0], allow_special=False)
        + tok.encode("\n\n", allow_special=False)
        + tok.encode(docs[1], allow_special=False)
    )
    assert len(windows) == len(stream) // 8
    assert windows.tokens.ravel().tolist() == stream[: len(windows) * 8]
    assert windows.corpus_hash == hashlib.sha256("\n\n".join(docs).encode()).hexdigest()
    batches = list(windows.batches(3, start=1, stop=6))
    assert [first for first, _ in batches] == [1, 4]
    assert np.array_equal(batches[1][1].numpy(), windows.tokens[4:6])
    with pytest.raises(CorpusError, match="fewer than one window"):
        tokenize(folder_corpus(tmp_path), tok, 10_000)


def test_layer_and_shard_arguments():
    assert parse_layers("0,1,5-7", 30) == [0, 1, 5, 6, 7]
    assert parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("28-31", 30)
    with pytest.raises(ValueError, match="bad layer"):
        parse_layers("x", 30)
    assert parse_shard("2/8") == (2, 8)
    with pytest.raises(ValueError):
        parse_shard("8/8")
    # Shards cover the windows exactly, in whole batches.
    ranges = [shard_range(1000, 32, (i, 3)) for i in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000
    assert all(a[1] == b[0] and a[1] % 32 == 0 for a, b in itertools.pairwise(ranges))
