"""Read R data without R: the XDR serialization format and lazy-load databases (`.rdb` + `.rdx`).

An R package's `data/Rdata.rdb` holds one compressed chunk per data object; `data/Rdata.rdx` is an
R-serialized list `list(variables = list(name = c(offset, length), ...), references = ...,
compressed = TRUE | 2 | 3)` saying where each object's chunk lies. A chunk is a 4-byte big-endian
uncompressed length followed by a zlib stream (`compressed = TRUE`), or by a one-byte method
('Z' zlib, '2' bzip2, 'X' xz, '0' none) and the data (`compressed = 2` or `3`). Each chunk
decompresses to an R serialization stream (`serialize(x, NULL)`), whose format is R's own
(src/main/serialize.c): a header, then items, each starting with a 32-bit flags word whose low byte
is the SEXP type.

Only what data objects need is converted: vectors become `RVector` (a list with an `attributes`
dict; character `NA` is None, integer `NA` is None), pairlists become `RPairList`, symbols `RSymbol`.
Closures, environments and byte code are read past (or refused with `RDataError` for byte code) so
a stray function in a package's data does not stop the text from being read.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXP types (R internals, Rinternals.h) and the serializer's pseudo-types (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
RAWSXP, S4SXP = 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

NA_INTEGER = -(2**31)
_UTF8_MASK, _LATIN1_MASK, _BYTES_MASK, _ASCII_MASK = 1 << 3, 1 << 2, 1 << 1, 1 << 6
_PAIRLIST_TYPES = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP}
_SPECIAL_VALUES = {
    NILVALUE_SXP: None,
    GLOBALENV_SXP: "<globalenv>",
    UNBOUNDVALUE_SXP: "<unbound>",
    MISSINGARG_SXP: "<missing>",
    BASENAMESPACE_SXP: "<base namespace>",
    EMPTYENV_SXP: "<emptyenv>",
    BASEENV_SXP: "<baseenv>",
}


class RDataError(ValueError):
    """Input that is not R serialization data this reader understands."""


class RVector(list[Any]):
    """An R vector: its elements, plus its R attributes (e.g. `names`, `class`)."""

    def __init__(self, items: list[Any], sexptype: int, attributes: dict[str, Any] | None = None):
        super().__init__(items)
        self.sexptype = sexptype
        self.attributes: dict[str, Any] = attributes or {}

    @property
    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return None if names is None else [str(n) for n in names]

    def as_dict(self) -> dict[str, Any]:
        """A named list as {name: element}; raises RDataError when the vector has no names."""
        if self.names is None:
            raise RDataError("this R vector has no names")
        return dict(zip(self.names, self, strict=True))


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass
class RPairList:
    """A pairlist (also function calls and closures): (tag or None, value) pairs."""

    sexptype: int
    items: list[tuple[str | None, Any]] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class REnvironment:
    """An environment; only its variables are kept (enclosures are read past)."""

    variables: dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError(f"R serialization data ends early (wanted {n} bytes at {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def read_int(self) -> int:
        return int(struct.unpack(">i", self._take(4))[0])

    def length(self) -> int:
        n = self.read_int()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            upper, lower = self.read_int(), self.read_int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        if n < 0:
            raise RDataError(f"negative vector length {n}")
        return n

    def header(self) -> None:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RDataError(
                f"R serialization format {fmt!r} is not supported (only XDR binary, b'X\\n')"
            )
        version = self.read_int()
        self.read_int()  # R version that wrote it
        self.read_int()  # minimal R version to read it
        if version == 3:
            self._take(self.read_int())  # native encoding name
        elif version != 2:
            raise RDataError(f"R serialization version {version} is not supported (2 or 3)")

    def item(self) -> Any:
        return self._item(self.read_int())

    def _item(self, flags: int) -> Any:
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        if sexptype in _SPECIAL_VALUES:
            return _SPECIAL_VALUES[sexptype]
        if sexptype == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.read_int()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"reference {index} to an object not yet read")
            return self.refs[index - 1]
        if sexptype in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            names = self._string_vec()
            self.refs.append(names)
            return names
        if sexptype == SYMSXP:
            symbol = RSymbol(str(self.item()))
            self.refs.append(symbol)
            return symbol
        if sexptype == ENVSXP:
            self.read_int()  # locked
            env = REnvironment()
            self.refs.append(env)
            self.item()  # enclosure
            frame = self.item()
            hashtab = self.item()
            self.item()  # attributes
            for source in (frame, *(hashtab if isinstance(hashtab, RVector) else [])):
                if isinstance(source, RPairList):
                    env.variables.update((k, v) for k, v in source.items if k is not None)
            return env
        if sexptype in _PAIRLIST_TYPES:
            return self._pairlist(flags)
        if sexptype == ALTREP_SXP:
            return self._altrep()
        if sexptype in (EXTPTRSXP, WEAKREFSXP):
            pointer = RVector([], sexptype)
            self.refs.append(pointer)
            if sexptype == EXTPTRSXP:
                self.item()  # protected value
                self.item()  # tag
            if has_attr:
                pointer.attributes = self._attributes(self.item())
            return pointer
        if sexptype == BCODESXP:
            raise RDataError("R byte code is not supported")

        value: Any
        if sexptype in (SPECIALSXP, BUILTINSXP):
            value = RSymbol(self._take(self.length()).decode("ascii", errors="replace"))
        elif sexptype == CHARSXP:
            value = self._charsxp(levels)
        elif sexptype in (LGLSXP, INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self._take(4 * n))
            if sexptype == LGLSXP:
                items: list[Any] = [None if i == NA_INTEGER else bool(i) for i in ints]
            else:
                items = [None if i == NA_INTEGER else i for i in ints]
            value = RVector(items, sexptype)
        elif sexptype == REALSXP:
            n = self.length()
            value = RVector(list(struct.unpack(f">{n}d", self._take(8 * n))), sexptype)
        elif sexptype == CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            value = RVector([complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)], sexptype)
        elif sexptype in (STRSXP, VECSXP, EXPRSXP):
            value = RVector([self.item() for _ in range(self.length())], sexptype)
        elif sexptype == RAWSXP:
            value = RVector(list(self._take(self.length())), sexptype)
        elif sexptype == S4SXP:
            value = RVector([], sexptype)
        else:
            raise RDataError(f"unknown SEXP type {sexptype} at byte {self.pos - 4}")
        if has_attr:
            attributes = self._attributes(self.item())
            if isinstance(value, RVector):
                value.attributes = attributes
        return value

    def _charsxp(self, levels: int) -> str | None:
        n = self.read_int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & _BYTES_MASK:
            return raw.decode("utf-8", errors="backslashreplace")
        # UTF-8, ASCII, or the writer's native encoding (UTF-8 on every current platform).
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def _string_vec(self) -> RVector:
        if self.read_int() != 0:
            raise RDataError("malformed string vector in a persistent reference")
        return RVector([self.item() for _ in range(self.read_int())], STRSXP)

    def _pairlist(self, flags: int) -> RPairList:
        # Iterative over the CDR chain: long pairlists would otherwise recurse once per element.
        out = RPairList(flags & 0xFF)
        first = True
        while True:
            attributes = self._attributes(self.item()) if flags & (1 << 9) else {}
            tag = self.item() if flags & (1 << 10) else None
            if first:
                out.attributes = attributes
                first = False
            name = tag.name if isinstance(tag, RSymbol) else (None if tag is None else str(tag))
            out.items.append((name, self.item()))
            flags = self.read_int()
            if out.sexptype in (CLOSXP, PROMSXP) or (flags & 0xFF) not in (LISTSXP, ATTRLISTSXP):
                # The end of the chain (normally NULL; a closure's body, a promise's expression).
                self._item(flags)
                return out

    def _attributes(self, pairs: Any) -> dict[str, Any]:
        if isinstance(pairs, RPairList):
            return {k: v for k, v in pairs.items if k is not None}
        return {}

    def _altrep(self) -> Any:
        info = self.item()
        state = self.item()
        attributes = self._attributes(self.item())
        class_name = ""
        if isinstance(info, RPairList) and info.items and isinstance(info.items[0][1], RSymbol):
            class_name = info.items[0][1].name
        value: RVector
        if class_name in ("compact_intseq", "compact_realseq"):
            n, start, step = (float(x) for x in state)
            kind = INTSXP if class_name == "compact_intseq" else REALSXP
            cast = int if kind == INTSXP else float
            value = RVector([cast(start + i * step) for i in range(int(n))], kind)
        elif class_name == "deferred_string":
            source = state.items[0][1] if isinstance(state, RPairList) else state
            value = RVector([None if x is None else _r_number_string(x) for x in source], STRSXP)
        elif class_name.startswith("wrap_") and isinstance(state, RVector) and state:
            value = RVector(list(state[0]), getattr(state[0], "sexptype", VECSXP))
        else:
            raise RDataError(f"ALTREP class {class_name!r} is not supported")
        value.attributes = attributes
        return value


def _r_number_string(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def unserialize(data: bytes) -> Any:
    """The R object in one serialization stream (`serialize(x, NULL)` output, XDR format)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_rds(path: str | Path) -> Any:
    """An `.rds` (or `.rdx`) file: one serialized object, gzip/bzip2/xz compressed or not."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    elif raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    elif raw[:2] != b"X\n" and len(raw) > 4:
        # A lazy-load style chunk: 4-byte length, then zlib.
        raw = _decompress_chunk(raw, 1)
    return unserialize(raw)


def _decompress_chunk(chunk: bytes, compressed: int) -> bytes:
    if len(chunk) < 5:
        raise RDataError("lazy-load chunk too short")
    (length,) = struct.unpack(">I", chunk[:4])
    method, body = b"Z", chunk[4:]
    if compressed in (2, 3):
        method, body = chunk[4:5], chunk[5:]
    if method == b"Z":
        out = zlib.decompress(body)
    elif method == b"2":
        out = bz2.decompress(body)
    elif method == b"X":
        out = lzma.decompress(body)
    elif method == b"0":
        out = body
    else:
        raise RDataError(f"unknown lazy-load compression method {method!r}")
    if len(out) != length:
        raise RDataError(f"chunk decompressed to {len(out)} bytes, header says {length}")
    return out


def read_lazyload_db(rdb_path: str | Path, rdx_path: str | Path | None = None) -> dict[str, Any]:
    """Every object of an R lazy-load database (`Rdata.rdb` with its `Rdata.rdx` index), by name."""
    rdb_path = Path(rdb_path)
    rdx_path = Path(rdx_path) if rdx_path is not None else rdb_path.with_suffix(".rdx")
    for p in (rdb_path, rdx_path):
        if not p.is_file():
            raise RDataError(f"{p} does not exist")
    index = read_rds(rdx_path)
    if not isinstance(index, RVector) or index.names is None:
        raise RDataError(f"{rdx_path} is not a lazy-load index (a named list)")
    fields = index.as_dict()
    if "variables" not in fields:
        raise RDataError(f"{rdx_path} has no 'variables' entry")
    compressed_field = fields.get("compressed", [True])
    compressed = int(compressed_field[0]) if compressed_field else 1
    data = rdb_path.read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, length) in fields["variables"].as_dict().items():
        offset, length = int(offset), int(length)
        if offset < 0 or offset + length > len(data):
            raise RDataError(f"{name}: chunk [{offset}, {offset + length}) is outside {rdb_path}")
        out[name] = unserialize(_decompress_chunk(data[offset : offset + length], compressed))
    return out
