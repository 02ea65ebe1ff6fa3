"""Minimal safetensors reader and writer (dtype, shape and raw little-endian bytes under a JSON
header), so that exporting adapters for C++ needs no package beyond torch. Files are readable by
the ``safetensors`` package and by ``dora_ext::load_safetensors`` in C++ (cpp/src/safetensors.cpp).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def save_file(tensors: Mapping[str, torch.Tensor], path: Union[str, Path],
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` (any device; saved as contiguous CPU bytes) and string ``metadata``."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        if key == "__metadata__":
            raise ValueError("save_file: '__metadata__' is reserved and cannot name a tensor")
        if t.dtype not in _DTYPES:
            raise TypeError(f"save_file: tensor {key!r} has unsupported dtype {t.dtype}")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def load_file(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``; tensors are CPU tensors owning their memory."""
    raw = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = _NAMES[entry["dtype"]]
        buf = bytearray(data[begin:end])
        flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        tensors[key] = flat.reshape(entry["shape"]).clone()
    return tensors, metadata
