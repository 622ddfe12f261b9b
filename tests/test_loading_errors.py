"""Bad model files are refused with errors that name the file and the problem; the weight cache survives
copies, corruption and two processes converting at once.

Every broken file is made here, at test time: a copy of the embedded GGUF cut short or with bytes patched, or a tiny
Llama GGUF written with `gguf.GGUFWriter` (a 261-token byte-level vocabulary, so it loads in well under a second).
"""

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.torch import save_file

import minillm
from minillm.loading import embedded_gguf_path, load_tokenizer

C, F, H, HKV, D, L = 64, 256, 4, 2, 16, 2  # tiny model: F = 256 so ffn_down rows hold one K-quant block
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test converts into its own empty cache, never the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MINILLM_CACHE", str(folder))
    return folder


@pytest.fixture
def embedded():
    return embedded_gguf_path("smollm2-135m")


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (a byte-level BPE vocabulary with no merges yet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(unprintable)}
    return [chars[b] for b in range(256)]


def random_k_quant(rows: int, cols: int, qtype: GGMLQuantizationType, rng) -> np.ndarray:
    """Random blocks of a K-quant format with small, finite f16 scales (gguf 0.19 cannot quantize K-quants)."""
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, block_bytes), dtype=np.uint8)
    # Where the f16 scales sit in a block (llama.cpp's block_q4_K: d, dmin first; block_q6_K: d last).
    scales_at = {GGMLQuantizationType.Q4_K: slice(0, 4), GGMLQuantizationType.Q6_K: slice(208, 210)}[qtype]
    num_scales = (scales_at.stop - scales_at.start) // 2
    blocks[:, scales_at] = rng.uniform(1e-3, 1e-2, size=(len(blocks), num_scales)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // block_size * block_bytes)


def write_tiny_gguf(path, seed=0, bad_value=None, k_quants=False):
    """A 2-layer Llama GGUF with F32 weights; `bad_value` goes into blk.1.attn_k.weight, `k_quants` stores the
    ffn_down weights as Q4_K (layer 0) and Q6_K (layer 1) and ffn_up of layer 0 as BF16. Returns the raw tensors."""
    tokens = SPECIAL_TOKENS + byte_alphabet() + ["Ġt", "he"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(L)
    writer.add_context_length(128)
    writer.add_embedding_length(C)
    writer.add_feed_forward_length(F)
    writer.add_head_count(H)
    writer.add_head_count_kv(HKV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))  # 3: control
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (len(tokens), C), "output_norm.weight": (C,)}
    for i in range(L):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (C,), f"blk.{i}.ffn_norm.weight": (C,),
            f"blk.{i}.attn_q.weight": (H * D, C), f"blk.{i}.attn_k.weight": (HKV * D, C),
            f"blk.{i}.attn_v.weight": (HKV * D, C), f"blk.{i}.attn_output.weight": (C, H * D),
            f"blk.{i}.ffn_gate.weight": (F, C), f"blk.{i}.ffn_up.weight": (F, C), f"blk.{i}.ffn_down.weight": (C, F),
        }
    raw = {name: rng.normal(0, 0.05, size=shape).astype(np.float32) for name, shape in shapes.items()}
    if bad_value is not None:
        raw["blk.1.attn_k.weight"][3, 5] = bad_value
    qtypes = {}
    if k_quants:
        qtypes = {"blk.0.ffn_down.weight": GGMLQuantizationType.Q4_K,
                  "blk.1.ffn_down.weight": GGMLQuantizationType.Q6_K}
        raw |= {name: random_k_quant(C, F, qtype, rng) for name, qtype in qtypes.items()}
        qtypes["blk.0.ffn_up.weight"] = GGMLQuantizationType.BF16
        raw["blk.0.ffn_up.weight"] = gguf_quantize(raw["blk.0.ffn_up.weight"], GGMLQuantizationType.BF16)
    for name, data in raw.items():
        writer.add_tensor(name, data, raw_dtype=qtypes.get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw, qtypes


def load(path):
    return minillm.load_model(str(path), device="cpu", dtype=torch.float32, progress=False)


def copy_of(embedded, tmp_path, num_bytes=None):
    data = embedded.read_bytes()
    path = tmp_path / embedded.name
    path.write_bytes(data[:num_bytes])
    return path


@contextlib.contextmanager
def raises_naming(path, match):
    """pytest.raises(ValueError, match=match), and the message must contain the file's full path."""
    with pytest.raises(ValueError, match=match) as info:
        yield info
    assert str(path) in str(info.value), f"the error does not name {path}: {info.value}"


# ---------------------------------------------------------------------------------------------------------------
# GGUF files


@pytest.mark.parametrize("fraction", [0.5, 0.005])  # cut in the tensor data; cut inside the metadata (vocabulary)
def test_truncated_gguf(embedded, tmp_path, fraction):
    path = copy_of(embedded, tmp_path, int(embedded.stat().st_size * fraction))
    with raises_naming(path, r"is truncated: its header describes data up to byte [\d,]+, but it has only"):
        load(path)


@pytest.mark.parametrize("offset, what", [(8, "tensors"), (16, "metadata keys")])
def test_absurd_header_counts(embedded, tmp_path, offset, what):
    path = copy_of(embedded, tmp_path)
    with open(path, "r+b") as f:  # the u64 tensor count sits at byte 8, the key/value count at byte 16
        f.seek(offset)
        f.write(struct.pack("<Q", 2**60))
    with raises_naming(path, f"corrupt header: it claims .*{2**60:,} {what}.* more than a [\\d,]+-byte file"):
        load(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>404 Not Found</html>" * 10)
    with raises_naming(path, "is not a GGUF file: it does not start with the magic bytes"):
        load(path)


def test_missing_metadata_key(embedded, tmp_path):
    path = copy_of(embedded, tmp_path)
    data = path.read_bytes()
    key = b"llama.attention.head_count"
    entry = struct.pack("<Q", len(key)) + key  # length-prefixed, so head_count_kv does not match
    assert data.count(entry) == 1
    path.write_bytes(data.replace(entry, struct.pack("<Q", len(key)) + b"llama.attention.head_cXunt"))
    with raises_naming(path, "lacks the metadata key 'llama.attention.head_count', which a llama model needs"):
        load(path)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_weight_is_named(tmp_path, bad_value):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, bad_value=bad_value)
    with raises_naming(path, "tensor 'blk.1.attn_k.weight' contains NaN or infinite values"):
        load(path)


def test_tiny_gguf_matches_transformers(tmp_path):
    """The synthetic model the other tests use is a real Llama: transformers computes the same logits."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, k_quants=True)
    model, tok = load(path)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok("the tiny model").input_ids])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-5


def test_k_quants_load_through_gguf_dequantizer(tmp_path):
    path = tmp_path / "tiny.gguf"
    raw, qtypes = write_tiny_gguf(path, k_quants=True)
    model, _ = load(path)
    weights = {
        "blk.0.ffn_down.weight": model.layers[0].mlp.down_proj.weight,
        "blk.1.ffn_down.weight": model.layers[1].mlp.down_proj.weight,
        "blk.0.ffn_up.weight": model.layers[0].mlp.up_proj.weight,
    }
    for name, weight in weights.items():
        expected = gguf_dequantize(raw[name], qtypes[name])
        assert weight.shape == expected.shape == ((C, F) if "down" in name else (F, C))
        np.testing.assert_array_equal(weight.detach().numpy(), expected, err_msg=name)
    assert weights["blk.1.ffn_down.weight"].abs().max() > 0  # random blocks decode to something, not zeros


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders


def write_hf_config(folder, **changes):
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 261, "hidden_size": C, "intermediate_size": F,
              "num_hidden_layers": 1, "num_attention_heads": H, "num_key_value_heads": HKV}
    config |= changes
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.mark.parametrize("text, match", [
    ('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,', "is not valid JSON"),
    ("[1, 2, 3]", "must hold a JSON object, not a list"),
    (None, "lacks the field 'hidden_size', which a Llama-family config.json has"),
    ("", "is not valid JSON"),
])
def test_malformed_config_json(tmp_path, text, match):
    write_hf_config(tmp_path, hidden_size=None)
    if text is not None:
        (tmp_path / "config.json").write_text(text)
    with raises_naming(tmp_path / "config.json", match):
        load(tmp_path)


def test_int8_weights_are_refused(tmp_path):
    write_hf_config(tmp_path)
    save_file({"model.embed_tokens.weight": torch.zeros(261, C),
               "model.layers.0.mlp.down_proj.weight": torch.zeros(C, F, dtype=torch.int8)},
              str(tmp_path / "model.safetensors"))
    match = "'model.layers.0.mlp.down_proj.weight' is torch.int8, but minillm loads float32, bfloat16 and float16"
    with raises_naming(tmp_path / "model.safetensors", match):
        load(tmp_path)


def test_truncated_safetensors(tmp_path):
    write_hf_config(tmp_path)
    file = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(261, C)}, str(file))
    file.write_bytes(file.read_bytes()[:-100])
    with raises_naming(file, "is not a readable safetensors file"):
        load(tmp_path)


def test_tokenizer_code_is_never_run(tmp_path):
    """A folder whose tokenizer_config.json points at its own Python class is refused, without a prompt and
    without importing that class."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = tmp_path / "custom"
    load_tokenizer(tmp_path, gguf_file="tiny.gguf").save_pretrained(str(folder))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config |= {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
    config_file.write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass EvilTokenizer: ...\n")
    with raises_naming(config_file, "custom tokenizer class .* never runs code that comes with a model"):
        load_tokenizer(folder)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# The weight cache


def entries(cache):
    return sorted(p.name for p in cache.iterdir())


def test_cache_is_keyed_by_content_not_path(tmp_path, cache):
    first = tmp_path / "a" / "tiny.gguf"
    first.parent.mkdir()
    write_tiny_gguf(first)
    load(first)
    copy = tmp_path / "b" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copy(first, copy)  # a new path and a new modification time, the same content
    os.utime(copy, (1, 1))
    load(copy)
    assert len(entries(cache)) == 1
    other = tmp_path / "c" / "tiny.gguf"
    other.parent.mkdir()
    write_tiny_gguf(other, seed=1)  # same size and header, other weights
    load(other)
    assert len(entries(cache)) == 2


@pytest.mark.parametrize("damage", ["truncate weights", "delete tokenizer", "garble config"])
def test_corrupt_cache_entry_is_rebuilt(tmp_path, cache, damage):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    model, _ = load(path)
    [name] = entries(cache)
    entry = cache / name
    if damage == "truncate weights":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "delete tokenizer":
        (entry / "tokenizer.json").unlink()
    else:
        (entry / "minillm_config.json").write_text("{")
    with pytest.warns(UserWarning, match=f"(?s)weight cache entry {re.escape(str(entry))} is unreadable .* rebuilding"):
        rebuilt, _ = load(path)
    torch.testing.assert_close(rebuilt.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert entries(cache) == [name]  # repaired in place, no leftovers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(path)


# Each process converts and writes its weights, then waits until the other one has written too, so both publish
# their entry at the same moment (with one shared temporary file name, one of them then crashed).
CONCURRENT_LOAD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import minillm.loading as loading
    import minillm.weight_cache as weight_cache

    barrier = Path(sys.argv[2])
    real_save_file = weight_cache.save_file

    def save_file_then_wait(*args, **kwargs):
        real_save_file(*args, **kwargs)
        (barrier / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    weight_cache.save_file = save_file_then_wait
    loading.load_model(sys.argv[1], device="cpu", dtype="float32", progress=False)
""")


@pytest.mark.slow
def test_two_first_loads_at_once_both_succeed(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = os.environ | {"MINILLM_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOAD, str(path), str(barrier)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "weight cache" not in output, output
    assert len(list(barrier.iterdir())) == 2  # both really converted and wrote
    assert len(entries(cache)) == 1  # one entry, no temporary folders left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(path)


@pytest.mark.slow
def test_copy_of_embedded_model_reuses_its_cache_entry(embedded, tmp_path, cache):
    model, _ = minillm.load_model("smollm2-135m", device="cpu", dtype=torch.float32, progress=False)
    copy = copy_of(embedded, tmp_path)
    copied, _ = load(copy)
    assert len(entries(cache)) == 1
    assert torch.equal(copied.embed_tokens.weight, model.embed_tokens.weight)
