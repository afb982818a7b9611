"""Text corpora for collation, and their tokenization into fixed windows.

A `Corpus` is an ordered, re-readable sequence of documents (str) with a name and a content hash:

- a text file: one document (the whole file, UTF-8);
- a folder: every `*.txt` below it, one document each, in sorted relative-path order;
- a JSONL file (`.jsonl`, `.jsonl.gz`): one document per line, the string under `text_field`;
- `default`: six Jane Austen novels (public domain), built once from the Debian package
  `r-cran-janeaustenr` into a cache folder outside the repository (`default_corpus_dir`).

`Corpus.hash` is the SHA-256 of the corpus text: the documents' UTF-8 bytes joined by `\\n\\n`.

`tokenize(corpus, tokenizer, window_length)` cuts the corpus into `TokenWindows`: each document is
encoded on its own (special-token text is encoded as plain text, no BOS), documents are joined by the
tokens of "\\n\\n" into one stream, and the stream is cut into consecutive non-overlapping windows of
`window_length` tokens (the final partial window is dropped). Window `i` holds stream tokens
`[i*L, (i+1)*L)`: a stable global index, so a run can resume or be sharded by window ranges.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from neuron_explainer.datasets.rdata import RDataError, read_lazyload_db
from neuron_explainer.models.tokenizer import Tokenizer

DOCUMENT_SEPARATOR = "\n\n"
DEFAULT_CORPUS = "default"
DEFAULT_WINDOW_LENGTH = 64

# The Debian package holding the default corpus, and its novels in publication order
# (object name in the package's R data -> file name in the cache).
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_NOVELS = {
    "sensesensibility": "1-sense-and-sensibility.txt",
    "prideprejudice": "2-pride-and-prejudice.txt",
    "mansfieldpark": "3-mansfield-park.txt",
    "emma": "4-emma.txt",
    "northangerabbey": "5-northanger-abbey.txt",
    "persuasion": "6-persuasion.txt",
}


class CorpusError(ValueError):
    """A corpus that cannot be found, read or built."""


@dataclass
class Corpus:
    """An ordered, re-readable sequence of documents. `read` yields them from the start each time."""

    name: str
    read: Callable[[], Iterator[str]]
    description: str = ""

    def documents(self) -> Iterator[str]:
        return self.read()

    @cached_property
    def hash(self) -> str:
        """SHA-256 (hex) of the documents' UTF-8 text joined by the document separator."""
        digest = hashlib.sha256()
        for i, doc in enumerate(self.documents()):
            if i:
                digest.update(DOCUMENT_SEPARATOR.encode())
            digest.update(doc.encode("utf-8"))
        return digest.hexdigest()


@dataclass
class TokenWindows:
    """A corpus cut into windows: `tokens` [n_windows, window_length] int32 token ids."""

    tokens: np.ndarray
    corpus_name: str
    corpus_hash: str

    @property
    def window_length(self) -> int:
        return int(self.tokens.shape[1])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first window index, tokens [b, window_length] int64) for windows [start, stop) in
        order; every batch has `batch_size` windows except possibly the last."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        stop = len(self) if stop is None else min(stop, len(self))
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            yield first, torch.from_numpy(self.tokens[first:last].astype(np.int64))


