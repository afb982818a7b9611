"""SentencePiece-style BPE with byte fallback (Gemma), run by tiktoken, behind the `Tokenizer`
interface (tokenizer.py).

The tokenizer a GGUF describes with `tokenizer.ggml.model = "llama"` works on characters, not bytes:
spaces become "▁", the text is cut into characters, adjacent pieces merge best-first, and a character
with no token of its own becomes its UTF-8 bytes as `<0xNN>` tokens. For Gemma the merge order is the
order of the tokens in the file (Hugging Face builds its merges the same way: every split of every
token into two tokens, ranked by the id of the token they make).

tiktoken merges bytes, at each step the adjacent pair whose concatenation has the lowest rank. We
make it merge characters first: every proper prefix of a multi-byte character, every single-character
token and every lone byte gets a rank below all real tokens ("assembly" ranks), and real tokens rank
after them in id order. Once characters are whole, the remaining merges are the tokenizer's own, in
its own order. Assembly pieces that are not tokens (bytes of characters the vocabulary lacks) map to
their `<0xNN>` byte tokens afterwards.

Control tokens (`<bos>`, `<start_of_turn>`) and user-defined ones (runs of newlines, HTML tags) are
matched whole in the text first, longest first, as Hugging Face's added tokens are.
"""

from __future__ import annotations

import re
from typing import Any

import tiktoken

from neuron_explainer.models.tokenizer import Tokenizer
from neuron_explainer.models.tokenizer_files import TokenizerError

SPACE = "\u2581"  # ▁, SentencePiece's stand-in for a space
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # llama.cpp's token types
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class SentencePieceTokenizer(Tokenizer):
    """A `Tokenizer` for SentencePiece-style BPE vocabularies with byte fallback. `encoding` is the
    tiktoken encoding that does the merging; its ranks are NOT token ids (see the module doc)."""

    def __init__(
        self,
        tokens: list[str],
        token_types: list[int],
        bos_token_id: int | None,
        eos_token_id: int | None,
        name: str = "spm",
        add_bos_token: bool = False,
    ) -> None:
        self.vocab_size = len(tokens)
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.pattern = r"[\s\S]+"  # no pre-tokenization: the whole text is one piece
        self._normalization = None
        self._has_unknown_bytes = False
        # Tokens of two or more spaces are stored with real spaces; the merges spell them with ▁.
        pieces = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        self._bytes = [None] * self.vocab_size
        byte_ids: dict[int, int] = {}
        for i, (piece, kind) in enumerate(zip(pieces, token_types, strict=True)):
            m = _BYTE_TOKEN.match(piece) if kind == BYTE else None
            if m:
                byte_ids[int(m.group(1), 16)] = i
                self._bytes[i] = bytes([int(m.group(1), 16)])
            else:
                self._bytes[i] = piece.replace(SPACE, " ").encode("utf-8")
        if len(byte_ids) != 256:
            raise TokenizerError(f"the vocabulary has {len(byte_ids)} of the 256 byte tokens")
        self._byte_ids = byte_ids
        # Matched whole before BPE (Hugging Face adds them as added tokens).
        self.special_tokens = {
            piece: i
            for i, (piece, kind) in enumerate(zip(pieces, token_types, strict=True))
            if kind in (CONTROL, USER_DEFINED)
        }
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._special_regex = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

        # Real tokens by their piece's UTF-8 bytes (▁ kept: the text is normalized the same way).
        # Where two ids spell the same piece, Hugging Face's vocabulary keeps the last one.
        real: dict[bytes, int] = {}
        for i, (piece, kind) in enumerate(zip(pieces, token_types, strict=True)):
            if kind != BYTE:
                real[piece.encode("utf-8")] = i
        assembly: list[bytes] = [bytes([b]) for b in range(256)]
        chars = {c for piece in real for c in piece.decode("utf-8")}
        for c in sorted(chars):
            data = c.encode("utf-8")
            assembly += [data[:k] for k in range(2, len(data) + 1)]
        assembly = list(dict.fromkeys(assembly))
        # Single bytes that are tokens (ASCII characters) and whole characters that are tokens
        # map to their ids; every other assembly piece is bytes of a character without a token.
        self._assembly_ids: list[tuple[int, ...]] = [
            (real[a],) if a in real else tuple(byte_ids[b] for b in a) for a in assembly
        ]
        ranks = {a: r for r, a in enumerate(assembly)}
        self._offset = len(assembly)
        for data, i in real.items():
            ranks.setdefault(data, self._offset + i)
        self.encoding = tiktoken.Encoding(
            name=name, pat_str=self.pattern, mergeable_ranks=ranks, special_tokens={}
        )

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> SentencePieceTokenizer:
        """From a GGUF's metadata (gguf_file.GGUFFile.metadata)."""
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            list(meta["tokenizer.ggml.tokens"]),
            [int(t) for t in meta["tokenizer.ggml.token_type"]],
            None if bos is None else int(bos),
            None if eos is None else int(eos),
            str(meta.get("general.name", "spm")),
            bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for rank in self.encoding.encode_ordinary(text.replace(" ", SPACE)):
            if rank >= self._offset:
                ids.append(rank - self._offset)
            else:
                ids.extend(self._assembly_ids[rank])
        return ids

    def save_hf(self, out_dir: object) -> None:
        raise TokenizerError(
            "writing a SentencePiece tokenizer as Hugging Face files is not supported"
        )
