"""minillm.fast's small references: graph buckets and pad rows, the bytes of the add + RMSNorm tail, kernel gaps.

Each claim the modules' docstrings make is checked here: the pad values are harmless where they say so (and 0 is
not), the kernel table is the one torch.profiler shows, the gap is measured from the latest end.
"""

import warnings

import pandas as pd
import pytest
import torch

from minillm._triton import triton_available
from minillm.attention.backends import PagedMetadata
from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.fast.buckets import PAD_CONTEXT_LEN, PAD_SLOT, decode_buckets, pad_decode_batch, pick_bucket
from minillm.fast.timeline import kernel_gaps, largest_gap
from minillm.fast.traffic import add_rmsnorm_traffic, fused_bytes, unfused_bytes, unfused_kernels
from minillm.kvcache.store import store_kv_ref
from minillm.model import RMSNorm

# ---- buckets --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_num_seqs, expected",
    [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 4]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8]),
     (9, [1, 2, 4, 8, 9]), (20, [1, 2, 4, 8, 16, 20]), (24, [1, 2, 4, 8, 16, 24])],
)
def test_decode_buckets(max_num_seqs, expected):
    assert decode_buckets(max_num_seqs) == expected


@pytest.mark.parametrize("bad", [0, -3, 2.0])
def test_decode_buckets_rejects(bad):
    with pytest.raises(ValueError, match="max_num_seqs must be an int >= 1"):
        decode_buckets(bad)


def test_pick_bucket_is_the_smallest_that_holds_the_batch():
    buckets = decode_buckets(20)
    assert [pick_bucket(b, buckets) for b in range(1, 21)] == [1, 2, 4, 4] + [8] * 4 + [16] * 8 + [20] * 4
    assert pick_bucket(3, [8, 4, 16]) == 4  # any order
    with pytest.raises(ValueError, match=r"batch of 21 .*\[1, 2, 4, 8, 16, 20\]"):
        pick_bucket(21, buckets)
    with pytest.raises(ValueError, match="batch of 0"):
        pick_bucket(0, buckets)


def test_pad_decode_batch_docstring_example_and_inputs_untouched():
    args = ([7, 9, 4], [5, 2, 7], [1, 10, 19], [6, 3, 8], [[3, 0], [2], [1, 4]])
    copies = [list(map(lambda x: list(x) if isinstance(x, list) else x, a)) for a in args]
    assert pad_decode_batch(*args, bucket=4, max_blocks=3) == (
        [7, 9, 4, 0], [5, 2, 7, 0], [1, 10, 19, -1], [6, 3, 8, 1], [[3, 0, 0], [2, 0, 0], [1, 4, 0], [0, 0, 0]])
    assert list(args) == copies
    assert pad_decode_batch(*args, bucket=3, max_blocks=2)[2] == [1, 10, 19]  # a full bucket: no pad row


def test_pad_decode_batch_rejects():
    args = ([7, 9], [5, 2], [1, 10], [6, 3], [[3, 0], [2]])
    with pytest.raises(ValueError, match="does not fit bucket 1"):
        pad_decode_batch(*args, bucket=1, max_blocks=2)
    with pytest.raises(ValueError, match="more than max_blocks=1"):
        pad_decode_batch(*args, bucket=2, max_blocks=1)
    with pytest.raises(ValueError, match="one entry per sequence"):
        pad_decode_batch([7], *args[1:], bucket=2, max_blocks=2)


def test_pad_slot_writes_nothing():
    k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    store_kv_ref(torch.ones(2, 1, 8), torch.ones(2, 1, 8), k_cache, v_cache, torch.tensor([5, PAD_SLOT]))
    assert k_cache.flatten(0, 1)[5].eq(1).all() and k_cache.flatten(0, 1).abs().sum() == 8


