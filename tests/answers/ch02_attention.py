"""Chapter 02's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
The worked examples in solutions/02_attention.ipynb are recomputed here with the package's reference.
"""

import math
from pathlib import Path

import pytest
import torch

from minillm import grading
from minillm._triton import HAS_TRITON, tl, triton
from minillm.attention import attention_ref, online_attention, online_softmax_step
from minillm.attention.online import TILE_FULL, TILE_MASKED, TILE_SKIPPED, causal_tile_map
from minillm.course import read_notebook

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "02_attention.ipynb"

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 2.1: causal and padding masks. masked_attention(q, k, v, key_padding_mask=None) -> o
# ---------------------------------------------------------------------------------------------------------------------


def _allowed(T, S, key_padding_mask):
    i, j = torch.arange(T)[:, None], torch.arange(S)[None, :]
    allowed = (j <= i + (S - T))[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]  # (B, 1, T, S)
    return allowed


def masked_attention_top_left(q, k, v, key_padding_mask=None):
    # Wrong: tril(ones(T, S)) aligns the causal mask top-left, so a chunk after cached keys loses the cache.
    T, S = q.shape[2], k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
    return (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.float()).to(q.dtype)


def masked_attention_nan_rows(q, k, v, key_padding_mask=None):
    # Wrong: a query that sees only padding (the first queries of a left-padded row) gets softmax(-inf, ...) = NaN,
    # not zeros; in a model that NaN reaches the next layer's values and 0 * NaN poisons the real rows too.
    allowed = _allowed(q.shape[2], k.shape[2], key_padding_mask)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.float()).to(q.dtype)


def masked_attention_fill_minus_1e4(q, k, v, key_padding_mask=None):
    # Wrong: masks with -1e4 (as old BERT code does) instead of -inf: once real scores are below -1e4 the masked
    # keys win, and a query with no visible key averages the masked ones instead of returning zeros.
    allowed = _allowed(q.shape[2], k.shape[2], key_padding_mask)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores.masked_fill(~allowed, -1e4), -1) @ v.float()).to(q.dtype)


def masked_attention_in_input_dtype(q, k, v, key_padding_mask=None):
    # Wrong: computes the scores in the input dtype: fp16 q . k above 65504 overflows to inf and the softmax to NaN.
    allowed = _allowed(q.shape[2], k.shape[2], key_padding_mask)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return (torch.nan_to_num(probs, nan=0.0) @ v).to(q.dtype)


def masked_attention_pad_after_softmax(q, k, v, key_padding_mask=None):
    # Wrong: applies the causal mask to the scores but zeroes padded keys' probabilities after the softmax, so the
    # remaining probabilities no longer sum to 1.
    T, S = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~_allowed(T, S, None), float("-inf")), -1)
    if key_padding_mask is not None:
        probs = probs * key_padding_mask[:, None, None, :]
    return (probs @ v.float()).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 2.2: the online-softmax update. online_softmax_step(m_i, l_i, acc, s, v) -> (m_i, l_i, acc)
# ---------------------------------------------------------------------------------------------------------------------


def online_step_without_rescaling_acc(m_i, l_i, acc, s, v):
    # Wrong: rescales the running sum but not the running output when the maximum grows.
    m_new = torch.maximum(m_i, s.amax(-1))
    m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[..., None])
    return m_new, torch.exp(m_i - m_safe) * l_i + p.sum(-1), acc + p @ v


def online_step_no_inf_guard(m_i, l_i, acc, s, v):
    # Wrong: no guard for rows that have seen only masked scores: exp(-inf - (-inf)) is NaN.
    m_new = torch.maximum(m_i, s.amax(-1))
    alpha = torch.exp(m_i - m_new)
    p = torch.exp(s - m_new[..., None])
    return m_new, alpha * l_i + p.sum(-1), alpha[..., None] * acc + p @ v


