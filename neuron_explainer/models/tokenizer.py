"""Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, Qwen2 families), run by tiktoken.

A `Tokenizer` is built from a model's own files (a GGUF's `tokenizer.ggml.*` metadata, or a Hugging
Face folder) into a `tiktoken.Encoding` whose ranks ARE the model's token ids. tiktoken merges, at
each step, the adjacent pair whose concatenation has the lowest rank; Hugging Face's BPE merges the
pair that comes first in the merge list. The two agree when merge order equals the order of the ids
the merges produce, which the builder checks (it holds for GPT-2, SmolLM2, Llama 3 and Qwen2, whose
merges were written in id order). Byte-level BPE stores each token as a string over GPT-2's
printable stand-ins for the 256 byte values (`bytes_to_unicode`); inverting that gives token bytes.

Special tokens (chat markers, end of text) are matched in the text first, longest first, as Hugging
Face's added-token matching does; the rest goes through the pre-tokenization regex and BPE.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import tiktoken
from gguf import GGUFReader, GGUFValueType

# ---- pre-tokenization patterns -------------------------------------------------------------------

# GPT-2 (Hugging Face `ByteLevel(use_regex=True)`): contractions, letters, numbers, punctuation runs,
# each optionally led by one space; whitespace runs leave their last space to the next word.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# StarCoder / SmolLM (`Digits(individual_digits=True)` then GPT-2's ByteLevel): one digit per
# piece, and whitespace before a digit stays a piece of its own.
SMOLLM_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
)
# Llama 3 (`Split` with this regex, then ByteLevel without its own regex): numbers in runs of 3.
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2: Llama 3's regex with single digits.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# llama.cpp's names for pre-tokenizers (GGUF `tokenizer.ggml.pre`). Files converted before the
# field existed (absent, or "default") are taken to use GPT-2's own pre-tokenizer.
GGUF_PRE_PATTERNS = {
    "default": GPT2_PATTERN,
    "gpt2": GPT2_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "smollm": SMOLLM_PATTERN,
    "starcoder": SMOLLM_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "llama-v3": LLAMA3_PATTERN,
    "qwen2": QWEN2_PATTERN,
}

# GGUF `tokenizer.ggml.token_type` values: 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte. Control and user-defined tokens are matched whole in the text.
GGUF_SPECIAL_TOKEN_TYPES = (3, 4)
GGUF_UNUSED_TOKEN_TYPE = 5

GPT2_END_OF_TEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """Tokenizer files this module cannot reproduce exactly, or text/ids it cannot handle."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from byte values to printable characters, used to store byte-level tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes_from_string(token: str, token_id: int) -> bytes:
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise TokenizerError(
            f"token {token_id} {token!r} has a character outside GPT-2's byte-level alphabet; "
            "only byte-level BPE tokenizers are supported"
        ) from e


# ---- the tokenizer -------------------------------------------------------------------------------


