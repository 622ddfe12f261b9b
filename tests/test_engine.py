"""PagedEngine end to end: a continuous batch gives every request the tokens it gets alone and without a cache.

Most tests use the tiny random model with token-id prompts (fast); two use the real model against transformers.
"""

import pytest
import torch

import minillm
from minillm import SamplingParams
from minillm.engine.paged import PagedEngine, default_num_kv_blocks


class FakeTokenizer:
    """Just enough tokenizer for token-id prompts: decode shows the ids, eos is 2."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def random_prompts(num, max_len=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (num,), generator=g).tolist()
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def make_llm(model, **kw):
    return minillm.LLM(model, tokenizer=FakeTokenizer(), **kw)


@pytest.fixture
def reference(tiny_model):
    """Each prompt's greedy tokens alone, without a cache."""
    llm = make_llm(tiny_model, kv_cache="none")
    return {tuple(p): llm.generate([p], GREEDY)[0].token_ids for p in random_prompts(8)}


def tokens(outs):
    return [o.token_ids for o in outs]


def test_continuous_batch_equals_each_request_alone(tiny_model, reference):
    prompts = random_prompts(8)
    llm = make_llm(tiny_model, max_num_batched_tokens=64, max_num_seqs=8)
    assert tokens(llm.generate(prompts, GREEDY)) == [reference[tuple(p)] for p in prompts]
    for p in prompts[:2]:
        assert llm.generate([p], GREEDY)[0].token_ids == reference[tuple(p)]
    stats = llm.stats()
    assert stats["kv_cache"] == "paged" and stats["kv_blocks_used"] == 0 and stats["num_preemptions"] == 0
    assert 0.0 <= stats["kv_waste_pct"] < 100.0 and stats["num_steps"] == len(stats["batch_sizes"]) == 10


def test_small_pool_preempts_and_still_gets_every_token_right(tiny_model, reference):
    prompts = random_prompts(8)
    llm = make_llm(tiny_model, block_size=4, num_kv_blocks=16, max_num_batched_tokens=32, max_num_seqs=8)
    assert tokens(llm.generate(prompts, GREEDY)) == [reference[tuple(p)] for p in prompts]
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["kv_blocks_peak"] <= 16 and stats["kv_blocks_used"] == 0
    assert max(stats["tokens_per_step"]) <= 32 and max(stats["batch_sizes"]) <= 8


def test_chunked_prefill_and_static_batching_give_the_same_tokens(tiny_model, reference):
    prompts = random_prompts(8)
    expected = [reference[tuple(p)] for p in prompts]
    chunked = make_llm(tiny_model, max_num_batched_tokens=8, max_num_seqs=4)
    assert tokens(chunked.generate(prompts, GREEDY)) == expected
    assert max(chunked.stats()["tokens_per_step"]) == 8
    unchunked = make_llm(tiny_model)
    unchunked.engine = PagedEngine(tiny_model, max_num_batched_tokens=64, enable_chunked_prefill=False)
    assert tokens(unchunked.generate(prompts, GREEDY)) == expected
    static = make_llm(tiny_model, scheduler="static", max_num_seqs=3)
    assert tokens(static.generate(prompts, GREEDY)) == expected
    assert static.stats()["scheduler"] == "static" and static.stats()["num_steps"] == 3 * (1 + 9)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    prompt = random_prompts(1, seed=7)[0]
    alone = make_llm(tiny_model).generate([prompt], params)[0].token_ids
    others = random_prompts(5, seed=8)
    batch = [SamplingParams(max_tokens=12, temperature=0.8, seed=i) for i in range(5)]
    outs = make_llm(tiny_model, max_num_batched_tokens=16, max_num_seqs=8).generate(others[:2] + [prompt] + others[2:],
                                                                   batch[:2] + [params] + batch[2:])
    assert outs[2].token_ids == alone
    assert make_llm(tiny_model, kv_cache="none").generate([prompt], params)[0].token_ids == alone