def test_a_context_of_0_is_nan_in_the_kernel_and_refused_by_the_metadata():
    """Why PAD_CONTEXT_LEN is 1: with 0 keys the Triton decode kernel computes 0 / 0."""
    with pytest.raises(ValueError, match="1 <= query_len <= context_len"):
        PagedMetadata.build([3, PAD_SLOT], [1, 1], [5, 0], [[1, 2], [0]], 4)
    q = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(0))
    k, v = (torch.randn(4, 4, 1, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    tables = torch.tensor([[1, 2], [0, 0]], dtype=torch.int32)
    for context, finite in ((0, False), (PAD_CONTEXT_LEN, True)):
        lens = torch.tensor([5, context], dtype=torch.int32)
        assert bool(torch.isfinite(paged_decode_attention_ref(q, k, v, tables, lens)).all())  # SDPA: zeros
        if triton_available("cpu"):
            with warnings.catch_warnings():  # the interpreter's numpy warns about 0 / 0
                warnings.simplefilter("ignore", RuntimeWarning)
                out = paged_decode_attention(q, k, v, tables, lens)
            assert bool(torch.isfinite(out[1]).all()) == finite and bool(torch.isfinite(out[0]).all())


# ---- traffic --------------------------------------------------------------------------------------------------------


def _top_level_ops(dtype):
    """(op name, copies?) for each top-level aten op of x + attn then RMSNorm, as torch.profiler lists them."""
    from torch.profiler import ProfilerActivity, profile

    norm = RMSNorm(4, 1e-6).to(dtype)
    x, attn = torch.randn(2, 4, dtype=dtype), torch.randn(2, 4, dtype=dtype)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        norm(x + attn)
    return [(e.name, any(c.name == "aten::_to_copy" for c in e.cpu_children)) for e in prof.events()
            if e.cpu_parent is None]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_kernel_table_is_what_the_profiler_shows(dtype):
    ops = [name for name, copies in _top_level_ops(dtype) if name != "aten::to" or copies]  # a .to() that copies
    e = torch.tensor([], dtype=dtype).element_size()
    assert ops == [name.split(" ")[0] for name, _, _ in unfused_kernels(3, 5, e)]


def test_traffic_closed_forms():
    for N, C in [(1, 576), (2, 4), (7, 33)]:
        assert unfused_bytes(N, C, 2) == 7 * N * C * 2 + 28 * N * C + 24 * N + 2 * C
        assert unfused_bytes(N, C, 4) == 40 * N * C + 24 * N + 4 * C
        assert fused_bytes(N, C, 2) == 4 * N * C * 2 + 2 * C
    assert add_rmsnorm_traffic(1, 576, 2) == (25368, 5760, 19608)  # the docstring's SmolLM2 numbers
    assert add_rmsnorm_traffic(2, 4, 2) == (392, 72, 320)
    with pytest.raises(ValueError, match="element_size"):
        add_rmsnorm_traffic(1, 4, 8)
    with pytest.raises(ValueError, match="num_tokens"):
        add_rmsnorm_traffic(0, 4, 2)


# ---- timeline -------------------------------------------------------------------------------------------------------


def _events(rows):
    return pd.DataFrame(rows, columns=["name", "start_us", "dur_us"])


def test_largest_gap_is_measured_from_the_latest_end():
    events = _events([("d", 16.0, 1.0), ("a", 0.0, 10.0), ("c", 12.0, 1.0), ("b", 2.0, 3.0)])  # the docstring's
    before = events.copy()
    assert largest_gap(events) == ("c", "d", 3.0)
    gaps = kernel_gaps(events)
    assert list(gaps.columns) == ["before", "after", "idle_from_us", "gap_us"]
    assert gaps.values.tolist() == [["a", "b", 10.0, 0.0], ["a", "c", 10.0, 2.0], ["c", "d", 13.0, 3.0]]
    assert events.equals(before)


def test_overlap_touch_and_ties():
    assert largest_gap(_events([("a", 0.0, 5.0), ("b", 3.0, 4.0), ("c", 6.0, 2.0)])) == ("a", "b", 0.0)
    assert largest_gap(_events([("a", 0.0, 1.0), ("b", 3.0, 1.0), ("c", 4.0, 2.0), ("d", 8.0, 1.0)])) == (
        "a", "b", 2.0)
    # Two kernels ending together: the first keeps the latest end.
    assert kernel_gaps(_events([("a", 0.0, 4.0), ("b", 1.0, 3.0), ("c", 6.0, 1.0)]))["before"].tolist() == ["a", "a"]


def test_timeline_rejects():
    with pytest.raises(ValueError, match="at least 2 kernels"):
        kernel_gaps(_events([("a", 0.0, 1.0)]))
    with pytest.raises(ValueError, match=r"missing \['dur_us'\]"):
        largest_gap(_events([("a", 0.0, 1.0), ("b", 2.0, 1.0)]).drop(columns="dur_us"))