class Tokenizer:
    """A model's byte-level BPE tokenizer; `encoding` is a `tiktoken.Encoding` with ranks = ids.

    Build one with `from_gguf` or `from_hf_folder`. `vocab_size` counts every token id (special
    tokens included): max id + 1. `encode` never adds BOS; prepend `bos_token_id` where wanted.
    """

    encoding: tiktoken.Encoding
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    special_tokens: dict[str, int]
    pattern: str

    def __init__(
        self,
        *,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: Mapping[str, int],
        pattern: str,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        name: str = "bpe",
        normalization: Literal["NFC"] | None = None,
    ) -> None:
        """Build from byte-level `vocab` (token string -> id), `merges` in priority order and raw
        `special_tokens` (text -> id). Raises TokenizerError where tiktoken would not give the same
        ids as Hugging Face BPE with these merges."""
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self._normalization = normalization
        # A vocab entry at a special token's id is the special token itself (tokenizer.json lists
        # added tokens in the model vocab too); it is not reachable by merges.
        special_ids = set(self.special_tokens.values())
        self._vocab = {tok: i for tok, i in vocab.items() if i not in special_ids}
        self._merges = [(a, b) for a, b in merges]
        all_ids = [*self._vocab.values(), *special_ids]
        if not all_ids:
            raise TokenizerError("empty vocabulary")
        if min(all_ids) < 0:
            raise TokenizerError(f"negative token id {min(all_ids)}")
        self.vocab_size = max(all_ids) + 1
        for label, token_id in (("bos", bos_token_id), ("eos", eos_token_id)):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"{label} token id {token_id} is outside the vocabulary")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

        # id -> bytes; None for ids that name no token.
        self._bytes: list[bytes | None] = [None] * self.vocab_size
        for text, i in self.special_tokens.items():
            self._bytes[i] = text.encode("utf-8")
        by_bytes: dict[bytes, int] = {}
        for tok, i in self._vocab.items():
            data = _token_bytes_from_string(tok, i)
            if data in by_bytes:
                raise TokenizerError(f"tokens {by_bytes[data]} and {i} both stand for {data!r}")
            by_bytes[data] = i
            self._bytes[i] = data

        ranks = self._mergeable_ranks(by_bytes)
        # tiktoken starts every piece from single bytes, so each byte value needs a rank. Bytes
        # that have no token of their own get spare ranks above every real id; BPE cannot merge
        # them into anything, and `encode` drops them as Hugging Face's BPE does (unk_token=None).
        spare = self.vocab_size
        for b in range(256):
            if bytes([b]) not in ranks:
                ranks[bytes([b])] = spare
                spare += 1
        self._has_unknown_bytes = spare > self.vocab_size

        self.encoding = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        # Leftmost-longest, like Hugging Face's added-token matcher.
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._special_regex = (
            re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
            if longest_first
            else None
        )

    def _mergeable_ranks(self, by_bytes: dict[bytes, int]) -> dict[bytes, int]:
        """Single bytes and merge results with their ids, after checking merge order = id order.

        Tokens that no merge produces are left out: BPE never outputs them, but tiktoken would
        join any two pieces whose concatenation has a rank.
        """
        ranks = {data: i for data, i in by_bytes.items() if len(data) == 1}
        previous: tuple[int, int] | None = None  # (merge index, result id)
        for index, (left, right) in enumerate(self._merges):
            for part in (left, right):
                if part not in self._vocab:
                    raise TokenizerError(
                        f"merge {index} ({left!r}, {right!r}): {part!r} not in vocab"
                    )
            result = self._vocab.get(left + right)
            if result is None:
                raise TokenizerError(
                    f"merge {index} ({left!r}, {right!r}) makes {left + right!r}, not in the vocab"
                )
            # Several merges may make the same token (Llama 3 lists every split of a token), but
            # a later merge must never make a token with a smaller id.
            if previous is not None and result < previous[1]:
                raise TokenizerError(
                    f"merge priority differs from token id order: merge {previous[0]} makes id "
                    f"{previous[1]} but the later merge {index} ({left!r}, {right!r}) makes id "
                    f"{result}; tiktoken cannot reproduce this tokenizer exactly"
                )
            previous = (index, result)
            data = self._bytes[result]
            assert data is not None  # every vocab id has its bytes by now
            ranks[data] = result
        return ranks

    # ---- encoding and decoding ------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`, with no BOS added.

        allow_special=True: special-token text such as "<|im_start|>" becomes its id (Hugging Face's
        default); False: it is encoded as ordinary text.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        if not allow_special or self._special_regex is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        # With a capturing group, re.split puts the matched special tokens at odd positions.
        for position, chunk in enumerate(self._special_regex.split(text)):
            if position % 2:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self._encode_ordinary(chunk))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._normalization is not None:
            text = unicodedata.normalize(self._normalization, text)
        ids = self.encoding.encode_ordinary(text)
        if self._has_unknown_bytes:
            ids = [i for i in ids if i < self.vocab_size]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token's text, UTF-8 encoded)."""
        token_id = int(token_id)
        data = self._bytes[token_id] if 0 <= token_id < self.vocab_size else None
        if data is None:
            raise TokenizerError(f"{token_id} is not a token id (vocab size {self.vocab_size})")
        return data

    def token_display(self, token_id: int) -> str:
        """A token's text; bytes that are not valid UTF-8 on their own (part of a multi-byte
        character) show as \\xNN escapes, e.g. "\\xe2\\x80"."""
        return self._display(int(token_id))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - tokenizers live as long as their model
    def _display(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def display_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.token_display(i) for i in ids]

    def single_token_id(self, text: str) -> int:
        """The id of `text` if it is exactly one token (e.g. " Paris"), else TokenizerError."""
        ids = self.encode(text)
        if len(ids) != 1:
            pieces = self.display_tokens(ids)
            raise TokenizerError(
                f"{text!r} is not a single token: it encodes to {len(ids)} tokens {pieces!r}"
            )
        return ids[0]

    # ---- GGUF ------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | GGUFReader) -> Tokenizer:
        """The tokenizer in a GGUF file's `tokenizer.ggml.*` metadata (byte-level BPE only)."""
        keys = [
            "general.name",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
        ]
        # load_model passes the reader it already opened for the weights; opening one indexes
        # every field and tensor (~3 s for SmolLM2).
        reader = (
            path_or_reader if isinstance(path_or_reader, GGUFReader) else GGUFReader(path_or_reader)
        )
        meta = _reader_metadata(reader, keys)

        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            kind = "SentencePiece" if model == "llama" else "this"
            raise TokenizerError(
                f"GGUF tokenizer.ggml.model is {model!r}: {kind} tokenizer is unsupported; only "
                "byte-level BPE ('gpt2': GPT-2, SmolLM2, Llama 3, Qwen2) is"
            )
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        if pre not in GGUF_PRE_PATTERNS:
            raise TokenizerError(
                f"GGUF pre-tokenizer {pre!r} is unsupported; known: {sorted(GGUF_PRE_PATTERNS)}"
            )
        tokens: list[str] = meta.get("tokenizer.ggml.tokens", [])
        token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab: dict[str, int] = {}
        special_tokens: dict[str, int] = {}
        for i, (tok, kind_id) in enumerate(zip(tokens, token_types, strict=True)):
            if kind_id in GGUF_SPECIAL_TOKEN_TYPES:
                special_tokens[tok] = i
            elif kind_id != GGUF_UNUSED_TOKEN_TYPE:
                vocab[tok] = i
        return cls(
            vocab=vocab,
            merges=[_split_merge(m) for m in meta.get("tokenizer.ggml.merges", [])],
            special_tokens=special_tokens,
            pattern=GGUF_PRE_PATTERNS[pre],
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            name=meta.get("general.name", "gguf"),
        )

    # ---- Hugging Face folders --------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """From tokenizer.json (BPE + ByteLevel), or vocab.json + merges.txt (GPT-2 style).

        Raises FileNotFoundError where the folder has neither.
        """
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab, merges, special_tokens, pattern, normalization = _parse_tokenizer_json(data)
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = _read_merges_txt(folder / "merges.txt")
            special_tokens = _gpt2_folder_special_tokens(folder, vocab)
            pattern, normalization = GPT2_PATTERN, None
        else:
            raise FileNotFoundError(f"{folder} has no tokenizer.json nor vocab.json + merges.txt")
        bos, eos = _hf_bos_eos(folder, special_tokens)
        return cls(
            vocab=vocab,
            merges=merges,
            special_tokens=special_tokens,
            pattern=pattern,
            bos_token_id=bos,
            eos_token_id=eos,
            name=folder.name or "hf",
            normalization=normalization,
        )

    def save_hf(self, out_dir: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json that `tokenizers` and `transformers` load
        into a tokenizer giving the same ids (call encode with add_special_tokens=False: no BOS)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vocab = dict(self._vocab)
        for text, i in self.special_tokens.items():
            # Real tokenizer.json files list added tokens in the model vocab too; their ids come
            # from there when the file is loaded.
            if vocab.setdefault(text, i) != i:
                raise TokenizerError(f"special token {text!r} has the text of token {vocab[text]}")
        added_tokens = [
            {
                "id": i,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for text, i in sorted(self.special_tokens.items(), key=lambda item: item[1])
        ]
        tokenizer_json = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added_tokens,
            "normalizer": {"type": self._normalization} if self._normalization else None,
            "pre_tokenizer": _hf_pre_tokenizer(self.pattern),
            "post_processor": None,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": True,
                "trim_offsets": True,
                "use_regex": True,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": dict(sorted(vocab.items(), key=lambda item: item[1])),
                "merges": [[a, b] for a, b in self._merges],
            },
        }
        (out / "tokenizer.json").write_text(
            json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8"
        )

        def name(token_id: int | None) -> str | None:
            return None if token_id is None else self.token_bytes(token_id).decode("utf-8")

        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_token_id),
            "eos_token": name(self.eos_token_id),
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        (out / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


# ---- Hugging Face file formats -------------------------------------------------------------------


def _split_merge(merge: str | Sequence[str]) -> tuple[str, str]:
    """A merge as written in GGUF / merges.txt / old tokenizer.json ("Ġ t") or new ([Ġ, t])."""
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    if len(parts) != 2:
        raise TokenizerError(f"malformed merge {merge!r}")
    return parts[0], parts[1]


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [_split_merge(line) for line in lines if line and not line.startswith("#version")]


def _parse_tokenizer_json(
    data: dict[str, Any],
) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int], str, Literal["NFC"] | None]:
    """(vocab, merges, special tokens, pattern, normalization) of a tokenizer.json."""
    model = data.get("model") or {}
    if model.get("type", "BPE") != "BPE":
        raise TokenizerError(
            f"tokenizer.json model {model.get('type')!r} is unsupported (SentencePiece Unigram, "
            "WordPiece, ...); only byte-level BPE is"
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise TokenizerError(f"tokenizer.json BPE with {key}={model[key]!r} is unsupported")
    if model.get("byte_fallback"):
        raise TokenizerError(
            "tokenizer.json BPE with byte_fallback (SentencePiece style) is unsupported"
        )
    vocab: dict[str, int] = model.get("vocab") or {}
    merges = [_split_merge(m) for m in model.get("merges") or []]
    pattern = _pattern_from_hf_pre_tokenizer(data.get("pre_tokenizer"))

    special_tokens: dict[str, int] = {}
    for added in data.get("added_tokens") or []:
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            raise TokenizerError(
                f"added token {added['content']!r} uses lstrip/rstrip/single_word, unsupported"
            )
        # Non-special added tokens are matched whole too; allow_special=False then differs from
        # Hugging Face for them alone (none of GPT-2, SmolLM2, Llama 3 has any).
        special_tokens[added["content"]] = int(added["id"])

    single_bytes = {tok for tok in vocab if len(tok) == 1}
    if model.get("unk_token") and len(single_bytes & set(_unicode_to_bytes())) < 256:
        raise TokenizerError(
            "tokenizer.json BPE maps bytes without a token to an unk_token; tiktoken drops them"
        )

    normalizer = data.get("normalizer")
    normalization: Literal["NFC"] | None = None
    if normalizer == {"type": "NFC"}:  # Qwen2
        normalization = "NFC"
    elif normalizer not in (None, {"type": "Sequence", "normalizers": []}):
        raise TokenizerError(f"tokenizer.json normalizer {normalizer!r} is unsupported")
    return vocab, merges, special_tokens, pattern, normalization


def _pattern_from_hf_pre_tokenizer(pre: dict[str, Any] | None) -> str:
    """The single regex equivalent to a byte-level pre_tokenizer, or TokenizerError."""
    steps: list[dict[str, Any]] = [pre] if pre else []
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
    kinds = [step.get("type") for step in steps]

    def byte_level(step: dict[str, Any], use_regex: bool) -> bool:
        return not step.get("add_prefix_space") and step.get("use_regex", True) == use_regex

    if kinds == ["ByteLevel"] and byte_level(steps[0], use_regex=True):
        return GPT2_PATTERN
    digits = kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
    if digits and byte_level(steps[1], use_regex=True):
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], use_regex=False):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex and split.get("behavior") == "Isolated" and not split.get("invert"):
            return str(regex)
    raise TokenizerError(
        f"tokenizer.json pre_tokenizer {json.dumps(pre)} is unsupported: supported are "
        "ByteLevel(use_regex), Digits(individual_digits)+ByteLevel(use_regex) and "
        "Split(Regex, isolated)+ByteLevel(use_regex=false), all without add_prefix_space"
    )


def _hf_pre_tokenizer(pattern: str) -> dict[str, Any]:
    """The tokenizer.json pre_tokenizer that splits text like `pattern`."""

    def byte_level(use_regex: bool) -> dict[str, Any]:
        return {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": use_regex,
        }

    if pattern == GPT2_PATTERN:
        return byte_level(use_regex=True)
    if pattern == SMOLLM_PATTERN:
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, byte_level(use_regex=True)]}
    split = {
        "type": "Split",
        "pattern": {"Regex": pattern},
        "behavior": "Isolated",
        "invert": False,
    }
    return {"type": "Sequence", "pretokenizers": [split, byte_level(use_regex=False)]}


def _gpt2_folder_special_tokens(folder: Path, vocab: Mapping[str, int]) -> dict[str, int]:
    """Special tokens of a vocab.json + merges.txt folder: <|endoftext|> and those the side files
    (added_tokens.json, special_tokens_map.json, tokenizer_config.json) name."""
    special: dict[str, int] = {}
    if GPT2_END_OF_TEXT in vocab:
        special[GPT2_END_OF_TEXT] = vocab[GPT2_END_OF_TEXT]
    added = _read_json(folder / "added_tokens.json")
    special.update({text: int(i) for text, i in added.items()})
    config = _read_json(folder / "tokenizer_config.json")
    for i, entry in (config.get("added_tokens_decoder") or {}).items():
        if entry.get("special"):
            special[entry["content"]] = int(i)
    for text in _named_special_tokens(_read_json(folder / "special_tokens_map.json")):
        if text in vocab:
            special[text] = vocab[text]
    return special


def _named_special_tokens(config: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens"):
        values = config.get(key)
        for value in values if isinstance(values, list) else [values]:
            text = value.get("content") if isinstance(value, dict) else value
            if isinstance(text, str):
                names.append(text)
    return names


def _hf_bos_eos(folder: Path, special_tokens: Mapping[str, int]) -> tuple[int | None, int | None]:
    """BOS/EOS ids named by tokenizer_config.json, special_tokens_map.json or config.json; for
    GPT-2 style vocabularies that name none, <|endoftext|> is both."""
    found: dict[str, int | None] = {"bos": None, "eos": None}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        config = _read_json(folder / file)
        for label in found:
            value = config.get(f"{label}_token")
            text = value.get("content") if isinstance(value, dict) else value
            if found[label] is None and isinstance(text, str) and text in special_tokens:
                found[label] = special_tokens[text]
    model_config = _read_json(folder / "config.json")
    for label in found:
        token_id = model_config.get(f"{label}_token_id")
        if found[label] is None and isinstance(token_id, int):
            found[label] = token_id
        if found[label] is None and GPT2_END_OF_TEXT in special_tokens:
            found[label] = special_tokens[GPT2_END_OF_TEXT]
    return found["bos"], found["eos"]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


# ---- GGUF metadata -------------------------------------------------------------------------------


def _reader_metadata(reader: GGUFReader, keys: Collection[str]) -> dict[str, Any]:
    """The values of `keys` present in an already opened GGUFReader."""
    meta: dict[str, Any] = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is None:
            continue
        is_string = field.types[-1] == GGUFValueType.STRING
        values = [
            bytes(field.parts[i]).decode("utf-8") if is_string else field.parts[i].tolist()[0]
            for i in field.data
        ]
        meta[key] = values if field.types[0] == GGUFValueType.ARRAY else values[0]
    return meta
