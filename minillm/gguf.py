"""Reading a GGUF checkpoint: metadata, and the block formats that llama.cpp stores weights in.

GGUF (llama.cpp's file format) stores a model as key/value metadata plus tensors. Small tensors (norm weights) are
plain F32/F16; big matrices are *block quantized*: each row is cut into blocks of 32 values, and every block keeps
its own scale (and, for Q4_1, its own minimum), so one outlier only hurts its 32 neighbours:

    Q8_0  (34 bytes / 32 values):  d: f16 | q[32]: int8            x = d * q
    Q4_0  (18 bytes / 32 values):  d: f16 | 16 bytes of nibbles     x = d * (q - 8)
    Q4_1  (20 bytes / 32 values):  d: f16 | m: f16 | 16 bytes       x = d * q + m

In the 4-bit formats byte j holds value j in its low nibble and value j + 16 in its high nibble. We parse the file
with the `gguf` package's reader (plumbing) but decode the blocks ourselves (the lesson); tests check every format
bit-exact against `gguf`'s own dequantizer. Notebook 06 decodes one real block of the embedded model by hand.

Reference: the GGML block layouts in llama.cpp's ``ggml-common.h`` (``block_q8_0``, ``block_q4_0``, ``block_q4_1``).
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_SIZE = 32  # values per block in every format below

# bytes per block for each quantized type
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


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
        raise ValueError(f"unsupported GGUF tensor type {type_name!r}; minillm decodes {list(SUPPORTED_TYPES)}")
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


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
