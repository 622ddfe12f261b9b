"""PagedAttention over a PagedKVCache on packed batches (prefill chunks with cached context + decodes) vs plain causal
attention; the pool itself only stores."""

import pytest
import torch

from minillm.attention.reference import attention_ref
from minillm.kvcache.blocks import BlockManager
from minillm.attention.backends import PagedAttention, PagedMetadata
from minillm.kvcache.paged import PagedKVCache

L, H, HKV, D, BS, NB = 2, 6, 2, 16, 4, 40


class Seq:
    """One sequence's full q, k, v per layer, (1, H or Hkv, S, D), as if the model had run over all its tokens."""

    def __init__(self, seq_id: int, length: int, gen: torch.Generator, parent: "Seq | None" = None, shared: int = 0):
        self.seq_id, self.length = seq_id, length
        self.q, self.k, self.v = ([torch.randn(1, h, length, D, generator=gen) for _ in range(L)] for h in (H, HKV, HKV))
        if parent is not None:  # a fork: the first `shared` tokens are the parent's
            for x, px in ((self.q, parent.q), (self.k, parent.k), (self.v, parent.v)):
                for layer in range(L):
                    x[layer][:, :, :shared] = px[layer][:, :, :shared]
        self.tokens = [seq_id * 1000 + p for p in range(length)]  # distinct ids: no accidental prefix hits
        if parent is not None:
            self.tokens[:shared] = parent.tokens[:shared]


def step(attention: PagedAttention, bm: BlockManager, work: list[tuple[Seq, int, int]]) -> None:
    """Run positions [a, b) of each sequence as one packed batch through every layer; check against plain attention."""
    slots, tables = [], []
    for seq, a, b in work:
        attention.cache.copy_blocks(bm.ensure_capacity(seq.seq_id, b))
        slots += bm.slot_mapping(seq.seq_id, a, b)
        tables.append(bm.block_table(seq.seq_id))
    batch = PagedMetadata.build(slots, [b - a for _, a, b in work], [b for _, _, b in work], tables, BS)
    for layer in range(L):
        pick = lambda x: torch.cat([getattr(s, x)[layer][:, :, a:b] for s, a, b in work], dim=2)  # noqa: E731
        out = attention.forward(layer, pick("q"), pick("k"), pick("v"), batch)  # (1, H, N, D)
        n = 0
        for seq, a, b in work:
            q, k, v = seq.q[layer][:, :, :b], seq.k[layer][:, :, :b], seq.v[layer][:, :, :b]
            expected = attention_ref(q, k, v, causal=True)[:, :, a:b]
            torch.testing.assert_close(out[:, :, n : n + b - a], expected, atol=1e-5, rtol=1e-5)
            n += b - a
    for seq, _, b in work:
        bm.commit(seq.seq_id, seq.tokens, b)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mixed_prefill_chunks_and_decodes(backend):
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(L, NB, BS, HKV, D, torch.float32, "cpu")
    bm = BlockManager(NB, BS)
    attention = PagedAttention(cache, bm, backend)
    a, b, c, d = (Seq(i, n, gen) for i, n in enumerate([13, 22, 11, 5]))
    for seq in (a, b, d):
        bm.allocate_prompt(seq.seq_id, seq.tokens)
    step(attention, bm, [(a, 0, 7), (b, 0, 20), (d, 0, 3)])  # earlier step: prefill chunks, interleaved blocks
    bm.allocate_prompt(c.seq_id, c.tokens)
    # The mix: a prefill chunk over 7 cached tokens, a decode, a fresh prefill, a decode.
    step(attention, bm, [(a, 7, 12), (b, 20, 21), (c, 0, 9), (d, 3, 4)])
    # Decodes first and last, a 2-token chunk in the middle; then a pure decode step.
    step(attention, bm, [(b, 21, 22), (c, 9, 11), (d, 4, 5)])
    step(attention, bm, [(a, 12, 13)])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fork_copy_on_write_and_prefix_hit(backend):
    gen = torch.Generator().manual_seed(1)
    bm = BlockManager(NB, BS)
    attention = PagedAttention(PagedKVCache(L, NB, BS, HKV, D, torch.float32, "cpu"), bm, backend)
    parent = Seq(0, 14, gen)
    bm.allocate_prompt(0, parent.tokens[:10])
    step(attention, bm, [(parent, 0, 10)])
    # Parallel sampling: the child shares all 3 blocks (the last one half full) and then both decode different tokens.
    child = Seq(1, 14, gen, parent=parent, shared=10)
    bm.fork(0, 1)
    assert bm.num_blocks_needed(1, 11) == 1
    step(attention, bm, [(parent, 10, 11), (child, 10, 11)])  # the first writer copies the shared block
    step(attention, bm, [(child, 11, 14), (parent, 11, 12)])
    # A new request with the parent's first 9 tokens finds its 2 full blocks in the prefix cache.
    late = Seq(2, 12, gen, parent=parent, shared=9)
    assert bm.allocate_prompt(2, late.tokens) == 8
    step(attention, bm, [(late, 8, 12)])
    for seq_id in (0, 1, 2):
        bm.free(seq_id)
    assert bm.num_used_blocks == 0


