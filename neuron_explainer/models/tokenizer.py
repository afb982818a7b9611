"""Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, Qwen2 families), run by tiktoken.

A `Tokenizer` is built from a model's own files (a GGUF's `tokenizer.ggml.*` metadata, or a Hugging
Face folder; tokenizer_files.py reads and writes them) into a `tiktoken.Encoding` whose ranks ARE
the model's token ids. tiktoken merges, at each step, the adjacent pair whose concatenation has the
lowest rank; Hugging Face's BPE merges the pair that comes first in the merge list. The two agree
when merge order equals the order of the ids the merges produce, which the builder checks (it holds
for GPT-2, SmolLM2, Llama 3 and Qwen2, whose merges were written in id order). Byte-level BPE stores
each token as a string over GPT-2's printable stand-ins for the 256 byte values (`bytes_to_unicode`);
inverting that gives token bytes.

Special tokens (chat markers, end of text) are matched in the text first, longest first, as Hugging
Face's added-token matching does; the rest goes through the pre-tokenization regex and BPE.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Literal

import tiktoken
from gguf import GGUFReader

from neuron_explainer.models.tokenizer_files import (
    TokenizerError,
    TokenizerSpec,
    read_gguf_tokenizer,
    read_hf_tokenizer,
    token_bytes_from_string,
    write_hf_tokenizer,
)


class Tokenizer:
    """A model's byte-level BPE tokenizer; `encoding` is a `tiktoken.Encoding` with ranks = ids.

    Build one with `from_gguf` or `from_hf_folder` (or `from_spec`). `vocab_size` counts every token
    id (special tokens included): max id + 1. `encode` never adds BOS; prepend `bos_token_id` where wanted.
    `add_bos_token`: whether the model expects BOS before a prompt (its files say so: Gemma's do,
    GPT-2's and SmolLM2's do not); requests that leave `prepend_bos` unset follow it.
    """

    encoding: tiktoken.Encoding
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool = False
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
        add_bos_token: bool = False,
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
        self.add_bos_token = add_bos_token and bos_token_id is not None

        # id -> bytes; None for ids that name no token.
        self._bytes: list[bytes | None] = [None] * self.vocab_size
        for text, i in self.special_tokens.items():
            self._bytes[i] = text.encode("utf-8")
        by_bytes: dict[bytes, int] = {}
        for tok, i in self._vocab.items():
            data = token_bytes_from_string(tok, i)
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

    # ---- files (tokenizer_files.py) ------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: TokenizerSpec) -> Tokenizer:
        return cls(
            vocab=spec.vocab,
            merges=spec.merges,
            special_tokens=spec.special_tokens,
            pattern=spec.pattern,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            name=spec.name,
            normalization=spec.normalization,
            add_bos_token=spec.add_bos_token,
        )

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | GGUFReader) -> Tokenizer:
        """The tokenizer in a GGUF file's `tokenizer.ggml.*` metadata (byte-level BPE only)."""
        return cls.from_spec(read_gguf_tokenizer(path_or_reader))

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """From tokenizer.json (BPE + ByteLevel), or vocab.json + merges.txt (GPT-2 style).

        Raises FileNotFoundError where the folder has neither.
        """
        return cls.from_spec(read_hf_tokenizer(folder))

    def save_hf(self, out_dir: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json that `tokenizers` and `transformers` load
        into a tokenizer giving the same ids (call encode with add_special_tokens=False: no BOS)."""
        spec = TokenizerSpec(
            vocab=self._vocab,
            merges=self._merges,
            special_tokens=self.special_tokens,
            pattern=self.pattern,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            name=self.encoding.name,
            normalization=self._normalization,
        )
        write_hf_tokenizer(spec, out_dir)
