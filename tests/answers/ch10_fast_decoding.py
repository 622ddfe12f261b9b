"""Chapter 10's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
last tests recompute the worked example above each exercise in the solution notebook with minillm's reference, and
show that the end-to-end part of check 10.2 alone catches a pad row that writes slot 0.
"""

import copy
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

import minillm
from answers.worked_examples import check_worked_examples
from minillm import grading
from minillm._triton import HAS_TRITON, tl, triton
from minillm.fast import buckets
from minillm.fast.buckets import PAD_CONTEXT_LEN, PAD_POSITION, PAD_SLOT, PAD_TOKEN_ID, decode_buckets
from minillm.fast.fused import add_rmsnorm_ref
from minillm.fast.timeline import kernel_gaps, largest_gap
from minillm.fast.traffic import add_rmsnorm_traffic

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


# ---------------------------------------------------------------------------------------------------------------------
# 10.1 the fused add + RMSNorm kernel. Each kernel takes the notebook's arguments plus one meta-parameter VARIANT
# picking the mistake, so every wrong kernel is the right one with one thing changed.
# ---------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:
    # Kernels read globals only as constexpr.
    (RIGHT, FP32_SUM_FIRST, WEIGHT_IN_FP32, NO_H_STORE, NORMALIZE_X, FP16_SQUARES, DIVIDE_BY_BLOCK,
     IGNORE_ROW_STRIDE) = (tl.constexpr(v) for v in range(8))

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr, residual_ptr, weight_ptr, y_ptr, h_ptr,
        C,
        stride_xn, stride_rn, stride_yn, stride_hn,
        eps, BLOCK_C: tl.constexpr, VARIANT: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
        mask = cols < C
        if VARIANT == IGNORE_ROW_STRIDE:  # Wrong: assumes rows follow each other, C elements apart.
            stride_xn = C
            stride_rn = C
        x = tl.load(x_ptr + row * stride_xn + cols, mask=mask, other=0.0)
        r = tl.load(residual_ptr + row * stride_rn + cols, mask=mask, other=0.0)
        if VARIANT == FP32_SUM_FIRST:  # Right too: the sum in fp32, rounded only where it is stored.
            h32 = x.to(tl.float32) + r.to(tl.float32)
            h = h32.to(x.dtype)
        else:
            h = x + r
            h32 = h.to(tl.float32)
        if VARIANT != NO_H_STORE:  # Wrong (when skipped): h, the next layer's residual, is never written.
            tl.store(h_ptr + row * stride_hn + cols, h, mask=mask)
        if VARIANT == NORMALIZE_X:  # Wrong: normalizes x, not x + residual.
            h32 = x.to(tl.float32)
        if VARIANT == FP16_SQUARES:  # Wrong: squares and sums in the activations' dtype (fp16 overflows past 256).
            sum_sq = tl.sum(h * h, axis=0).to(tl.float32)
        else:
            sum_sq = tl.sum(h32 * h32, axis=0)
        if VARIANT == DIVIDE_BY_BLOCK:  # Wrong: the mean over the padded tile, BLOCK_C lanes instead of C.
            rstd = tl.rsqrt(sum_sq / BLOCK_C + eps)
        else:
            rstd = tl.rsqrt(sum_sq / C + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        if VARIANT == WEIGHT_IN_FP32:  # Right too: one rounding at the end instead of two.
            y = (h32 * rstd * w.to(tl.float32)).to(x.dtype)
        else:
            y = (h32 * rstd).to(x.dtype) * w
        tl.store(y_ptr + row * stride_yn + cols, y, mask=mask)

    def add_rmsnorm_triton(x, residual, weight, eps, variant=0):
        """The notebook's launcher, for one of the kernel variants."""
        N, C = x.shape
        y = torch.empty((N, C), device=x.device, dtype=x.dtype)
        h = torch.empty((N, C), device=x.device, dtype=x.dtype)
        _add_rmsnorm_kernel[(N,)](
            x, residual, weight, y, h, C, x.stride(0), residual.stride(0), y.stride(0), h.stride(0), eps,
            BLOCK_C=triton.next_power_of_2(C), VARIANT=variant,
        )
        return y, h

    def _variant(v):
        return lambda x, residual, weight, eps: add_rmsnorm_triton(x, residual, weight, eps, v.value)

    def add_rmsnorm_returns_y_only(x, residual, weight, eps):
        # Wrong: returns y alone; h, computed in the kernel, is lost.
        return add_rmsnorm_triton(x, residual, weight, eps)[0]

    RIGHT_ANSWERS += [
        pytest.param(grading.check_add_rmsnorm_kernel, _variant(RIGHT), id="10.1-kernel"),
        pytest.param(grading.check_add_rmsnorm_kernel, _variant(FP32_SUM_FIRST), id="10.1-kernel-fp32-sum"),
        pytest.param(grading.check_add_rmsnorm_kernel, _variant(WEIGHT_IN_FP32), id="10.1-kernel-weight-in-fp32"),
    ]
    WRONG_ANSWERS += [
        pytest.param(grading.check_add_rmsnorm_kernel, _variant(NO_H_STORE), id="10.1-h-not-stored"),
        pytest.param(grading.check_add_rmsnorm_kernel, add_rmsnorm_returns_y_only, id="10.1-returns-y-only"),
        pytest.param(grading.check_add_rmsnorm_kernel, _variant(NORMALIZE_X), id="10.1-normalizes-x"),
        pytest.param(grading.check_add_rmsnorm_kernel, _variant(FP16_SQUARES), id="10.1-no-fp32-accumulation"),
        pytest.param(grading.check_add_rmsnorm_kernel, _variant(DIVIDE_BY_BLOCK), id="10.1-mean-over-block"),
        pytest.param(grading.check_add_rmsnorm_kernel, _variant(IGNORE_ROW_STRIDE), id="10.1-ignores-row-stride"),
    ]


def add_rmsnorm_torch(x, residual, weight, eps):
    # Wrong: the right numbers, but computed by torch: no Triton kernel ran.
    return add_rmsnorm_ref(x, residual, weight, eps)


WRONG_ANSWERS += [pytest.param(grading.check_add_rmsnorm_kernel, add_rmsnorm_torch, id="10.1-torch-launcher")]


# ---------------------------------------------------------------------------------------------------------------------
# 10.2 the bucket and the padding. The check takes both functions; the stub stands for both.
# ---------------------------------------------------------------------------------------------------------------------


def check_decode_padding(answer):
    """grading.check_decode_padding on a (pick_bucket, pad_decode_batch) pair; a single callable (the stub) is both."""
    pick, pad = answer if isinstance(answer, tuple) else (answer, answer)
    grading.check_decode_padding(pick, pad)


def pick_bucket_right(batch_size, buckets):  # the solution notebook's answer
    fits = [b for b in buckets if b >= batch_size]
    if batch_size < 1 or not fits:
        raise ValueError(f"no bucket holds a batch of {batch_size} among {buckets}")
    return min(fits)


def pad_decode_batch_right(token_ids, positions, slot_mapping, context_lens, block_tables, bucket, max_blocks):
    num_pad = bucket - len(token_ids)
    if num_pad < 0:
        raise ValueError(f"a batch of {len(token_ids)} sequences does not fit bucket {bucket}")
    return (
        token_ids + [PAD_TOKEN_ID] * num_pad,
        positions + [PAD_POSITION] * num_pad,
        slot_mapping + [PAD_SLOT] * num_pad,
        context_lens + [PAD_CONTEXT_LEN] * num_pad,
        [table + [0] * (max_blocks - len(table)) for table in block_tables] + [[0] * max_blocks] * num_pad,
    )


def pick_bucket_largest(batch_size, buckets):
    # Wrong: the largest bucket always fits, and pads a batch of 1 to 20 rows.
    if batch_size < 1 or batch_size > max(buckets):
        raise ValueError(f"no bucket holds a batch of {batch_size} among {buckets}")
    return max(buckets)


def pick_bucket_strictly_larger(batch_size, buckets):
    # Wrong: bucket > batch_size, so a batch of 4 takes bucket 8 (and a batch of 20 finds none).
    fits = [b for b in buckets if b > batch_size]
    if batch_size < 1 or not fits:
        raise ValueError(f"no bucket holds a batch of {batch_size} among {buckets}")
    return min(fits)


def pick_bucket_no_check(batch_size, buckets):
    # Wrong: a batch larger than every bucket gets the largest bucket instead of an error.
    return min([b for b in buckets if b >= batch_size] or [max(buckets)])


def _pad_with(token=PAD_TOKEN_ID, position=PAD_POSITION, slot=PAD_SLOT, context=PAD_CONTEXT_LEN, widen_real=True,
              check=True):
    """A padding function with the fills given: each wrong answer changes one thing."""
    def pad(token_ids, positions, slot_mapping, context_lens, block_tables, bucket, max_blocks):
        num_pad = bucket - len(token_ids)
        if check and num_pad < 0:
            raise ValueError(f"a batch of {len(token_ids)} sequences does not fit bucket {bucket}")
        tables = [t + [0] * (max_blocks - len(t)) if widen_real else list(t) for t in block_tables]
        return (token_ids + [token] * num_pad, positions + [position] * num_pad, slot_mapping + [slot] * num_pad,
                context_lens + [context] * num_pad, tables + [[0] * max_blocks for _ in range(num_pad)])

    return pad


def pad_decode_batch_in_place(token_ids, positions, slot_mapping, context_lens, block_tables, bucket, max_blocks):
    # Wrong: pads the caller's lists in place (the scheduler's own lists grow pad rows).
    num_pad = bucket - len(token_ids)
    if num_pad < 0:
        raise ValueError(f"a batch of {len(token_ids)} sequences does not fit bucket {bucket}")
    token_ids += [PAD_TOKEN_ID] * num_pad
    positions += [PAD_POSITION] * num_pad
    slot_mapping += [PAD_SLOT] * num_pad
    context_lens += [PAD_CONTEXT_LEN] * num_pad
    for table in block_tables:
        table += [0] * (max_blocks - len(table))
    block_tables += [[0] * max_blocks for _ in range(num_pad)]
    return token_ids, positions, slot_mapping, context_lens, block_tables


RIGHT_ANSWERS += [
    pytest.param(check_decode_padding, (pick_bucket_right, pad_decode_batch_right), id="10.2-notebook"),
    pytest.param(check_decode_padding, (buckets.pick_bucket, buckets.pad_decode_batch), id="10.2-reference"),
]
WRONG_ANSWERS += [
    pytest.param(check_decode_padding, (pick_bucket_largest, pad_decode_batch_right), id="10.2-largest-bucket"),
    pytest.param(check_decode_padding, (pick_bucket_strictly_larger, pad_decode_batch_right),
                 id="10.2-bucket-strictly-larger"),
    pytest.param(check_decode_padding, (pick_bucket_no_check, pad_decode_batch_right), id="10.2-no-error-past-max"),
    # Wrong: pad rows write slot 0, block 0's first slot, which sequence 0's first token holds.
    pytest.param(check_decode_padding, (pick_bucket_right, _pad_with(slot=0)), id="10.2-pad-slot-0"),
    # Wrong: pad rows attend over no key: 0/0 = NaN in the Triton decode kernel, refused by PagedMetadata.
    pytest.param(check_decode_padding, (pick_bucket_right, _pad_with(context=0)), id="10.2-pad-context-0"),
    # Wrong: the real rows' tables keep their own widths; the graph reads a (bucket, max_blocks) table.
    pytest.param(check_decode_padding, (pick_bucket_right, _pad_with(widen_real=False)), id="10.2-tables-not-widened"),
    # Wrong: pad rows write slot 1, as 'some small valid slot': a cached token's too.
    pytest.param(check_decode_padding, (pick_bucket_right, _pad_with(slot=1)), id="10.2-pad-slot-1"),
    pytest.param(check_decode_padding, (pick_bucket_right, pad_decode_batch_in_place), id="10.2-pads-in-place"),
    # Wrong: a batch larger than its bucket comes back unpadded and too long, no error.
    pytest.param(check_decode_padding, (pick_bucket_right, _pad_with(check=False)), id="10.2-no-error-too-large"),
]


# ---------------------------------------------------------------------------------------------------------------------
# 10.3 the bytes a fused add + RMSNorm saves.
# ---------------------------------------------------------------------------------------------------------------------


def _traffic(N, C, e, f=4, weight=True, write_h=True, casts_in_fp32=False, weight_per_token=False):
    """The count with one thing changed: f the bytes of an intermediate, the weight read or not, h written or not."""
    w = (N * C * e if weight_per_token else C * e) if weight else 0
    casts = 2 * (N * C * e + N * C * f) if e != 4 or casts_in_fp32 else 0
    unfused = (3 * N * C * e + casts + 2 * N * C * f + N * C * f + N * f + 2 * N * f + 2 * N * f + 2 * N * C * f
               + N * f + w + 2 * N * C * e)
    fused = 2 * N * C * e + w + (2 if write_h else 1) * N * C * e
    return unfused, fused, unfused - fused


def add_rmsnorm_traffic_right(num_tokens, hidden_size, element_size):  # the solution notebook's answer
    N, C, e, f = num_tokens, hidden_size, element_size, 4
    casts = 2 * (N * C * e + N * C * f) if e != f else 0
    unfused = (3 * N * C * e + casts + 2 * N * C * f + N * C * f + N * f + 2 * N * f + 2 * N * f
               + 2 * N * C * f + N * f + C * e + 2 * N * C * e)
    fused = 2 * N * C * e + C * e + 2 * N * C * e
    return unfused, fused, unfused - fused


def traffic_no_weight(N, C, e):
    # Wrong: forgets that the last mul (and the fused kernel) read the weight.
    return _traffic(N, C, e, weight=False)


def traffic_intermediates_at_e(N, C, e):
    # Wrong: counts the fp32 intermediates at the activations' element size.
    return _traffic(N, C, e, f=e)


def traffic_no_h_write(N, C, e):
    # Wrong: the fused kernel writes only y, as if h were not the next layer's residual.
    return _traffic(N, C, e, write_h=False)


def traffic_casts_in_fp32(N, C, e):
    # Wrong: counts .float() and .to(dtype) as copies in fp32 too, where they return the tensor itself.
    return _traffic(N, C, e, casts_in_fp32=True)


def traffic_weight_per_token(N, C, e):
    # Wrong: reads the weight once per token instead of once per kernel.
    return _traffic(N, C, e, weight_per_token=True)


def traffic_saved_backwards(N, C, e):
    # Wrong: saved = fused - unfused.
    unfused, fused, _ = add_rmsnorm_traffic(N, C, e)
    return unfused, fused, fused - unfused


RIGHT_ANSWERS += [
    pytest.param(grading.check_add_rmsnorm_traffic, add_rmsnorm_traffic_right, id="10.3-notebook"),
    pytest.param(grading.check_add_rmsnorm_traffic, add_rmsnorm_traffic, id="10.3-reference"),
    pytest.param(grading.check_add_rmsnorm_traffic, lambda N, C, e: _traffic(N, C, e), id="10.3-table"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_add_rmsnorm_traffic, traffic_no_weight, id="10.3-no-weight-read"),
    pytest.param(grading.check_add_rmsnorm_traffic, traffic_intermediates_at_e, id="10.3-fp32-at-element-size"),
    pytest.param(grading.check_add_rmsnorm_traffic, traffic_no_h_write, id="10.3-no-h-write"),
    pytest.param(grading.check_add_rmsnorm_traffic, traffic_casts_in_fp32, id="10.3-casts-in-fp32"),
    pytest.param(grading.check_add_rmsnorm_traffic, traffic_weight_per_token, id="10.3-weight-per-token"),
    pytest.param(grading.check_add_rmsnorm_traffic, traffic_saved_backwards, id="10.3-saved-backwards"),
]


# ---------------------------------------------------------------------------------------------------------------------
# 10.4 the largest gap in a kernel timeline.
# ---------------------------------------------------------------------------------------------------------------------


def _check_columns(events):
    missing = {"name", "start_us", "dur_us"} - set(events.columns)
    if missing or len(events) < 2:
        raise ValueError(f"need >= 2 kernels with columns name, start_us, dur_us; got {len(events)} rows, missing "
                         f"{sorted(missing)}")


def largest_gap_right(events):  # the solution notebook's answer
    _check_columns(events)
    ordered = events.sort_values("start_us", kind="stable")
    best, latest_name, latest_end = None, None, float("-inf")
    for name, start, dur in zip(ordered["name"], ordered["start_us"], ordered["dur_us"]):
        if latest_name is not None:
            gap = max(0.0, start - latest_end)
            if best is None or gap > best[2]:
                best = (latest_name, name, float(gap))
        if start + dur > latest_end:
            latest_name, latest_end = name, start + dur
    return best


def largest_gap_vectorized(events):  # right too: pandas all the way
    _check_columns(events)
    ev = events.sort_values("start_us", kind="stable").reset_index(drop=True)
    end = ev["start_us"] + ev["dur_us"]
    latest = end.cummax()  # the latest end so far, this row included
    takes_over = end > latest.shift().fillna(float("-inf"))  # the first row to reach a new latest end
    holder = ev["name"].where(takes_over).ffill()
    gap = (ev["start_us"] - latest.shift()).clip(lower=0.0)
    i = int(gap.iloc[1:].idxmax())  # the first maximum
    return str(holder.iloc[i - 1]), str(ev["name"].iloc[i]), float(gap.iloc[i])


def _gap_variant(events, sort=True, latest=True, start_to_start=False, clamp=True, shift_pair=False, last_tie=False):
    """largest_gap with one thing changed."""
    _check_columns(events)
    rows = list(zip(events["name"], events["start_us"], events["dur_us"]))
    if sort:
        rows.sort(key=lambda r: r[1])
    best, latest_name, latest_end, prev_start = None, None, float("-inf"), None
    for i, (name, start, dur) in enumerate(rows):
        if latest_name is not None:
            gap = start - (prev_start if start_to_start else latest_end)
            gap = max(0.0, gap) if clamp else gap
            pair = (rows[i][0], rows[i + 1][0]) if shift_pair else (latest_name, name)
            if best is None or gap > best[2] or (last_tie and gap == best[2]):
                best = (*pair, float(gap))
        if not latest or start + dur > latest_end:
            latest_name, latest_end = name, start + dur
        prev_start = start
    return best


def largest_gap_unsorted(events):
    # Wrong: walks the rows in the table's order, as if they were sorted by start.
    return _gap_variant(events, sort=False)


def largest_gap_previous_end(events):
    # Wrong: measures from the previous kernel's end, even when an earlier kernel is still running.
    return _gap_variant(events, latest=False)


def largest_gap_start_to_start(events):
    # Wrong: start to start, counting the kernel's own duration as idle time.
    return _gap_variant(events, start_to_start=True)


def largest_gap_negative(events):
    # Wrong: overlapping kernels give negative gaps instead of 0.
    return _gap_variant(events, clamp=False)


def largest_gap_pair_after(events):
    # Wrong: off by one row: names the kernel after the gap and the one after it.
    return _gap_variant(events, shift_pair=True)


def largest_gap_last_tie(events):
    # Wrong: >= instead of >: the last of equal gaps.
    return _gap_variant(events, last_tie=True)


def largest_gap_adds_a_column(events):
    # Wrong: adds an end column to the caller's table (the profiler's summary then carries it).
    _check_columns(events)
    events["end_us"] = events["start_us"] + events["dur_us"]
    return largest_gap(events)


RIGHT_ANSWERS += [
    pytest.param(grading.check_largest_gap, largest_gap_right, id="10.4-notebook"),
    pytest.param(grading.check_largest_gap, largest_gap, id="10.4-reference"),
    pytest.param(grading.check_largest_gap, largest_gap_vectorized, id="10.4-vectorized"),
    pytest.param(grading.check_largest_gap, _gap_variant, id="10.4-variant-harness"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_largest_gap, largest_gap_unsorted, id="10.4-not-sorted"),
    pytest.param(grading.check_largest_gap, largest_gap_previous_end, id="10.4-previous-end"),
    pytest.param(grading.check_largest_gap, largest_gap_start_to_start, id="10.4-start-to-start"),
    pytest.param(grading.check_largest_gap, largest_gap_negative, id="10.4-negative-gaps"),
    pytest.param(grading.check_largest_gap, largest_gap_pair_after, id="10.4-pair-after"),
    pytest.param(grading.check_largest_gap, largest_gap_last_tie, id="10.4-last-on-ties"),
    pytest.param(grading.check_largest_gap, largest_gap_adds_a_column, id="10.4-changes-the-table"),
]


# ---------------------------------------------------------------------------------------------------------------------
# The worked examples above each exercise, recomputed with minillm's reference; the end-to-end check on its own.
# ---------------------------------------------------------------------------------------------------------------------

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "10_fast_decoding.ipynb"
# The learner's function names, bound to the package's reference for the worked examples.
REFERENCE = {
    "torch": torch,
    "pd": pd,
    "minillm": minillm,
    "add_rmsnorm_triton": add_rmsnorm_ref,
    "decode_buckets": decode_buckets,
    "pick_bucket": buckets.pick_bucket,
    "pad_decode_batch": buckets.pad_decode_batch,
    "add_rmsnorm_traffic": add_rmsnorm_traffic,
    "largest_gap": largest_gap,
    "kernel_gaps": kernel_gaps,
}


def test_worked_examples_are_the_references_output():
    check_worked_examples(SOLUTION, 10, ["10.1", "10.2", "10.3", "10.4"], REFERENCE)


@pytest.mark.parametrize("seed", range(5))
def test_a_pad_row_writing_slot_0_changes_the_pool(seed):
    """The end-to-end part of check 10.2 on its own catches a pad slot of 0, whatever the batch."""
    from minillm.grading.ch10_fast_decoding import changed_slots, decode_logits, decode_scenario

    rng = random.Random(seed)
    model, cache, batch = decode_scenario(rng, rng.randint(1, 5))
    bucket = len(batch["token_ids"]) + rng.randint(1, 3)
    for slot, harmful in ((0, True), (PAD_SLOT, False)):
        padded = _pad_with(slot=slot)(*[list(v) for v in batch.values()], bucket, 8)
        after = copy.deepcopy(cache)
        decode_logits(model, after, *padded)
        written = set(changed_slots(after, cache))
        assert (0 in written) == harmful and written - {0} == set(batch["slot_mapping"])


def test_decode_scenario_puts_a_real_token_in_slot_0():
    """Sequence 0's first token sits in block 0's first slot, and no decode row writes there."""
    from minillm.grading.ch10_fast_decoding import decode_scenario

    for seed in range(10):
        _, cache, batch = decode_scenario(random.Random(seed), 3)
        assert batch["block_tables"][0][0] == 0 and 0 not in batch["slot_mapping"]
        assert cache.k_cache[:, 0, 0].abs().sum() > 0
