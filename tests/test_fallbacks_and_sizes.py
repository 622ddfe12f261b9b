"""No silent fallback on the GPU path, and sizes refused before anything is allocated.

Without a GPU, a CUDA device object still answers the questions asked before any tensor exists (which kernel
"auto" picks, why); the counted fallbacks and size errors are checked with the tiny random model.
"""

import dataclasses

import pytest
import torch

import minillm
from minillm._triton import fallback_counts
from minillm.attention.backends import resolve_kernel, why_not_triton
from minillm.config import ModelConfig
from minillm.doctor import gpu_fallbacks
from minillm.kvcache.contiguous import ContiguousKVCache
from minillm.kvcache.memory import available_bytes
from minillm.kvcache.paged import PagedKVCache
from minillm.model import Transformer


class FakeTokenizer:
    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny_llm(**kw):
    torch.manual_seed(0)
    return minillm.LLM(Transformer(ModelConfig.tiny()).eval(), tokenizer=FakeTokenizer(), **kw)


def test_auto_on_a_gpu_falls_back_only_with_a_reason_and_counts_it():
    before = fallback_counts()
    assert resolve_kernel("auto", "cuda", head_dim=64, dtype=torch.float16) == "triton"
    assert resolve_kernel("auto", "cuda", head_dim=96, dtype=torch.float16) == "reference"  # e.g. a Phi-style head
    assert resolve_kernel("auto", "cuda", head_dim=64, dtype=torch.float64) == "reference"
    counted = fallback_counts() - before
    assert sum(counted.values()) == 2 and any("head_dim 96" in what for what in counted)
    # On a CPU the reference is the plan, not a fallback: nothing counted.
    before = fallback_counts()
    assert resolve_kernel("auto", "cpu", head_dim=96) == "reference" and fallback_counts() == before


def test_an_explicit_triton_choice_that_cannot_run_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match=r"head_dim 96 is not one the flash kernel supports"):
        resolve_kernel("triton", "cpu", head_dim=96)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_kernel("cuda-graphs", "cpu")
    assert why_not_triton("cpu", 64, torch.float32) is None  # here the interpreter runs the kernels


def test_doctor_names_the_expected_gpu_fallback():
    assert "none expected" in gpu_fallbacks(torch.device("cuda"), None, {})
    line = gpu_fallbacks(torch.device("cuda"), "Triton is not installed", {"Int8Linear on a GPU: x": 3})
    assert "torch references: Triton is not installed" in line and "x3" in line


def test_padded_contiguous_batches_are_counted_in_stats():
    llm = tiny_llm(kv_cache="contiguous", attention_backend="triton")
    llm.generate([[5, 6, 7, 8, 9], [5, 6]], minillm.SamplingParams(max_tokens=2, ignore_eos=True))
    stats = llm.stats()
    padded = [n for what, n in stats["kernel_fallbacks"].items() if what.startswith("contiguous attention: padded")]
    assert stats["attention_fallbacks"] > 0 and padded == [stats["attention_fallbacks"]]
    assert tiny_llm(kv_cache="paged").stats()["kernel_fallbacks"] == {}


@pytest.mark.parametrize("max_model_len", [-5, 0, 2.5, 10**9])
def test_max_model_len_outside_the_model_is_refused(max_model_len):
    with pytest.raises(ValueError, match=r"max_model_len must be None or an int in \[1, "):
        tiny_llm(max_model_len=max_model_len)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(num_kv_blocks=0), "num_kv_blocks must be a positive int"),
    (dict(num_kv_blocks=-3), "num_kv_blocks must be a positive int"),
    (dict(block_size=0), "power of two"),
    (dict(block_size=24), "power of two"),
])
def test_bad_pool_sizes_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_llm(**kw)


@pytest.mark.skipif(available_bytes("cpu") is None, reason="this OS does not say how much memory is available")
def test_a_pool_bigger_than_memory_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"paged KV pool of 1000000000000 blocks .* needs .* but cpu has .* available"):
        tiny_llm(num_kv_blocks=10**12)
    with pytest.raises(ValueError, match=r"block_size"):
        tiny_llm(block_size=2**40)  # a power of two, but one block would not fit
    huge = dataclasses.replace(ModelConfig.tiny(), num_layers=10**6)
    with pytest.raises(ValueError, match="contiguous KV cache of 4096 rows x 4096 tokens needs"):
        ContiguousKVCache.for_model(huge, 4096, 4096)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        PagedKVCache(2, 0, 16, 2, 16)
