"""Contiguous KV cache and its engine: cached logits equal uncached ones at every step, left padding changes
nothing, errors are clear, and `LLM(kv_cache="contiguous")` gives the greedy tokens of transformers and of no cache."""

import pytest
import torch

import minillm
from minillm import SamplingParams
from minillm.attention.backends import ContiguousAttention
from minillm.engine.contiguous import ContiguousEngine
from minillm.engine.request import Sequence
from minillm.kvcache.contiguous import ContiguousBatch, ContiguousKVCache, left_pad

ATOL = 1e-4  # fp32; cached and uncached paths sum in different orders (logits are O(1) on the tiny model)


def uncached_last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]))[0, -1]  # (V,)


@pytest.mark.parametrize("prompt_lens", [[7], [5, 2, 9], [1, 4, 4, 3]])
def test_cached_logits_equal_uncached_at_every_step(tiny_model, prompt_lens):
    gen = torch.Generator().manual_seed(sum(prompt_lens))
    seqs = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in prompt_lens]
    num_steps = 6
    ids, batch = left_pad(seqs, pad_token_id=0)
    cache = ContiguousKVCache.for_model(tiny_model.config, len(seqs), max(prompt_lens) + num_steps)
    with torch.no_grad():
        logits = tiny_model(ids, batch.positions, ContiguousAttention(cache), batch)  # (B, P, V)
        for step in range(num_steps + 1):
            for row, s in enumerate(seqs):
                torch.testing.assert_close(logits[row, -1], uncached_last_logits(tiny_model, s), atol=ATOL, rtol=0)
            if step == num_steps:
                break
            next_ids = logits[:, -1].argmax(-1)  # (B,)
            for s, t in zip(seqs, next_ids.tolist()):
                s.append(t)
            batch = batch.next_decode()
            logits = tiny_model(next_ids[:, None], batch.positions, ContiguousAttention(cache), batch)  # (B, 1, V)
    assert cache.lengths == [max(prompt_lens) + num_steps] * tiny_model.config.num_layers


def test_every_prompt_position_matches_uncached(tiny_model):
    seqs = [[9, 8, 7, 6, 5, 4], [3, 4, 5]]
    ids, batch = left_pad(seqs)
    cache = ContiguousKVCache.for_model(tiny_model.config, 2, 6)
    with torch.no_grad():
        logits = tiny_model(ids, batch.positions, ContiguousAttention(cache), batch)
        torch.testing.assert_close(logits[1, 3:], tiny_model(torch.tensor([seqs[1]]))[0], atol=ATOL, rtol=0)


def test_left_pad_positions_and_mask():
    ids, batch = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.start == 0 and batch.num_pads.tolist() == [0, 2]
    assert batch.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.key_padding_mask.tolist() == [[True] * 3, [False, False, True]]
    nxt = batch.next_decode()
    assert nxt.start == 3 and nxt.positions.tolist() == [[3], [1]]
    assert nxt.key_padding_mask.tolist() == [[True] * 4, [False, False, True, True]]
    assert ContiguousBatch.prefill([4, 4]).key_padding_mask is None  # nothing padded: no mask to apply


def test_pad_token_values_do_not_matter(tiny_model):
    seqs = [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad():
        outs = []
        for pad in (0, 200):
            ids, batch = left_pad(seqs, pad_token_id=pad)
            cache = ContiguousKVCache.for_model(tiny_model.config, 2, 4)
            outs.append(tiny_model(ids, batch.positions, ContiguousAttention(cache), batch)[:, -1])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)


