"""Chapter 02's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
"""

import pytest
import torch

from minillm import grading
from minillm._triton import HAS_TRITON, tl, triton
from minillm.attention import attention_ref, online_attention, online_softmax_step

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


def masked_attention_top_left(q, k, v, key_padding_mask=None):
    # Wrong: tril(ones(T, S)) aligns the causal mask top-left, so a chunk after cached keys loses the cache.
    T, S = q.shape[2], k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
    return (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.float()).to(q.dtype)


def online_step_without_rescaling_acc(m_i, l_i, acc, s, v):
    # Wrong: rescales the running sum but not the running output when the maximum grows.
    m_new = torch.maximum(m_i, s.amax(-1))
    m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    return m_new, torch.exp(m_i - m_safe) * l_i + p.sum(-1), acc + p @ v


def tiled_attention_no_diagonal_mask(q, k, v, block_m, block_n):
    # Wrong: skips the tiles above the diagonal but forgets the mask inside the diagonal tiles.
    T, S = q.shape[2], k.shape[2]
    o = torch.empty(q.shape)
    for m0 in range(0, T, block_m):
        qt = q[:, :, m0 : m0 + block_m].float() / q.shape[-1] ** 0.5
        m_i = torch.full(qt.shape[:3], float("-inf"))
        l_i, acc = torch.zeros(qt.shape[:3]), torch.zeros(qt.shape)
        for n0 in range(0, min(S, m0 + block_m + S - T), block_n):
            s = qt @ k[:, :, n0 : n0 + block_n].float().transpose(-2, -1)
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v[:, :, n0 : n0 + block_n].float())
        o[:, :, m0 : m0 + block_m] = acc / l_i[..., None]
    return o.to(q.dtype)


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

    def launch_row_softmax(kernel, x):
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        kernel[(x.shape[0],)](y, x, x.stride(0), y.stride(0), x.shape[1], BLOCK_N=triton.next_power_of_2(x.shape[1]))
        return y

    RIGHT_ANSWERS += [
        pytest.param(
            grading.check_softmax_kernel, lambda x: launch_row_softmax(_row_softmax_kernel, x), id="2.4-kernel"
        )
    ]
    WRONG_ANSWERS += [
        pytest.param(
            grading.check_softmax_kernel,
            lambda x: launch_row_softmax(_row_softmax_kernel_zero_tail, x),
            id="2.4-zero-tail",
        )
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
]
WRONG_ANSWERS += [
    pytest.param(grading.check_masked_attention, masked_attention_top_left, id="2.1-top-left-causal"),
    pytest.param(grading.check_online_softmax_step, online_step_without_rescaling_acc, id="2.2-acc-not-rescaled"),
    pytest.param(grading.check_tiled_attention, tiled_attention_no_diagonal_mask, id="2.3-no-diagonal-mask"),
]