def online_step_returns_safe_max(m_i, l_i, acc, s, v):
    # Wrong: returns the guarded max (0) as the new m_i of a row that has seen only masked scores. The softmax does
    # not care which shift is used, until the next block's scores are all below about -100: exp(s - 0) underflows
    # to 0, l_i stays 0 and acc / l_i is NaN.
    m_new = torch.maximum(m_i, s.amax(-1))
    m_new = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m_i - m_new)
    p = torch.exp(s - m_new[..., None])
    return m_new, alpha * l_i + p.sum(-1), alpha[..., None] * acc + p @ v


def online_step_block_max_only(m_i, l_i, acc, s, v):
    # Wrong: takes the new block's max as the new m_i, forgetting the running max. Consistent as long as blocks have
    # similar scores; a block far below the running max makes alpha = exp(m_old - m_new) overflow to inf.
    m_new = s.amax(-1)
    m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m_i - m_safe)
    p = torch.exp(s - m_safe[..., None])
    return m_new, alpha * l_i + p.sum(-1), alpha[..., None] * acc + p @ v


def online_step_2d_only(m_i, l_i, acc, s, v):
    # Wrong: indexes for (R,) states only (dim=1, [:, None]); tiled attention calls it with (B, H, rows) states.
    m_new = torch.maximum(m_i, s.max(dim=1).values)
    m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m_i - m_safe)
    p = torch.exp(s - m_safe[:, None])
    return m_new, alpha * l_i + p.sum(dim=1), alpha[:, None] * acc + p @ v


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 2.3: tiled attention. tiled_attention(q, k, v, block_m, block_n) -> o
# ---------------------------------------------------------------------------------------------------------------------


def _tiled(q, k, v, block_m, block_n, *, dtype=torch.float32, m_start=float("-inf"), hi=None, mask="absolute",
           num_q_tiles=None):
    """A tiled attention with knobs for the mistakes below; with the defaults it is right."""
    B, H, T, D = q.shape
    S = k.shape[2]
    o = torch.zeros(B, H, T, D, dtype=dtype)
    starts = range(0, T, block_m) if num_q_tiles is None else range(0, num_q_tiles(T, block_m) * block_m, block_m)
    for m0 in starts:
        q_tile = q[:, :, m0 : m0 + block_m].to(dtype) / math.sqrt(D)  # (B, H, BM, D)
        rows = torch.arange(m0, m0 + q_tile.shape[2])
        m_i = torch.full(q_tile.shape[:3], m_start, dtype=dtype)
        l_i = torch.zeros(q_tile.shape[:3], dtype=dtype)
        acc = torch.zeros(q_tile.shape, dtype=dtype)
        end = min(S, m0 + block_m + S - T) if hi is None else hi(m0, block_m, T, S)
        for n0 in range(0, end, block_n):
            s = q_tile @ k[:, :, n0 : n0 + block_n].to(dtype).transpose(-2, -1)  # (B, H, BM, BN)
            cols = torch.arange(n0, n0 + s.shape[-1])
            if mask == "absolute":
                s = s.masked_fill(cols[None, :] > rows[:, None] + (S - T), float("-inf"))
            elif mask == "tile":  # indices inside the tile instead of absolute positions
                s = s.masked_fill((cols - n0)[None, :] > (rows - m0)[:, None], float("-inf"))
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v[:, :, n0 : n0 + block_n].to(dtype))
        o[:, :, m0 : m0 + block_m] = acc / l_i[..., None]
    return o.to(q.dtype)


def tiled_attention_no_diagonal_mask(q, k, v, block_m, block_n):
    # Wrong: skips the tiles above the diagonal but forgets the mask inside the diagonal tiles.
    return _tiled(q, k, v, block_m, block_n, mask=None)


def tiled_attention_in_input_dtype(q, k, v, block_m, block_n):
    # Wrong: keeps fp16 inputs in fp16 for the scores and running sums: q . k above 65504 overflows to inf.
    return _tiled(q, k, v, block_m, block_n, dtype=q.dtype)


def tiled_attention_m_starts_at_zero(q, k, v, block_m, block_n):
    # Wrong: starts the running max at 0 instead of -inf. Fine while some score of a row is above about -100; when
    # all are far below (extreme magnitudes), exp(s - 0) underflows, l_i stays 0 and the row is NaN.
    return _tiled(q, k, v, block_m, block_n, m_start=0.0)


