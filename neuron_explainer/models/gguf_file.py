"""A small reader of GGUF files: the metadata as Python values and each tensor as a float32 array.

`gguf.GGUFReader` wraps every element of every metadata array in its own numpy view, which takes
~50 s for Gemma 3's 262k-token vocabulary; this reads the same header in well under a second and
leaves dequantization (Q4_K, Q6_K, Q8_0, ...) to `gguf.quants.dequantize`. Layout: magic "GGUF",
version, tensor and key/value counts, the key/values, the tensor infos (name, dims innermost first,
type, offset), then the tensor data from the next multiple of `general.alignment`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "u1"),
    1: ("<b", "i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "?"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), the reverse of GGUF's
    qtype: int
    offset: int  # absolute, in the file


class GGUFFile:
    """`metadata` (key -> value; arrays as lists) and `tensors` (name -> TensorInfo) of a file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._data.data)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file")
        self._buf, self._pos = buf, 4
        version = self._scalar(4)
        if version < 2:
            raise ValueError(f"{self.path}: GGUF version {version} is not supported")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar(10) for _ in range(self._scalar(4))]
            infos.append((name, tuple(reversed(dims)), self._scalar(4), self._scalar(10)))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        self.tensors = {
            name: TensorInfo(name, shape, qtype, start + offset)
            for name, shape, qtype, offset in infos
        }

    # ---- header parsing ------------------------------------------------------------------------

    def _scalar(self, kind: int) -> Any:
        fmt = _SCALARS[kind][0]
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar(10)
        text = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            return self._scalar(kind)
        item, count = self._scalar(4), self._scalar(10)
        if item in _SCALARS:
            dtype = np.dtype(_SCALARS[item][1])
            arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
            self._pos += dtype.itemsize * count
            return arr.tolist()
        return [self._value(item) for _ in range(count)]

    # ---- tensors -------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to a float32 array in numpy order ((out, in) for matrices)."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        qtype = GGMLQuantizationType(info.qtype)
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows, cols = int(np.prod(info.shape[:-1])), info.shape[-1]
        row_bytes = cols // block * type_size
        raw = self._data[info.offset : info.offset + rows * row_bytes].reshape(rows, row_bytes)
        if qtype == GGMLQuantizationType.F32:
            arr = raw.view(np.float32)
        elif qtype == GGMLQuantizationType.F16:
            arr = raw.view(np.float16).astype(np.float32)
        else:
            arr = dequantize(raw, qtype)
        return np.array(arr, dtype=np.float32).reshape(info.shape)