def test_copy_blocks_all_layers():
    cache = PagedKVCache(3, 6, 2, 1, 4, torch.float32, "cpu")
    cache.k_cache.normal_()
    cache.v_cache.normal_()
    before_k, before_v = cache.k_cache.clone(), cache.v_cache.clone()
    cache.copy_blocks([(1, 4), (2, 5)])
    assert torch.equal(cache.k_cache[:, 4], before_k[:, 1]) and torch.equal(cache.v_cache[:, 5], before_v[:, 2])
    assert torch.equal(cache.k_cache[:, :4], before_k[:, :4])
    cache.copy_blocks([])


def test_sizing_helpers():
    assert PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.bfloat16) == 2 * 30 * 16 * 3 * 64 * 2
    assert PagedKVCache.num_blocks_for_memory(10 * 2**20, 30, 16, 3, 64, torch.bfloat16) == 10 * 2**20 // 368640
    cache = PagedKVCache(2, 5, 4, 2, 8, torch.float16, "cpu")
    assert cache.nbytes == 5 * PagedKVCache.bytes_per_block(2, 4, 2, 8, torch.float16)
    assert cache.k_cache[1].shape == (5, 4, 2, 8)


def test_errors():
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache(1, 4, 6, 1, 8)
    with pytest.raises(ValueError, match="sum to"):
        PagedMetadata.build([0, 1], [1], [1], [[0]], 4)
    with pytest.raises(ValueError, match="query_len <= context_len"):
        PagedMetadata.build([0, 1], [2], [1], [[0]], 4)
    attention = PagedAttention(PagedKVCache(1, 4, 4, 2, 8))
    batch = PagedMetadata.build([0], [1], [1], [[0]], 4)
    with pytest.raises(ValueError, match="packed batch"):
        attention.forward(0, torch.zeros(2, 4, 1, 8), torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8), batch)


def test_metadata_pads_tables_and_splits_decodes_from_prefills():
    built = PagedMetadata.build([5, 6, 9], [2, 1], [6, 3], [[1, 0], [2]], 4)
    assert built.block_tables.tolist() == [[1, 0], [2, 0]] and built.cu_seqlens_q.tolist() == [0, 2, 3]
    assert built.num_seqs == 2 and built.plan.decode_rows.tolist() == [1] and built.plan.decode_tokens.tolist() == [2]
    assert built.plan.prefill_tokens.tolist() == [0, 1] and built.plan.prefill_slots.tolist() == [4, 5, 6, 7, 0, 1]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tiny_model_packed_steps_match_full_forward(tiny_model, backend):
    """Two prompts, chunked prefill then packed decodes through the paged cache == the no-cache forward's logits."""
    cfg = tiny_model.config
    cache = PagedKVCache(cfg.num_layers, 16, 4, cfg.num_kv_heads, cfg.head_dim)
    bm = BlockManager(16, 4)
    attention = PagedAttention(cache, bm, backend)
    gen = torch.Generator().manual_seed(0)
    seqs = {0: torch.randint(0, cfg.vocab_size, (13,), generator=gen).tolist(),
            1: torch.randint(0, cfg.vocab_size, (6,), generator=gen).tolist()}
    for seq_id, tokens in seqs.items():
        bm.allocate_prompt(seq_id, tokens)
    # Chunked prefill of seq 0 beside seq 1's prefill, then a chunk beside a decode, then a decode alone.
    schedule = [{0: (0, 7), 1: (0, 5)}, {0: (7, 12), 1: (5, 6)}, {0: (12, 13)}]
    with torch.no_grad():
        full = {i: tiny_model(torch.tensor([t]))[0] for i, t in seqs.items()}  # (S, V) each
        for step in schedule:
            ids, pos, slots, qlens, clens, tables = [], [], [], [], [], []
            for seq_id, (a, b) in step.items():
                cache.copy_blocks(bm.ensure_capacity(seq_id, b))
                ids += seqs[seq_id][a:b]
                pos += range(a, b)
                slots += bm.slot_mapping(seq_id, a, b)
                qlens.append(b - a)
                clens.append(b)
                tables.append(bm.block_table(seq_id))
            batch = PagedMetadata.build(slots, qlens, clens, tables, 4)
            logits = tiny_model(torch.tensor([ids]), torch.tensor([pos]), attention=attention, metadata=batch)[0]
            n = 0
            for seq_id, (a, b) in step.items():
                torch.testing.assert_close(logits[n : n + b - a], full[seq_id][a:b], atol=1e-4, rtol=1e-4)
                n += b - a
                bm.commit(seq_id, seqs[seq_id], b)