def tiled_attention_skip_off_by_one(q, k, v, block_m, block_n):
    # Wrong: the tile's last row sees keys j <= m0 + block_m - 1 + S - T, but the loop stops before that key, so it
    # drops a K tile whenever that last visible key is the first key of a tile (a length at a block boundary).
    return _tiled(q, k, v, block_m, block_n, hi=lambda m0, bm, T, S: min(S, m0 + bm - 1 + S - T))


def tiled_attention_mask_in_tile_coordinates(q, k, v, block_m, block_n):
    # Wrong: masks with row and column indices inside the tile, so off-diagonal tiles get a triangle cut out too.
    return _tiled(q, k, v, block_m, block_n, mask="tile")


def tiled_attention_drops_partial_q_tile(q, k, v, block_m, block_n):
    # Wrong: T // block_m Q tiles, so the last rows are never computed when T is not a multiple of block_m.
    return _tiled(q, k, v, block_m, block_n, num_q_tiles=lambda T, bm: T // bm)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 2.4: a row-softmax kernel in Triton, launched as the notebook's softmax_triton does.
# ---------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _row_softmax_kernel(out_ptr, x_ptr, stride_xm, stride_om, N, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < N, other=float("-inf"))
        num = tl.exp(x - tl.max(x, 0))
        tl.store(out_ptr + row * stride_om + cols, num / tl.sum(num, 0), mask=cols < N)

    @triton.jit
    def _row_softmax_kernel_zero_tail(out_ptr, x_ptr, stride_xm, stride_om, N, BLOCK_N: tl.constexpr):
        # Wrong: the masked tail loads as 0, not -inf, so exp(0 - max) leaks into every row's sum.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < N, other=0.0)
        num = tl.exp(x - tl.max(x, 0))
        tl.store(out_ptr + row * stride_om + cols, num / tl.sum(num, 0), mask=cols < N)

    @triton.jit
    def _row_softmax_kernel_no_max(out_ptr, x_ptr, stride_xm, stride_om, N, BLOCK_N: tl.constexpr):
        # Wrong: exp(x) without subtracting the row max overflows to inf for scores above about 88.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < N, other=float("-inf"))
        num = tl.exp(x)
        tl.store(out_ptr + row * stride_om + cols, num / tl.sum(num, 0), mask=cols < N)

    @triton.jit
    def _row_softmax_kernel_rows_of_n(out_ptr, x_ptr, stride_xm, stride_om, N, BLOCK_N: tl.constexpr):
        # Wrong: finds row `row` at row * N, ignoring stride_xm: right only while x is contiguous. (A kernel that
        # *stores* with the wrong stride writes past the output's end, which no check can catch safely.)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * N + cols, mask=cols < N, other=float("-inf"))
        num = tl.exp(x - tl.max(x, 0))
        tl.store(out_ptr + row * stride_om + cols, num / tl.sum(num, 0), mask=cols < N)

    @triton.jit
    def _row_softmax_kernel_exp2(out_ptr, x_ptr, stride_xm, stride_om, N, BLOCK_N: tl.constexpr):
        # Wrong: exp2 (as the flash kernel uses) without folding log2(e) into x: a base-2 softmax.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < N, other=float("-inf"))
        num = tl.exp2(x - tl.max(x, 0))
        tl.store(out_ptr + row * stride_om + cols, num / tl.sum(num, 0), mask=cols < N)

    @triton.jit
    def _row_softmax_kernel_tail_minus_1e4(out_ptr, x_ptr, stride_xm, stride_om, N, BLOCK_N: tl.constexpr):
        # Wrong: the masked tail loads as -1e4, "very negative" but finite: a row whose scores are all below -1e4
        # takes its max from the tail, its own entries underflow to 0, and the tail eats the whole sum.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < N, other=-1e4)
        num = tl.exp(x - tl.max(x, 0))
        tl.store(out_ptr + row * stride_om + cols, num / tl.sum(num, 0), mask=cols < N)

    def launch_row_softmax(kernel, x):
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        kernel[(x.shape[0],)](y, x, x.stride(0), y.stride(0), x.shape[1], BLOCK_N=triton.next_power_of_2(x.shape[1]))
        return y

    def _kernel_answer(kernel):
        return lambda x: launch_row_softmax(kernel, x)

    RIGHT_ANSWERS += [pytest.param(grading.check_softmax_kernel, _kernel_answer(_row_softmax_kernel), id="2.4-kernel")]
    WRONG_ANSWERS += [
        pytest.param(grading.check_softmax_kernel, _kernel_answer(kernel), id=f"2.4-{name}")
        for name, kernel in [
            ("zero-tail", _row_softmax_kernel_zero_tail),
            ("no-max-subtraction", _row_softmax_kernel_no_max),
            ("ignores-row-stride", _row_softmax_kernel_rows_of_n),
            ("exp2-without-log2e", _row_softmax_kernel_exp2),
            ("tail-minus-1e4", _row_softmax_kernel_tail_minus_1e4),
        ]
    ]

RIGHT_ANSWERS += [
    pytest.param(
        grading.check_masked_attention,
        lambda q, k, v, key_padding_mask=None: attention_ref(q, k, v, key_padding_mask=key_padding_mask),
        id="2.1-reference",
    ),
    pytest.param(grading.check_online_softmax_step, online_softmax_step, id="2.2-reference"),
    pytest.param(
        grading.check_tiled_attention,
        lambda q, k, v, block_m, block_n: online_attention(q, k, v, block_m=block_m, block_n=block_n),
        id="2.3-reference",
    ),
    pytest.param(grading.check_tiled_attention, _tiled, id="2.3-fp32-tiles"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_masked_attention, masked_attention_top_left, id="2.1-top-left-causal"),
    pytest.param(grading.check_masked_attention, masked_attention_nan_rows, id="2.1-nan-for-queries-without-keys"),
    pytest.param(grading.check_masked_attention, masked_attention_fill_minus_1e4, id="2.1-mask-with-minus-1e4"),
    pytest.param(grading.check_masked_attention, masked_attention_in_input_dtype, id="2.1-scores-in-fp16"),
    pytest.param(grading.check_masked_attention, masked_attention_pad_after_softmax, id="2.1-padding-after-softmax"),
    pytest.param(grading.check_online_softmax_step, online_step_without_rescaling_acc, id="2.2-acc-not-rescaled"),
    pytest.param(grading.check_online_softmax_step, online_step_no_inf_guard, id="2.2-no-inf-guard"),
    pytest.param(grading.check_online_softmax_step, online_step_returns_safe_max, id="2.2-returns-guarded-max"),
    pytest.param(grading.check_online_softmax_step, online_step_block_max_only, id="2.2-forgets-running-max"),
    pytest.param(grading.check_online_softmax_step, online_step_2d_only, id="2.2-2d-indexing-only"),
    pytest.param(grading.check_tiled_attention, tiled_attention_no_diagonal_mask, id="2.3-no-diagonal-mask"),
    pytest.param(grading.check_tiled_attention, tiled_attention_in_input_dtype, id="2.3-fp16-scores"),
    pytest.param(grading.check_tiled_attention, tiled_attention_m_starts_at_zero, id="2.3-max-starts-at-zero"),
    pytest.param(grading.check_tiled_attention, tiled_attention_skip_off_by_one, id="2.3-skip-bound-off-by-one"),
    pytest.param(grading.check_tiled_attention, tiled_attention_mask_in_tile_coordinates, id="2.3-mask-tile-coords"),
    pytest.param(grading.check_tiled_attention, tiled_attention_drops_partial_q_tile, id="2.3-drops-partial-q-tile"),
]


# ---------------------------------------------------------------------------------------------------------------------
# The worked example above each exercise in solutions/02_attention.ipynb, recomputed with the package's reference.
# ---------------------------------------------------------------------------------------------------------------------


def fmt(x, spec=".4f"):
    """A tensor as nested lists with `spec` per number: fmt(torch.tensor([[1, -inf]])) == "[[1.0000, -inf]]"."""
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return "[" + ", ".join(fmt(e, spec) for e in x) + "]"
    value = x.item() if isinstance(x, torch.Tensor) else x
    return str(value) if isinstance(value, bool) else format(value, spec)


def worked_examples():
    """{markdown cell id: the lines its worked example must contain}, each computed here with the reference."""
    t = torch.tensor
    # 2.1: T = 2 queries after S - T = 1 cached key; masks as (1, S) rows; tensors shown without the (B, H) dims.
    q = t([[1.0, 0.0], [0.0, 1.0]])
    k = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    v = t([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    ex21 = [f"q = {fmt(q, 'g')}", f"k = {fmt(k, 'g')}", f"v = {fmt(v, 'g')}"]
    for mask in (None, t([[False, True, True]]), t([[False, False, True]])):
        o = attention_ref(q[None, None], k[None, None], v[None, None], key_padding_mask=mask)[0, 0]
        call = "masked_attention(q, k, v)" if mask is None else f"masked_attention(q, k, v, {fmt(mask)})"
        ex21.append(f"{call} -> {fmt(o)}")

    # 2.2: three rows: a fresh state, a state whose max moves from 1 to 3, a fresh state meeting a fully masked block.
    inf = float("inf")
    m_i, l_i, acc = t([-inf, 1.0, -inf]), t([0.0, 2.0, 0.0]), t([[0.0], [3.0], [0.0]])
    s, v = t([[0.0, 1.0], [3.0, 0.0], [-inf, -inf]]), t([[1.0], [3.0]])
    m_new, l_new, acc_new = online_softmax_step(m_i, l_i, acc, s, v)
    ex22 = [
        f"m_i = {fmt(m_i, 'g')}, l_i = {fmt(l_i, 'g')}, acc = {fmt(acc, 'g')}",
        f"s = {fmt(s, 'g')}, v = {fmt(v, 'g')}",
        f"m_i -> {fmt(m_new)}",
        f"l_i -> {fmt(l_new)}",
        f"acc -> {fmt(acc_new)}",
    ]

    # 2.3: T = 4, S = 5, D = 1, tiles of 2 x 2: which K tiles each Q tile visits, and the output.
    q = t([[1.0], [0.0], [-1.0], [2.0]])
    k = t([[0.0], [1.0], [2.0], [-1.0], [1.0]])
    v = t([[1.0], [2.0], [3.0], [4.0], [5.0]])
    o = online_attention(q[None, None], k[None, None], v[None, None], block_m=2, block_n=2)[0, 0]
    torch.testing.assert_close(o, attention_ref(q[None, None], k[None, None], v[None, None])[0, 0])
    kinds = {TILE_SKIPPED: "skipped", TILE_FULL: "full", TILE_MASKED: "needs the mask"}
    ex23 = [f"q = {fmt(q, 'g')}", f"k = {fmt(k, 'g')}", f"v = {fmt(v, 'g')}"]
    for tm, row in enumerate(causal_tile_map(4, 5, 2, 2)):
        tiles = ", ".join(f"K tile {tn} {kinds[int(kind)]}" for tn, kind in enumerate(row))
        ex23.append(f"Q tile {tm} (queries {2 * tm}-{2 * tm + 1}): {tiles}")
    ex23.append(f"tiled_attention(q, k, v, 2, 2) -> {fmt(o)}")

    # 2.4: N = 3 (BLOCK_N = 4: one masked lane), a row with a -inf score.
    x = t([[1.0, 2.0, 3.0], [0.0, -inf, 0.0]])
    ex24 = [f"x = {fmt(x, 'g')}", f"softmax_triton(x) -> {fmt(torch.softmax(x, dim=-1))}"]
    return {"attn-sol-03": ex21, "attn-sol-06": ex22, "attn-sol-09": ex23, "attn-sol-12": ex24}


def test_ch02_worked_examples_come_from_the_reference():
    cells = {cell.get("id"): cell for cell in read_notebook(SOLUTION).cells}
    for cell_id, lines in worked_examples().items():
        assert cells[cell_id].cell_type == "markdown", cell_id
        for line in lines:
            assert line in cells[cell_id].source, f"cell {cell_id} of {SOLUTION.name} lacks the line {line!r}"
