"""Our GGUF block decoders agree bit for bit with the gguf package's, on random blocks and on the real file."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from minillm.gguf import BLOCK_BYTES, dequantize, tensor_shape, unpermute_rope
from minillm.loading import embedded_gguf_path


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_formats_bit_exact_on_random_blocks(type_name):
    rng = np.random.default_rng(0)
    qtype = GGMLQuantizationType[type_name]
    rows, cols = 7, 32 * 5
    raw = rng.integers(0, 256, size=(rows, cols // 32 * BLOCK_BYTES[type_name]), dtype=np.uint8)
    # Random bytes can make NaN/inf f16 scales; overwrite scales with sane f16 values.
    blocks = raw.reshape(-1, BLOCK_BYTES[type_name])
    num_scales = 2 if type_name == "Q4_1" else 1
    scales = rng.normal(0, 0.05, size=(blocks.shape[0], num_scales)).astype(np.float16)
    blocks[:, : 2 * num_scales] = scales.view(np.uint8).reshape(blocks.shape[0], -1)
    expected = gguf_dequantize(raw, qtype)
    got = dequantize(raw, type_name, (rows, cols)).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "F16", "F32"])
def test_roundtrip_through_gguf_quantizer(type_name):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 96)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    raw = gguf_quantize(x, qtype)
    np.testing.assert_array_equal(dequantize(raw, type_name, x.shape).numpy(), gguf_dequantize(raw, qtype))


def test_real_file_tensors_bit_exact():
    reader = GGUFReader(str(embedded_gguf_path("smollm2-135m")))
    seen = set()
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name in seen:
            continue
        seen.add(name)
        got = dequantize(tensor.data, name, tensor_shape(tensor)).numpy()
        expected = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(got.shape)
        np.testing.assert_array_equal(got, expected)
    assert {"Q4_1", "Q8_0", "F32"} <= seen


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "BF16"])
def test_other_formats_decode_through_gguf(type_name):
    """Formats the course does not decode itself go to gguf's dequantizer (random bytes: NaN scales included)."""
    qtype = GGMLQuantizationType[type_name]
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * block_size
    raw = np.random.default_rng(2).integers(0, 256, size=(rows, cols // block_size * block_bytes), dtype=np.uint8)
    got = dequantize(raw, type_name, (rows, cols)).numpy()
    np.testing.assert_array_equal(got, gguf_dequantize(raw, qtype))  # NaN where gguf has NaN counts as equal


@pytest.mark.parametrize("type_name", ["Q8_K", "I32", "Q99"])
def test_unknown_type_is_a_clear_error(type_name):
    with pytest.raises(ValueError, match=f"unsupported GGUF tensor type '{type_name}'.*'Q4_1'.*cannot dequantize"):
        dequantize(np.zeros(10, np.uint8), type_name, (10,))


def test_unpermute_inverts_llama_cpp_permutation():
    heads, half, cols = 3, 4, 5
    w = torch.randn(heads * 2 * half, cols)
    # llama.cpp's converter: rows (head, 2 halves, pair) -> (head, pair, 2)
    permuted = w.reshape(heads, 2, half, cols).transpose(1, 2).reshape(w.shape)
    torch.testing.assert_close(unpermute_rope(permuted, heads), w, rtol=0, atol=0)