def test_prefix_caching_hits_on_shared_prompts_and_changes_nothing(tiny_model):
    system = list(range(10, 70))  # a long shared prefix, as a system prompt would be
    prompts = [system + q for q in random_prompts(4, max_len=10, seed=4)]
    with_cache = make_llm(tiny_model, block_size=8)
    first = with_cache.generate(prompts[:1], GREEDY)
    rest = with_cache.generate(prompts[1:], GREEDY)
    assert with_cache.stats()["prefix_cache_hit_rate"] > 0.5
    without = make_llm(tiny_model, block_size=8, enable_prefix_caching=False)
    assert tokens(without.generate(prompts, GREEDY)) == tokens(first + rest)
    assert without.stats()["prefix_cache_hit_rate"] == 0.0


def test_parallel_sampling_shares_the_prompt_with_copy_on_write(tiny_model):
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=9, n=3)
    prompt = random_prompts(1, max_len=20, seed=5)[0] + [7] * 5  # not a multiple of the block size: COW needed
    llm = make_llm(tiny_model, block_size=4)
    copies = []
    copy_blocks = llm.engine.kv_cache.copy_blocks
    llm.engine.kv_cache.copy_blocks = lambda pairs: (copies.extend(pairs), copy_blocks(pairs))
    out = llm.generate([prompt], params)[0]
    assert len(out.outputs) == 3 and len(copies) == 2
    assert llm.stats()["tokens_per_step"][0] == len(prompt)  # the prompt was computed once
    none = make_llm(tiny_model, kv_cache="none").generate([prompt], params)[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in none.outputs]
    assert llm.engine.block_manager.num_used_blocks == 0


def test_abort_frees_blocks_and_errors_are_clear(tiny_model):
    llm = make_llm(tiny_model, block_size=4, num_kv_blocks=20)
    seqs = llm.add_request(list(range(3, 30)), SamplingParams(max_tokens=40))
    llm.engine.step()
    assert llm.engine.block_manager.num_used_blocks == 7
    assert llm.abort(seqs[0].request_id) and seqs[0].finish_reason == "aborted"
    assert llm.engine.block_manager.num_used_blocks == 0 and not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="could never run"):
        llm.generate([list(range(3, 60))], SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="power of two"):
        make_llm(tiny_model, block_size=12)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        make_llm(tiny_model, num_kv_blocks=0)


def test_stream_and_default_pool_size(tiny_model):
    llm = make_llm(tiny_model, max_num_seqs=4)
    prompt = random_prompts(1, seed=2)[0]
    streamed = "".join(llm.stream(prompt, GREEDY))
    assert streamed == llm.generate([prompt], GREEDY)[0].text
    # Tiny model: the CPU byte budget would hold far more than 4 sequences at full length could ever use.
    assert default_num_kv_blocks(tiny_model, 16, 4, 512) == 4 * 512 // 16


def test_triton_backend_matches_reference(tiny_model, reference):
    pytest.importorskip("triton")
    prompts = random_prompts(8)[:3]
    llm = make_llm(tiny_model, attention_backend="triton", max_num_batched_tokens=16, max_num_seqs=4)
    assert tokens(llm.generate(prompts, GREEDY)) == [reference[tuple(p)] for p in prompts]



def test_llm_never_changes_the_callers_model(tiny_model):
    weights = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    layer_types = [type(m) for m in tiny_model.modules()]
    quantized = make_llm(tiny_model, quantization="int8")
    assert [type(m) for m in tiny_model.modules()] == layer_types, "quantization must work on a copy"
    assert all(torch.equal(v, weights[k]) for k, v in tiny_model.state_dict().items())
    assert quantized.model is not tiny_model and make_llm(tiny_model).model is tiny_model
    with pytest.raises(ValueError, match=r"dtype='bfloat16' but the model object holds torch.float32"):
        make_llm(tiny_model, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"unsupported device 'meta'"):
        make_llm(tiny_model, device="meta")
    make_llm(tiny_model, device="cpu", dtype="float32")  # confirming where it is is fine
