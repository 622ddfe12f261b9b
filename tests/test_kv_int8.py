"""Int8PagedKVCache: paged attention over the int8 pool matches the fp pool within quantization error; LLM serves it."""

import pytest
import torch

from minillm import LLM, SamplingParams
from minillm.attention.backends import PagedAttention, PagedMetadata
from minillm.kvcache.blocks import BlockManager
from minillm.kvcache.paged import PagedKVCache
from minillm.kvcache.paged_int8 import Int8PagedKVCache
from minillm.quant.kv import dequantize_kv, quantize_kv

L, H, HKV, D, BS, NB = 2, 6, 2, 16, 4, 32


def run_steps(cache, backend, steps, seqs, gen_seed=0):
    """Drive paged attention over a cache through packed steps [(seq_id, a, b), ...] with seeded q, k, v; returns every output."""
    gen = torch.Generator().manual_seed(gen_seed)
    qkv = {s: [[torch.randn(1, h, n, D, generator=gen) for h in (H, HKV, HKV)] for _ in range(L)]
           for s, n in seqs.items()}
    bm = BlockManager(NB, BS, enable_prefix_caching=False)
    for s, n in seqs.items():
        bm.allocate_prompt(s, list(range(s * 1000, s * 1000 + n)))
    attention, outs = PagedAttention(cache, bm, backend), []
    for work in steps:
        slots, tables = [], []
        for s, a, b in work:
            cache.copy_blocks(bm.ensure_capacity(s, b))
            slots += bm.slot_mapping(s, a, b)
            tables.append(bm.block_table(s))
        batch = PagedMetadata.build(slots, [b - a for _, a, b in work], [b for _, _, b in work], tables, BS)
        for layer in range(L):
            q, k, v = (torch.cat([qkv[s][layer][i][:, :, a:b] for s, a, b in work], dim=2) for i in range(3))
            outs.append(attention.forward(layer, q, k, v, batch))
        for s, _, b in work:
            bm.commit(s, list(range(s * 1000, s * 1000 + b)), b)
    return outs


STEPS = [[(0, 0, 9), (1, 0, 6)], [(0, 9, 10), (1, 6, 11), (2, 0, 1)], [(0, 10, 11), (1, 11, 12), (2, 1, 2)]]
SEQS = {0: 11, 1: 12, 2: 2}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_close_to_fp_cache(backend):
    """Prefill chunks, mixed steps and pure decodes: int8 outputs within 0.03 (abs) of the fp32 cache's.

    With N(0, 1) keys and values, absmax/127 per vector gives an error of at most ~0.015 per element; attention
    outputs are weighted means of values, so the tolerance is a few times that.
    """
    fp = run_steps(PagedKVCache(L, NB, BS, HKV, D), backend, STEPS, SEQS)
    q8 = run_steps(Int8PagedKVCache(L, NB, BS, HKV, D), backend, STEPS, SEQS)
    for a, b in zip(fp, q8):
        torch.testing.assert_close(b, a, atol=3e-2, rtol=0)
    assert max((a - b).abs().max().item() for a, b in zip(fp, q8)) > 0  # it really is quantized


def test_stores_codes_and_scales():
    cache = Int8PagedKVCache(1, 4, 4, HKV, D)
    k, v = torch.randn(1, HKV, 3, D), torch.randn(1, HKV, 3, D)
    cache.store(0, k[0].transpose(0, 1), v[0].transpose(0, 1), torch.tensor([4, 5, 6]))  # the start of block 1
    assert cache.k_cache.dtype == torch.int8 and cache.k_scale.dtype == torch.float16
    codes, scale = quantize_kv(k[0].transpose(0, 1))  # (3, Hkv, D)
    assert torch.equal(cache.k_cache[0, 1, :3], codes) and torch.equal(cache.k_scale[0, 1, :3], scale)
    torch.testing.assert_close(dequantize_kv(cache.v_cache[0, 1, :3], cache.v_scale[0, 1, :3]),
                               v[0].transpose(0, 1), atol=v.abs().max().item() / 127, rtol=0)


def test_copy_blocks_and_sizing():
    cache = Int8PagedKVCache(3, 6, 2, 1, 4)
    cache.k_cache.random_(-127, 127)
    cache.k_scale.uniform_()
    cache.copy_blocks([(1, 4)])
    assert torch.equal(cache.k_cache[:, 4], cache.k_cache[:, 1])
    assert torch.equal(cache.k_scale[:, 4], cache.k_scale[:, 1])
    # D int8 codes + one fp16 scale per vector: (64 + 2) bytes vs 2 * 64 in fp16.
    assert Int8PagedKVCache.bytes_per_block(30, 16, 3, 64) == 2 * 30 * 16 * 3 * 66
    assert cache.nbytes == 6 * Int8PagedKVCache.bytes_per_block(3, 2, 1, 4)
    assert Int8PagedKVCache.num_blocks_for_memory(10 * 2**20, 30, 16, 3, 64) == 10 * 2**20 // (2 * 30 * 16 * 3 * 66)
    fp16 = PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.float16)
    assert 1.9 < fp16 / Int8PagedKVCache.bytes_per_block(30, 16, 3, 64) < 2


class Tok:
    """Just enough tokenizer for token-id prompts."""

    eos_token_id, pad_token_id = None, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def test_llm_int8_kv_cache_runs(tiny_model):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    llm = LLM(tiny_model, tokenizer=Tok(), kv_cache_dtype="int8", block_size=4, num_kv_blocks=16)
    assert isinstance(llm.engine.kv_cache, Int8PagedKVCache)
    outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [8, 8]
    assert llm.stats()["kv_cache_bytes"] == 16 * Int8PagedKVCache.bytes_per_block(2, 4, 2, 16)
    fp = LLM(tiny_model, tokenizer=Tok(), block_size=4, num_kv_blocks=16).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in fp]  # this seeded tiny model: same greedy tokens


def test_unknown_kv_cache_dtype(tiny_model):
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8'"):
        LLM(tiny_model, tokenizer=Tok(), kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="needs kv_cache='paged'"):
        LLM(tiny_model, tokenizer=Tok(), kv_cache="contiguous", kv_cache_dtype="int8")
