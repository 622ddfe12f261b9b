"""Batch-size buckets for CUDA graphs: pick a captured size and pad a decode batch up to it.

Teaches: why a replayed graph needs static shapes, and what a padded row must (not) do. A CUDA graph records a
step's kernel launches once, with their grids, shapes and buffer addresses fixed, and replays all of them with one
call: a decode step of a small model is mostly CPU launch overhead, and replay removes it. Replay can change neither
a shape nor an address, so an engine captures one graph per batch-size *bucket* (vLLM's capture sizes: 1, 2, 4, then
every multiple of 8), copies each step's inputs into that bucket's static buffers, and pads the batch with rows
nobody reads. A padded row still runs every kernel, so each fill value is chosen to be harmless:

    PAD_TOKEN_ID = 0     any valid token id: the embedding has a row for it; its logits are dropped
    PAD_POSITION = 0     any position RoPE's table covers
    PAD_SLOT = -1        write no K/V: the pool's store skips slot -1 (``store_kv_ref`` keeps ``slot_mapping >= 0``,
                         the Triton store kernel tests ``slot >= 0``; vLLM's ``PAD_SLOT_ID`` is -1 too). Slot 0 is
                         offset 0 of block 0, which a real sequence may hold: ``BlockManager`` hands out block 0 first
    PAD_CONTEXT_LEN = 1  attend over one key, slot 0 of block 0 through an all-zero table row (a valid address,
                         whatever it holds). With 0 the row attends over no key at all: the Triton paged decode kernel
                         ends with acc / l_i = 0 / 0 = NaN, torch's SDPA reference returns zeros for an all-masked row,
                         and ``PagedMetadata.build`` refuses it (it needs 1 <= query_len <= context_len)
    block tables         padded to ``max_blocks`` columns and to ``bucket`` rows with block 0: the graph reads a
                         (bucket, max_blocks) table; nothing past a row's context_len is read

Notebook 10 (``10_fast_decoding``) captures a graph per bucket; exercise 10.2 rewrites ``pick_bucket`` and
``pad_decode_batch``.
"""

from __future__ import annotations

PAD_TOKEN_ID = 0
PAD_POSITION = 0
PAD_SLOT = -1
PAD_CONTEXT_LEN = 1


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, then every multiple of 8 up to ``max_num_seqs``, and ``max_num_seqs``
    itself if it is none of them (so every batch the scheduler can form fits one). ``decode_buckets(20)`` is
    [1, 2, 4, 8, 16, 20]."""
    if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
    sizes = [b for b in [1, 2, 4, *range(8, max_num_seqs + 1, 8)] if b <= max_num_seqs]
    return sizes if sizes[-1] == max_num_seqs else sizes + [max_num_seqs]


def pick_bucket(batch_size: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``batch_size`` sequences (bucket >= batch_size): the least padding."""
    fits = [b for b in buckets if b >= batch_size]
    if batch_size < 1 or not fits:
        raise ValueError(f"no bucket for a batch of {batch_size} sequences among {list(buckets)} (need 1 <= "
                         f"batch_size <= {max(buckets, default=0)}): capture a larger bucket or schedule fewer")
    return min(fits)


def pad_decode_batch(
    token_ids: list[int],
    positions: list[int],
    slot_mapping: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    bucket: int,
    max_blocks: int,
) -> tuple[list[int], list[int], list[int], list[int], list[list[int]]]:
    """A decode batch of B sequences (one new token each) padded to ``bucket`` rows for graph replay.

    Returns new lists, the inputs untouched: the B real rows first, unchanged, then ``bucket - B`` pad rows (token
    PAD_TOKEN_ID at PAD_POSITION, slot PAD_SLOT, context PAD_CONTEXT_LEN); every block table, real or pad, is
    ``max_blocks`` long, padded with block 0. Example, bucket 4, max_blocks 3::

        token_ids [7, 9, 4]  positions [5, 2, 7]  slots [1, 10, 19]  context_lens [6, 3, 8]
        block_tables [[3, 0], [2], [1, 4]]
        -> [7, 9, 4, 0]  [5, 2, 7, 0]  [1, 10, 19, -1]  [6, 3, 8, 1]  [[3, 0, 0], [2, 0, 0], [1, 4, 0], [0, 0, 0]]
    """
    B = len(token_ids)
    if not len(positions) == len(slot_mapping) == len(context_lens) == len(block_tables) == B:
        raise ValueError(
            f"one entry per sequence needed: {B} token_ids, {len(positions)} positions, {len(slot_mapping)} slots, "
            f"{len(context_lens)} context_lens, {len(block_tables)} block_tables"
        )
    if B > bucket:
        raise ValueError(f"a batch of {B} sequences does not fit bucket {bucket}: pick a bucket >= {B}")
    if any(len(t) > max_blocks for t in block_tables):
        raise ValueError(f"a block table has {max(len(t) for t in block_tables)} blocks, more than max_blocks="
                         f"{max_blocks}")
    num_pad = bucket - B
    return (
        list(token_ids) + [PAD_TOKEN_ID] * num_pad,
        list(positions) + [PAD_POSITION] * num_pad,
        list(slot_mapping) + [PAD_SLOT] * num_pad,
        list(context_lens) + [PAD_CONTEXT_LEN] * num_pad,
        [list(t) + [0] * (max_blocks - len(t)) for t in block_tables] + [[0] * max_blocks for _ in range(num_pad)],
    )
