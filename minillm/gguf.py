"""Reading a GGUF checkpoint: metadata, and the block formats that llama.cpp stores weights in.

GGUF (llama.cpp's file format) stores a model as key/value metadata plus tensors. Small tensors (norm weights) are
plain F32/F16; big matrices are *block quantized*: each row is cut into blocks of 32 values, and every block keeps
its own scale (and, for Q4_1, its own minimum), so one outlier only hurts its 32 neighbours:

    Q8_0  (34 bytes / 32 values):  d: f16 | q[32]: int8            x = d * q
    Q4_0  (18 bytes / 32 values):  d: f16 | 16 bytes of nibbles     x = d * (q - 8)
    Q4_1  (20 bytes / 32 values):  d: f16 | m: f16 | 16 bytes       x = d * q + m

In the 4-bit formats byte j holds value j in its low nibble and value j + 16 in its high nibble. We parse the file
with the `gguf` package's reader (plumbing) but decode these three formats ourselves (the lesson); tests check them
bit-exact against `gguf`'s own dequantizer. Other formats (the K-quants Q4_K, Q5_K, Q6_K of most downloaded files,
BF16, the IQ types) are decoded by `gguf.quants.dequantize`. Notebook 06 decodes one real block of the embedded
model by hand.

A GGUF file is also untrusted input: ``open_gguf`` checks the header's counts against the file size before the
reader walks them, and turns a file that ends early into an error that says so.

Reference: the GGML block layouts in llama.cpp's ``ggml-common.h`` (``block_q8_0``, ``block_q4_0``, ``block_q4_1``).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

BLOCK_SIZE = 32  # values per block in every format below

# bytes per block for each quantized type
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")  # decoded here; the rest by the gguf package


def _blocks(raw: np.ndarray, type_name: str) -> np.ndarray:
    """View raw bytes as (num_blocks, bytes_per_block) uint8."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    return raw.reshape(-1, BLOCK_BYTES[type_name])


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """A little-endian f16 field at byte `offset` of every block, as float32 (num_blocks, 1)."""
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(num_blocks, 16) bytes -> (num_blocks, 32) 4-bit values: low nibbles first, then high nibbles."""
    low = packed & 0x0F
    high = packed >> 4
    return np.concatenate([low, high], axis=1).astype(np.float32)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, "Q8_0")
    d = _f16(blocks, 0)  # (num_blocks, 1)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (num_blocks, 32)
    return (d * q).reshape(-1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, "Q4_0")
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:])  # values 0..15, stored with an implicit offset of 8
    return (d * (q - 8.0)).reshape(-1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, "Q4_1")
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:])
    return (d * q + m).reshape(-1)


DEQUANTIZERS = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1}


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode one GGUF tensor's data into a float32 torch tensor of `shape` (PyTorch order, rows first)."""
    if type_name == "F32":
        values = np.asarray(raw).view(np.float32).astype(np.float32, copy=False)
    elif type_name == "F16":
        values = np.asarray(raw).view(np.float16).astype(np.float32)
    elif type_name in DEQUANTIZERS:
        values = DEQUANTIZERS[type_name](raw)
    else:
        values = _dequantize_with_gguf(raw, type_name)
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def _dequantize_with_gguf(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Formats the course does not teach (K-quants, IQ, BF16) are decoded by the gguf package."""
    unsupported = ValueError(
        f"unsupported GGUF tensor type {type_name!r}: minillm decodes {list(SUPPORTED_TYPES)} itself and hands the "
        "other weight formats (Q4_K, Q5_K, Q6_K, BF16, IQ*...) to the gguf package, which cannot dequantize this one"
    )
    if type_name not in GGMLQuantizationType.__members__:
        raise unsupported
    try:
        return gguf_dequantize(np.asarray(raw), GGMLQuantizationType[type_name])
    except NotImplementedError:
        raise unsupported from None


# ---------------------------------------------------------------------------------------------------------------
# Opening a file

HEADER = struct.Struct("<4sIQQ")  # magic b"GGUF", version, number of tensors, number of metadata key/values
READABLE_VERSIONS = (2, 3)  # what gguf's reader accepts
# The smallest possible encodings, to bound the counts: a key/value is a u64 key length, a u32 type and at least a
# one-byte value; a tensor description is a u64 name length, u32 number of dims, u32 type and u64 offset.
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


class _BoundsCheckedReader(GGUFReader):
    """gguf's reader, except that reading past the end of the file is an error.

    The reader slices a memory map, and numpy silently shortens a slice that runs off the end: a truncated file
    then fails later as a puzzling reshape or index error deep inside gguf. ``_get`` is the reader's one primitive
    for every read, so checking there catches every short read.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        end = offset + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            raise EOFError(f"its header describes data up to byte {end:,}, but it has only {self.data.size:,} bytes")
        return super()._get(offset, dtype, count, override_order)


def _check_header(path: Path) -> None:
    """Refuse files whose fixed-size header is wrong before the reader loops over counts it cannot trust."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it does not start with the magic bytes b'GGUF'")
    _, version, num_tensors, num_kv = HEADER.unpack(head)
    if version & 0xFFFFFF == 0 and version >> 24 in READABLE_VERSIONS:  # 3 read as 0x03000000: bytes swapped
        raise ValueError(f"{path} is a big-endian GGUF file; minillm reads little-endian ones (what llama.cpp writes)")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}; minillm reads versions {list(READABLE_VERSIONS)}")
    if num_kv * MIN_KV_BYTES + num_tensors * MIN_TENSOR_INFO_BYTES > size - HEADER.size:
        raise ValueError(
            f"{path} has a corrupt header: it claims {num_tensors:,} tensors and {num_kv:,} metadata keys, "
            f"more than a {size:,}-byte file can describe"
        )


def open_gguf(path: Path) -> GGUFReader:
    """A `gguf.GGUFReader` over `path`, or a ValueError that names the file and what is wrong with it."""
    _check_header(path)
    try:
        return _BoundsCheckedReader(str(path))
    except EOFError as err:
        raise ValueError(f"{path} is truncated: {err}; the download or copy was cut short, fetch it again") from None
    except (ValueError, KeyError, IndexError, OverflowError) as err:  # what the reader raises on bytes it cannot parse
        raise ValueError(f"{path} is a corrupt GGUF file ({type(err).__name__}: {err})") from err


def read_metadata(reader) -> dict:
    """All scalar/string/array metadata fields of a `gguf.GGUFReader` as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def tensor_shape(tensor) -> tuple[int, ...]:
    """GGUF lists dimensions fastest-first (ne0 = columns); PyTorch wants rows first."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k projection rows.

    llama.cpp rotates *adjacent* pairs (x0, x1), (x2, x3)...; Hugging Face's Llama rotates the two *halves* of each
    head (x_i, x_{i+D/2}). The converter permutes the rows of q_proj/k_proj so both give the same result; we permute
    them back so our model can use the half-rotation of the Hugging Face code.
    """
    out_features = weight.shape[0]
    half = out_features // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # rows stored as (head, pair, 2)
    return w.transpose(1, 2).reshape(weight.shape)  # rows as (head, 2 halves, pair)