def tokenize(corpus: Corpus, tokenizer: Tokenizer, window_length: int) -> TokenWindows:
    """Cut `corpus` into windows of `window_length` tokens of `tokenizer` (see the module doc)."""
    if window_length < 1:
        raise ValueError(f"window_length must be at least 1, got {window_length}")
    separator = tokenizer.encode(DOCUMENT_SEPARATOR, allow_special=False)
    pieces: list[np.ndarray] = []
    digest = hashlib.sha256()
    for i, doc in enumerate(corpus.documents()):
        if i:
            digest.update(DOCUMENT_SEPARATOR.encode())
            pieces.append(np.asarray(separator, dtype=np.int32))
        digest.update(doc.encode("utf-8"))
        pieces.append(np.asarray(tokenizer.encode(doc, allow_special=False), dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n_windows = len(stream) // window_length
    if n_windows == 0:
        raise CorpusError(
            f"corpus {corpus.name!r} has {len(stream)} tokens, fewer than one window of "
            f"{window_length}"
        )
    # Hashed while reading, so a corpus is read once; cache it on the corpus too.
    corpus.__dict__["hash"] = digest.hexdigest()
    tokens = stream[: n_windows * window_length].reshape(n_windows, window_length)
    return TokenWindows(tokens=tokens, corpus_name=corpus.name, corpus_hash=corpus.hash)


# ---- readers ----------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text ({e})") from e
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e}") from e


def text_file_corpus(path: str | Path, name: str | None = None) -> Corpus:
    """One document: the whole file."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path} is not a file")
    return Corpus(name or path.name, lambda: iter([_read_text(path)]), f"text file {path}")


def folder_corpus(path: str | Path, name: str | None = None) -> Corpus:
    """Every `*.txt` file below `path`, one document each, in sorted relative-path order."""
    path = Path(path)
    if not path.is_dir():
        raise CorpusError(f"{path} is not a folder")
    files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise CorpusError(f"{path} holds no .txt files")
    return Corpus(
        name or path.name,
        lambda: (_read_text(f) for f in files),
        f"{len(files)} .txt files in {path}",
    )


def jsonl_corpus(path: str | Path, text_field: str = "text", name: str | None = None) -> Corpus:
    """One document per non-blank line: the string under `text_field` of that line's object."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path} is not a file")

    def read() -> Iterator[str]:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{line_number}: not JSON ({e})") from e
                if not isinstance(obj, dict) or text_field not in obj:
                    raise CorpusError(
                        f"{path}:{line_number}: no {text_field!r} field (set --text-field)"
                    )
                text = obj[text_field]
                if not isinstance(text, str):
                    raise CorpusError(
                        f"{path}:{line_number}: {text_field!r} is a {type(text).__name__}, "
                        "not a string"
                    )
                yield text

    return Corpus(name or path.name, read, f"JSONL file {path} (field {text_field!r})")


def load_corpus(spec: str | Path, text_field: str = "text") -> Corpus:
    """A corpus from `default`, a .txt file, a folder of .txt files, or a .jsonl(.gz) file."""
    if str(spec) == DEFAULT_CORPUS:
        return default_corpus()
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_corpus(path)
    if path.is_file():
        if path.name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return jsonl_corpus(path, text_field)
        return text_file_corpus(path)
    raise CorpusError(
        f"corpus {str(spec)!r} is neither {DEFAULT_CORPUS!r} nor an existing file or folder"
    )


# ---- the default corpus -----------------------------------------------------------------------


def cache_root() -> Path:
    """Where prepared corpora live: $TDB_CACHE/corpora, else ~/.cache/tdb/corpora."""
    base = os.environ.get("TDB_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "tdb") / "corpora"


def default_corpus_dir() -> Path:
    return cache_root() / "janeaustenr"


def default_corpus() -> Corpus:
    """Jane Austen's six novels, prepared once (`prepare_default_corpus`) and read from the cache."""
    folder = default_corpus_dir()
    if not (folder / "SOURCE.json").is_file():
        prepare_default_corpus(folder)
    files = [folder / f for f in AUSTEN_NOVELS.values()]
    return Corpus(
        DEFAULT_CORPUS,
        lambda: (_read_text(f) for f in files),
        f"Jane Austen's six novels from the Debian package {AUSTEN_PACKAGE} ({folder})",
    )


def austen_paragraphs(lines: list[str | None]) -> str:
    """The novel text from the package's line vector: lines within a paragraph are joined by a
    space (the source wraps at ~70 characters), paragraphs by a blank line."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(paragraphs) + "\n"


def novels_from_rdata(rdb_path: Path) -> dict[str, str]:
    """{cache file name: text} for the six novels in the package's `data/Rdata.rdb`."""
    objects = read_lazyload_db(rdb_path)
    missing = [name for name in AUSTEN_NOVELS if name not in objects]
    if missing:
        raise CorpusError(f"{rdb_path} lacks the novels {missing}; found {sorted(objects)}")
    return {AUSTEN_NOVELS[name]: austen_paragraphs(list(objects[name])) for name in AUSTEN_NOVELS}


def prepare_default_corpus(folder: Path) -> None:
    """Download the Debian package with apt-get, unpack it with dpkg-deb, extract the novels from
    its R data in pure Python, and write them as text files plus SOURCE.json (provenance)."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(
                f"the default corpus is built from the Debian package {AUSTEN_PACKAGE}, which "
                f"needs {tool}; on other systems pass --corpus with a text file, a folder of "
                ".txt files or a JSONL file"
            )
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tdb-corpus-") as tmp:
        work = Path(tmp)
        result = subprocess.run(
            ["apt-get", "download", AUSTEN_PACKAGE],
            cwd=work,
            capture_output=True,
            text=True,
        )
        debs = sorted(work.glob(f"{AUSTEN_PACKAGE}_*.deb"))
        if result.returncode != 0 or not debs:
            raise CorpusError(
                f"`apt-get download {AUSTEN_PACKAGE}` failed ({result.stderr.strip()[-500:]}); "
                "run `apt-get update` first, or pass --corpus with your own text"
            )
        deb = debs[0]
        unpacked = work / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        rdbs = sorted(unpacked.rglob("janeaustenr/data/Rdata.rdb"))
        if not rdbs:
            raise CorpusError(f"{deb.name} holds no janeaustenr/data/Rdata.rdb")
        try:
            novels = novels_from_rdata(rdbs[0])
        except RDataError as e:
            raise CorpusError(f"cannot read the novels from {deb.name}: {e}") from e
        digest = hashlib.sha256()
        for i, (file_name, text) in enumerate(novels.items()):
            (folder / file_name).write_text(text, encoding="utf-8")
            if i:
                digest.update(DOCUMENT_SEPARATOR.encode())
            digest.update(text.encode("utf-8"))
        source = {
            "package": deb.name,
            "package_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
            "files": list(novels),
            "corpus_sha256": digest.hexdigest(),
            "license": "novels in the public domain; package MIT (Julia Silge)",
        }
        # Written last: its presence marks a complete preparation.
        (folder / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