def test_clear_errors():
    cache = ContiguousKVCache(num_layers=2, max_batch_size=2, max_len=4, num_kv_heads=2, head_dim=8)
    kv = torch.zeros(2, 2, 3, 8)
    with pytest.raises(ValueError, match="max_len=4"):
        cache.append(0, kv, kv, 0)
        cache.append(0, kv, kv, 3)
    cache.reset()
    with pytest.raises(ValueError, match="batch of 3 sequences does not fit a cache reserved for 2"):
        cache.append(0, torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8), 0)
    with pytest.raises(TypeError, match="cache holds torch.float32"):
        cache.append(0, kv.half(), kv.half(), 0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cache lives on cpu"):
            cache.append(0, kv.cuda(), kv.cuda(), 0)
    with pytest.raises(ValueError, match="an append must start there, not at 2"):
        cache.append(1, kv, kv, 2)
    with pytest.raises(ValueError, match=r"\(B, Hkv=2, T, D=8\)"):
        cache.append(0, torch.zeros(2, 3, 1, 8), torch.zeros(2, 3, 1, 8), 0)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        ContiguousKVCache(2, 2, 0, 2, 8)
    with pytest.raises(ValueError, match="prompt_lens"):
        ContiguousBatch.prefill([3, 0])


def test_truncate_and_reset_rewind_the_cache():
    cache = ContiguousKVCache(num_layers=1, max_batch_size=1, max_len=6, num_kv_heads=1, head_dim=2)
    k = torch.arange(8.0).view(1, 1, 4, 2)
    cache.append(0, k, k, 0)
    cache.truncate(2)
    k_all, _ = cache.append(0, -k[:, :, :1], -k[:, :, :1], 2)
    assert k_all[0, 0, :, 0].tolist() == [0.0, 2.0, -0.0]
    with pytest.raises(ValueError, match="truncate to 0..3"):
        cache.truncate(5)
    cache.reset()
    assert cache.lengths == [0] and cache.nbytes == 2 * 6 * 2 * 4


def _sequences(prompts, params, eos=(2,)):
    return [Sequence(i, str(i), p, params, list(eos), max_model_len=512) for i, p in enumerate(prompts)]


def test_engine_matches_recompute_engine_on_mixed_lengths(tiny_model):
    from minillm.engine.recompute import RecomputeEngine

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [16]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 2, 7, 3)]
    results = []
    for engine in (RecomputeEngine(tiny_model, 8), ContiguousEngine(tiny_model, 3)):
        seqs = [Sequence(i, str(i), p, sp, [2], 512) for i, (p, sp) in enumerate(zip(prompts, params))]
        for s in seqs:
            engine.add(s)
        while engine.has_unfinished():
            engine.step()
        results.append([s.output_token_ids for s in seqs])
    assert results[0] == results[1]
    assert [len(o) for o in results[1]] == [5, 2, 7, 3]


def test_engine_static_batches_and_stats(tiny_model):
    engine = ContiguousEngine(tiny_model, max_num_seqs=2)
    seqs = [Sequence(i, str(i), [5 + i] * (2 + i), SamplingParams(max_tokens=m, ignore_eos=True), [2], 512)
            for i, m in enumerate([1, 4, 2])]
    for s in seqs:
        engine.add(s)
    got = []
    while engine.has_unfinished():
        got.append([s.seq_id for s in engine.step()])
    # Batch 1 = seqs 0, 1: seq 0 finishes at prefill, seq 1 needs 3 more steps (seq 0 idles); batch 2 = seq 2.
    assert got == [[0, 1], [1], [1], [1], [2], [2]]
    stats = engine.stats()
    assert stats["batch_sizes"] == [2, 2, 2, 2, 1, 1] and stats["num_idle_row_steps"] == 3
    # Batch 1 reserves 2 rows x (3 + 4 - 1) columns; batch 2 reserves 1 x (4 + 2 - 1).
    assert stats["kv_reserved_tokens"] == 2 * 6 + 5
    assert stats["kv_used_tokens"] == (2 + 0) + (3 + 3) + (4 + 1)
    assert 0 < stats["kv_waste"] < 1


def test_engine_abort_lets_the_batch_finish(tiny_model):
    engine = ContiguousEngine(tiny_model, max_num_seqs=4)
    seqs = _sequences([[5, 6], [7, 8, 9]], SamplingParams(max_tokens=20, ignore_eos=True))
    for s in seqs:
        engine.add(s)
    engine.step()
    assert [s.seq_id for s in engine.abort("0")] == [0]
    assert [s.seq_id for s in engine.step()] == [1]
    engine.abort("1")
    assert not engine.has_unfinished() and engine.step() == []
    assert [s.finish_reason for s in seqs] == ["aborted", "aborted"]


def test_llm_contiguous_on_tiny_model_equals_none(tiny_model):
    class Tok:
        pad_token_id = None
        eos_token_id = 2

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3)  # seeded sampling: same draws in both engines
    outs = {}
    for kv in ("none", "contiguous"):
        llm = minillm.LLM(tiny_model, tokenizer=Tok(), kv_cache=kv, max_num_seqs=2)
        outs[kv] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["none"] == outs["contiguous"]
    assert llm.stats()["kv_cache"] == "contiguous"

    first = llm.stats()
    llm.generate(prompts, params)  # a second run: stats describe it alone, not both
    second = llm.stats()
    assert second["num_steps"] == first["num_steps"] == len(second["batch_sizes"])
    assert second["kv_reserved_tokens"] == first["kv_reserved_tokens"]
    assert second["kv_used_tokens"] == first["kv_used_tokens"]
