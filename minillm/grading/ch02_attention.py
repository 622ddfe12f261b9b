"""Chapter 2 checks (attention), used by solutions/02_attention.ipynb.

Every check has a plausible wrong answer in tests/test_grading.py that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minillm.grading.framework import (
    assert_close,
    assert_equal,
    assert_shape,
    exercise,
    randn,
)


__all__ = [  # the checks, re-exported by minillm.grading
    "check_masked_attention",
    "check_online_softmax_step",
    "check_tiled_attention",
    "check_softmax_kernel",
]

def check_masked_attention(fn: Callable) -> None:
    """Exercise 2.1. `fn(q, k, v, key_padding_mask=None) -> o`: exact causal attention with a padding mask.

    q (B, H, T, D), k, v (B, H, S, D), T <= S; causal bottom-right aligned (query i sees keys j <= i + S - T);
    key_padding_mask (B, S) bool, True for real keys. Returns o (B, H, T, D) in q's dtype.
    """
    from minillm.attention import attention_ref

    q, k, v = randn(2, 3, 6, 8, seed=20), randn(2, 3, 6, 8, seed=21), randn(2, 3, 6, 8, seed=22)
    q_short = randn(2, 3, 4, 8, seed=23)  # 4 new queries after 2 cached keys
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # row 1: two padding keys at the end
    with exercise("2.1", "causal and padding masks") as ex:
        ex.check("T == S: matches the causal reference", lambda: assert_close(fn(q, k, v), attention_ref(q, k, v)))
        ex.check(
            "T < S: the causal mask is bottom-right aligned (query i sees keys j <= i + S - T)",
            lambda: assert_close(fn(q_short, k, v), attention_ref(q_short, k, v)),
        )
        ex.check(
            "with a key padding mask: matches the reference",
            lambda: assert_close(fn(q, k, v, keep), attention_ref(q, k, v, key_padding_mask=keep)),
        )

        def padded_keys_do_not_matter():
            k2, v2 = k.clone(), v.clone()
            k2[1, :, 4:], v2[1, :, 4:] = 50.0, -50.0
            assert_close(fn(q, k2, v2, keep), fn(q, k, v, keep), what="output after changing padded keys and values")

        ex.check("changing padded keys and values changes nothing", padded_keys_do_not_matter)

        def future_keys_do_not_matter():
            k2, v2 = k.clone(), v.clone()
            k2[:, :, 3:], v2[:, :, 3:] = 7.0, 7.0
            assert_close(fn(q, k2, v2)[:, :, :3], fn(q, k, v)[:, :, :3], what="outputs of queries 0..2")

        ex.check("queries 0..2 ignore keys 3.. (no peeking at the future)", future_keys_do_not_matter)
        ex.check(
            "keeps the input dtype (fp16 in, fp16 out)",
            lambda: assert_equal(fn(q.half(), k.half(), v.half()).dtype, torch.float16, what="output dtype"),
        )


def check_online_softmax_step(fn: Callable) -> None:
    """Exercise 2.2. `fn(m_i, l_i, acc, s, v) -> (m_i, l_i, acc)`: fold one block of scores into the running state.

    m_i, l_i: (R,) running max and sum of exp(s - m_i); acc: (R, D) running sum of exp(s - m_i) v;
    s: (R, BN) the block's scores (-inf where masked); v: (BN, D). Start from m = -inf, l = 0, acc = 0.
    """
    from minillm.attention import online_softmax_step

    s = randn(5, 24, seed=30) * 3
    v = randn(24, 4, seed=31)
    m0, l0, acc0 = torch.full((5,), float("-inf")), torch.zeros(5), torch.zeros(5, 4)

    def run_blocks(scores, block):
        m, l, acc = m0, l0, acc0
        for n0 in range(0, scores.shape[1], block):
            m, l, acc = fn(m, l, acc, scores[:, n0 : n0 + block], v[n0 : n0 + block])
        return m, l, acc

    def first_block():
        m, l, acc = fn(m0, l0, acc0, s[:, :8], v[:8])
        expected = online_softmax_step(m0, l0, acc0, s[:, :8], v[:8])
        for got, want, what in zip((m, l, acc), expected, ("m_i", "l_i", "acc")):
            assert_close(got, want, what=what)

    def rescales_old_sums():
        state = (randn(5, seed=32), randn(5, seed=33).abs() + 1, randn(5, 4, seed=34))
        block = s[:, 8:16] + 4  # larger scores: the max moves and the old sums must be rescaled
        got = fn(*state, block, v[8:16])
        for g, want, what in zip(got, online_softmax_step(*state, block, v[8:16]), ("m_i", "l_i", "acc")):
            assert_close(g, want, what=what)

    def blocks_give_softmax(block):
        m, l, acc = run_blocks(s, block)
        assert_close(acc / l[:, None], torch.softmax(s, -1) @ v, what=f"acc / l_i after blocks of {block}")

    def masked_blocks():
        s2 = s.clone()
        s2[0, :8] = float("-inf")  # row 0: the first block is fully masked
        s2[1, 8:] = float("-inf")  # row 1: the later blocks are fully masked
        m, l, acc = run_blocks(s2, 8)
        assert_close(acc / l[:, None], torch.softmax(s2, -1) @ v, what="acc / l_i with fully masked blocks")

    with exercise("2.2", "the online-softmax update") as ex:
        ex.check("one block from the initial state matches the reference step", first_block)
        ex.check("a larger new maximum rescales l_i and acc by exp(m_old - m_new)", rescales_old_sums)
        ex.check("blocks of 8 give softmax(s) @ v", lambda: blocks_give_softmax(8))
        ex.check("uneven blocks of 5 give softmax(s) @ v", lambda: blocks_give_softmax(5))
        ex.check("fully masked blocks (-inf scores) give no NaN", masked_blocks)


def check_tiled_attention(fn: Callable) -> None:
    """Exercise 2.3. `fn(q, k, v, block_m, block_n) -> o`: causal attention computed tile by tile.

    q (B, H, T, D), k, v (B, H, S, D), T <= S, causal bottom-right aligned, scale 1 / sqrt(D); o in q's dtype.
    """
    from minillm.attention import attention_ref

    def case(T, S, block_m, block_n, seed, dtype=torch.float32):
        q = randn(1, 2, T, 16, seed=seed, dtype=dtype)
        k, v = randn(1, 2, S, 16, seed=seed + 1, dtype=dtype), randn(1, 2, S, 16, seed=seed + 2, dtype=dtype)
        atol = 1e-5 if dtype == torch.float32 else 2e-3
        assert_close(fn(q, k, v, block_m, block_n), attention_ref(q, k, v), atol=atol, rtol=atol)

    with exercise("2.3", "tiled attention with the online softmax") as ex:
        ex.check("T = S = 32, tiles of 8 x 8", lambda: case(32, 32, 8, 8, seed=40))
        ex.check("odd T = S = 29, tiles of 8 x 4 (tails, diagonal tiles)", lambda: case(29, 29, 8, 4, seed=43))
        ex.check("T = 5 < S = 19 (bottom-right causal)", lambda: case(5, 19, 4, 8, seed=46))
        ex.check("T = 1 (one decode query)", lambda: case(1, 13, 16, 4, seed=49))
        ex.check("tiles bigger than the sequence", lambda: case(7, 7, 64, 64, seed=52))
        ex.check("fp16 in, fp16 out", lambda: case(12, 12, 4, 4, seed=55, dtype=torch.float16))


def check_softmax_kernel(fn: Callable) -> None:
    """Exercise 2.4. `fn(x) -> y`: row softmax of a 2-D fp32 tensor by a Triton kernel, one program per row.

    Runs on CUDA when available, else on the CPU in Triton's interpreter, which importing minillm switches on when
    there is no GPU (before the learner's kernel is defined).
    """
    from minillm._triton import triton_available
    from minillm.doctor import triton_status

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available(device):
        raise AssertionError(
            f"Exercise 2.4 (row-softmax kernel): Triton cannot run here: {triton_status(torch.device(device))}. "
            "Triton exists for Linux only (pip install triton); on a CPU, minillm runs kernels in Triton's "
            "interpreter unless TRITON_INTERPRET=0 is set. Or use a GPU runtime."
        )

    def run(x):
        try:
            return fn(x)
        except Exception as e:
            # Triton wraps what a kernel raises (InterpreterError on CPU, CompilationError on GPU): unwrap the stub's.
            if "NotImplementedError" in f"{e!r} {e.__cause__!r}":
                raise NotImplementedError(str(e)) from e
            raise

    def case(x, what):
        assert_close(run(x), torch.softmax(x, dim=-1), atol=1e-6, rtol=1e-4, what=what)

    x = randn(6, 64, seed=60, device=device)
    with exercise("2.4", "a row-softmax kernel in Triton") as ex:
        ex.check("returns a (rows, N) tensor", lambda: assert_shape(run(x), (6, 64), what="softmax(x)"))
        ex.check("N = 64 (a power of two) matches torch.softmax", lambda: case(x, "softmax(x)"))
        x_tail = randn(5, 100, seed=61, device=device)
        ex.check("N = 100 (masked tail) matches torch.softmax", lambda: case(x_tail, "softmax(x), N=100"))
        ex.check("large inputs (x * 40 + 1000) stay finite and exact", lambda: case(x * 40 + 1000, "softmax(40x+1000)"))

        def strided_rows():
            wide = randn(4, 80, seed=62, device=device)
            case(wide[:, :50], "softmax of a (4, 50) view with row stride 80")

        ex.check("rows with a stride bigger than N", strided_rows)

        def masked_scores():
            s = randn(3, 37, seed=63, device=device)
            s[:, 20:] = float("-inf")
            case(s, "softmax(x) with -inf entries")

        ex.check("-inf entries (masked scores) get probability 0", masked_scores)
