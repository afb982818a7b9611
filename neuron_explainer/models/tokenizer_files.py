"""Tokenizer files: Hugging Face folders and GGUF metadata, read into a `TokenizerSpec` and back.

A byte-level BPE tokenizer is defined by its vocabulary, its merges in priority order, its special
tokens, its pre-tokenization regex, BOS/EOS and an optional Unicode normalization: a
`TokenizerSpec`, from which tokenizer.py builds the `Tokenizer` that runs it. The files store each
token as a string over GPT-2's printable stand-ins for the 256 byte values (`bytes_to_unicode`).
Read here:

- Hugging Face folders: `tokenizer.json` (a BPE model with a ByteLevel pre-tokenizer, alone or after
  Digits or a Split regex), or GPT-2 style `vocab.json` + `merges.txt`, whose side files
  (added_tokens.json, special_tokens_map.json, tokenizer_config.json, config.json) name the special
  tokens and BOS/EOS. `write_hf_tokenizer` writes tokenizer.json + tokenizer_config.json.
- GGUF `tokenizer.ggml.*` metadata with `tokenizer.ggml.model = "gpt2"`; llama.cpp's names for
  pre-tokenizers (`tokenizer.ggml.pre`) map to the regexes below.

Anything else (SentencePiece, WordPiece, byte fallback, ...) raises TokenizerError.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    """Tokenizer files we cannot read or reproduce exactly, or text/ids a tokenizer cannot handle."""


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


def token_bytes_from_string(token: str, token_id: int) -> bytes:
    """The bytes a byte-level token string stands for."""
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise TokenizerError(
            f"token {token_id} {token!r} has a character outside GPT-2's byte-level alphabet; "
            "only byte-level BPE tokenizers are supported"
        ) from e


@dataclass(frozen=True)
class TokenizerSpec:
    """A byte-level BPE tokenizer as its files define it (the arguments of `Tokenizer`).

    vocab: token string (byte-level alphabet) -> id; may list the special tokens too.
    merges: in priority order. special_tokens: raw text -> id, matched whole in the text.
    pattern: the pre-tokenization regex. name: a label (the model's or the folder's).
    """

    vocab: Mapping[str, int]
    merges: Sequence[tuple[str, str]]
    special_tokens: Mapping[str, int]
    pattern: str
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "bpe"
    normalization: Literal["NFC"] | None = None
    add_bos_token: bool = False  # the model expects BOS before every prompt


# ---- Hugging Face folders ------------------------------------------------------------------------


def read_hf_tokenizer(folder: str | os.PathLike[str]) -> TokenizerSpec:
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
    return TokenizerSpec(
        vocab=vocab,
        merges=merges,
        special_tokens=special_tokens,
        pattern=pattern,
        bos_token_id=bos,
        eos_token_id=eos,
        name=folder.name or "hf",
        normalization=normalization,
        add_bos_token=bos is not None and _hf_adds_bos(folder, bos, special_tokens),
    )


def write_hf_tokenizer(spec: TokenizerSpec, out_dir: str | os.PathLike[str]) -> None:
    """Write tokenizer.json and tokenizer_config.json that `tokenizers` and `transformers` load
    into a tokenizer giving the same ids (call encode with add_special_tokens=False: no BOS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = dict(spec.vocab)
    for text, i in spec.special_tokens.items():
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
        for text, i in sorted(spec.special_tokens.items(), key=lambda item: item[1])
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": spec.normalization} if spec.normalization else None,
        "pre_tokenizer": _hf_pre_tokenizer(spec.pattern),
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
            "merges": [[a, b] for a, b in spec.merges],
        },
    }
    (out / "tokenizer.json").write_text(
        json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8"
    )

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token_text(spec, spec.bos_token_id),
        "eos_token": _token_text(spec, spec.eos_token_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _token_text(spec: TokenizerSpec, token_id: int | None) -> str | None:
    """The text of a token: a special token's own, or a vocab token's bytes read as UTF-8."""
    if token_id is None:
        return None
    for text, i in spec.special_tokens.items():
        if i == token_id:
            return text
    for token, i in spec.vocab.items():
        if i == token_id:
            return token_bytes_from_string(token, i).decode("utf-8")
    raise TokenizerError(f"{token_id} is not a token id")


# ---- Hugging Face file details -------------------------------------------------------------------


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


def _hf_adds_bos(folder: Path, bos: int, special_tokens: Mapping[str, int]) -> bool:
    """Whether `transformers` puts BOS before a prompt: tokenizer_config.json's `add_bos_token`
    where it says, else a tokenizer.json post-processor whose single-sequence template starts with
    the BOS token (Llama 3's TemplateProcessing)."""
    config = _read_json(folder / "tokenizer_config.json")
    if isinstance(config.get("add_bos_token"), bool):
        return bool(config["add_bos_token"])
    processor = _read_json(folder / "tokenizer.json").get("post_processor") or {}
    processors = processor.get("processors", [processor]) if isinstance(processor, dict) else []
    for proc in processors:
        single = proc.get("single") if isinstance(proc, dict) else None
        if proc.get("type") == "TemplateProcessing" and isinstance(single, list) and single:
            first = single[0].get("SpecialToken", {}) if isinstance(single[0], dict) else {}
            return special_tokens.get(str(first.get("id"))) == bos
    return False


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


# ---- GGUF ----------------------------------------------------------------------------------------


def read_gguf_tokenizer(path_or_reader: str | os.PathLike[str] | GGUFReader) -> TokenizerSpec:
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
        "tokenizer.ggml.add_bos_token",
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
    return TokenizerSpec(
        vocab=vocab,
        merges=[_split_merge(m) for m in meta.get("tokenizer.ggml.merges", [])],
        special_tokens=special_tokens,
        pattern=GGUF_PRE_PATTERNS[pre],
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        name=meta.get("general.name", "gguf"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


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
