"""Chapter 2 checks (attention), used by solutions/02_attention.ipynb.

Each check runs fixed cases, then fresh random ones (`ex.randn`/`ex.randint`/`ex.rng`): odd sizes and size 1, lengths
around tile boundaries, rows that see only masked keys, and extreme magnitudes (scores near -1e5, fp16 products past
65504). The plausible wrong answers each check must reject are in tests/answers/ch02_attention.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from minillm.grading.framework import (
    assert_close,
    assert_equal,
    assert_shape,
    call_kernel,
    exercise,
    generator,
    randn,
    triton_device,
)

__all__ = [  # the checks, re-exported by minillm.grading
    "check_masked_attention",
    "check_online_softmax_step",
    "check_tiled_attention",
    "check_softmax_kernel",
]

NEG_INF = float("-inf")


class _FixedDraws:
    """The draws of an Exercise's random cases (randn, randint, rng) from a fixed seed, for fixed cases built alike."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self._generator = generator(seed)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self._generator).to(dtype)

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self._generator)


def _separated_qkv(draw, B: int, H: int, T: int, S: int, D: int, sign: int, dtype: torch.dtype):
    """q, k, v (B, H, T|S, D) with huge scores far apart, so that every softmax row is one-hot.

    q_i = a_i u and k_j = sign * b_j u with u in {-1, 1}^D and distinct integers a_i in [200, 400), b_j in
    [200, 2000) (exact in fp16): the scaled score is sign * a_i * b_j * sqrt(D), at least 4e4 in size (past fp16's
    65504 once D >= 4, before or after the 1/sqrt(D) scale), and a query's best key beats the next by at least
    200 * sqrt(D): any summation order gives the same one-hot row. sign = -1 makes every score very negative.
    """
    u = draw.randint(0, 2, B, H, 1, D).float() * 2 - 1
    a = draw.randint(200, 400, B, H, T, 1).float()
    b = torch.tensor([[draw.rng.sample(range(200, 2000), S) for _ in range(H)] for _ in range(B)]).float()
    q = (a * u).to(dtype)  # (B, H, T, D)
    k = (sign * b[..., None] * u).to(dtype)  # (B, H, S, D)
    return q, k, draw.randn(B, H, S, D, dtype=dtype)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-3


def check_masked_attention(fn: Callable) -> None:
    """Exercise 2.1. `fn(q, k, v, key_padding_mask=None) -> o`: exact causal attention with a padding mask.

    q (B, H, T, D), k, v (B, H, S, D), T <= S; causal bottom-right aligned (query i sees keys j <= i + S - T);
    key_padding_mask (B, S) bool, True for real keys. A query that sees no key gets zeros. Returns o in q's dtype.
    """
    from minillm.attention import attention_ref

    q, k, v = randn(2, 3, 6, 8, seed=20), randn(2, 3, 6, 8, seed=21), randn(2, 3, 6, 8, seed=22)
    q_short = randn(2, 3, 4, 8, seed=23)  # 4 new queries after 2 cached keys
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # row 1: two padding keys at the end
    left = torch.tensor([[False] * 3 + [True] * 3, [True] * 6])  # row 0 left-padded: queries 0..2 see only padding

    def case(q, k, v, mask=None, what="output"):
        atol = _tolerance(q.dtype)
        assert_close(fn(q, k, v, mask), attention_ref(q, k, v, key_padding_mask=mask), atol=atol, rtol=atol, what=what)

    def random_mask(B, T, S):
        """Holes anywhere; row 0 left-padded past what its first query may see (so that query sees no key)."""
        mask = ex.randint(0, 4, B, S) > 0
        mask[0, : ex.rng.randint(S - T + 1, S)] = False
        return mask

    with exercise("2.1", "causal and padding masks") as ex:
        ex.check("T == S: matches the causal reference", lambda: case(q, k, v))
        ex.check(
            "T < S: the causal mask is bottom-right aligned (query i sees keys j <= i + S - T)",
            lambda: case(q_short, k, v),
        )
        ex.check("with a key padding mask: matches the reference", lambda: case(q, k, v, keep))

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
        ex.check(
            "a left-padded row: queries that see only padding get zeros (softmax of all -inf is NaN)",
            lambda: case(q, k, v, left, what="output (row 0, queries 0..2 must be 0)"),
        )
        neg_q, neg_k, neg_v = _separated_qkv(_FixedDraws(24), 2, 2, 4, 6, 8, sign=-1, dtype=torch.float32)
        ex.check(
            "every score near -1e5: masked keys must stay out (-inf, not a 'large' negative like -1e4)",
            lambda: case(neg_q, neg_k, neg_v, keep, what="output with scores near -1e5"),
        )
        big_q, big_k, big_v = _separated_qkv(_FixedDraws(25), 2, 2, 5, 6, 8, sign=1, dtype=torch.float16)
        ex.check(
            "fp16 inputs whose q . k passes 65504 (fp16's largest): compute the scores in fp32",
            lambda: case(big_q, big_k, big_v, keep, what="fp16 output with |q . k| > 65504"),
        )

        # Fresh random cases: odd head dims and size 1, T <= S, padding anywhere including whole rows.
        B, H, T = ex.rng.randint(1, 3), ex.rng.randint(1, 3), ex.rng.randint(1, 9)
        S, D = T + ex.rng.choice([0, 0, 1, ex.rng.randint(2, 8)]), ex.rng.choice([1, 2, 3, 5, 8, 16])
        scale = ex.rng.choice([0.5, 1.0, 3.0])
        rq, rk, rv = (ex.randn(B, H, n, D) * scale for n in (T, S, S))
        r_mask = random_mask(B, T, S)
        ex.check(
            f"random case B={B}, H={H}, T={T}, S={S}, D={D}, random padding: matches the reference",
            lambda: case(rq, rk, rv, r_mask),
        )

        cut = ex.rng.randrange(T)  # queries 0..cut must not see keys past cut + S - T, nor padding

        def hidden_keys_do_not_matter():
            hidden = ~r_mask[:, None, :, None].expand(B, H, S, D).clone()
            hidden[:, :, cut + S - T + 1 :] = True
            k2, v2 = rk.masked_fill(hidden, 1e3), rv.masked_fill(hidden, -1e3)
            assert_close(fn(rq, k2, v2, r_mask)[:, :, : cut + 1], fn(rq, rk, rv, r_mask)[:, :, : cut + 1],
                         what=f"outputs of queries 0..{cut} after changing the keys they cannot see")

        ex.check(
            f"random case: queries 0..{cut} ignore future and padded keys set to +-1000", hidden_keys_do_not_matter
        )

        sign, dtype = ex.rng.choice([-1, 1]), ex.rng.choice([torch.float32, torch.float16])
        B, H, T = ex.rng.randint(1, 2), ex.rng.randint(1, 3), ex.rng.randint(1, 7)
        S, D = T + ex.rng.randint(0, 5), ex.rng.choice([4, 8, 16] if dtype == torch.float16 else [1, 3, 4, 7, 16])
        xq, xk, xv = _separated_qkv(ex, B, H, T, S, D, sign, dtype)
        x_mask = random_mask(B, T, S)
        ex.check(
            f"random case: scores near {sign * 1e5:+.0e}, {str(dtype)[6:]}, T={T}, S={S}, D={D}: matches the reference",
            lambda: case(xq, xk, xv, x_mask, what="output with extreme scores"),
        )


def check_online_softmax_step(fn: Callable) -> None:
    """Exercise 2.2. `fn(m_i, l_i, acc, s, v) -> (m_i, l_i, acc)`: fold one block of scores into the running state.

    m_i, l_i: (..., R) running max and sum of exp(s - m_i); acc: (..., R, D) running sum of exp(s - m_i) v;
    s: (..., R, BN) the block's scores (-inf where masked); v: (..., BN, D). Start from m = -inf, l = 0, acc = 0.
    """
    from minillm.attention import online_softmax_step

    s = randn(5, 24, seed=30) * 3
    v = randn(24, 4, seed=31)

    def initial(lead, R, D):
        return torch.full((*lead, R), NEG_INF), torch.zeros(*lead, R), torch.zeros(*lead, R, D)

    def same_state(got, want, what):
        if not isinstance(got, tuple | list) or len(got) != 3:
            raise AssertionError(f"{what}: expected a tuple (m_i, l_i, acc), got {type(got).__name__}")
        for g, w, name in zip(got, want, ("m_i", "l_i", "acc")):
            assert_close(g, w, what=f"{name} {what}")

    def step_matches(state, scores, values, what):
        got = fn(*state, scores, values)
        same_state(got, online_softmax_step(*state, scores, values), what)
        return got

    def fold(scores, values, block, check_steps=False):
        """Fold blocks of `block` keys, optionally checking each step against the reference step from the same state."""
        state = initial(scores.shape[:-2], scores.shape[-2], values.shape[-1])
        for n0 in range(0, scores.shape[-1], block):
            blk, vblk = scores[..., n0 : n0 + block], values[..., n0 : n0 + block, :]
            if check_steps:
                state = step_matches(state, blk, vblk, f"after the block of keys {n0}..{n0 + blk.shape[-1] - 1}")
            else:
                state = fn(*state, blk, vblk)
        return state

    def gives_softmax(scores, values, block, what, check_steps=False):
        m, l, acc = fold(scores, values, block, check_steps)
        assert_close(acc / l[..., None], torch.softmax(scores, -1) @ values, atol=1e-5, rtol=1e-4, what=what)
        assert_close(m, scores.amax(-1), what="m_i after the last block (the max of all scores)")

    def first_block():
        state = initial((), 5, 4)
        step_matches(state, s[:, :8], v[:8], "after one block")

    def rescales_old_sums():
        state = (randn(5, seed=32), randn(5, seed=33).abs() + 1, randn(5, 4, seed=34))
        block = s[:, 8:16] + 4  # larger scores: the max moves and the old sums must be rescaled
        step_matches(state, block, v[8:16], "after one block")

    def masked_blocks():
        s2 = s.clone()
        s2[0, :8] = NEG_INF  # row 0: the first block is fully masked
        s2[1, 8:] = NEG_INF  # row 1: the later blocks are fully masked
        gives_softmax(s2, v, 8, "acc / l_i with fully masked blocks")

    def masked_first_block_state():
        block = s[:, :8].clone()
        block[[0, 3]] = NEG_INF
        step_matches(initial((), 5, 4), block, v[:8], "after a block fully masked in rows 0 and 3")

    def then_very_negative():
        s3 = s.clone()
        s3[0, :8] = NEG_INF  # masked first block, then scores far below 0: m_i must have stayed -inf, not 0
        s3[0, 8:] -= 1000
        s3[1, 8:] -= 1000  # a normal block, then blocks far below its max: the running max must stay
        s3[2, :16] = NEG_INF
        s3[2, 16:] -= 500
        gives_softmax(s3, v, 8, "acc / l_i with very negative scores after masked blocks", check_steps=True)

    def leading_dims():
        s4, v4 = randn(2, 3, 5, 13, seed=35) * 3, randn(2, 3, 13, 4, seed=36)
        gives_softmax(s4, v4, 6, "acc / l_i of (2, 3, 5) rows with (2, 3, 13, 4) values", check_steps=True)

    with exercise("2.2", "the online-softmax update") as ex:
        ex.check("one block from the initial state matches the reference step", first_block)
        ex.check("a larger new maximum rescales l_i and acc by exp(m_old - m_new)", rescales_old_sums)
        ex.check("blocks of 8 give softmax(s) @ v", lambda: gives_softmax(s, v, 8, "acc / l_i after blocks of 8"))
        ex.check("uneven blocks of 5 give softmax(s) @ v", lambda: gives_softmax(s, v, 5, "acc / l_i, blocks of 5"))
        ex.check("fully masked blocks (-inf scores) give no NaN", masked_blocks)
        ex.check("a fully masked block leaves m_i = -inf, l_i = 0, acc = 0", masked_first_block_state)
        ex.check("scores far below 0 or below the running max (after masked blocks): still exact", then_very_negative)
        ex.check("(B, H, rows) states, as tiled attention passes them (use ..., not [:, None])", leading_dims)

        # Fresh random cases: leading dims, odd sizes, uneven last blocks, masked holes and blocks, magnitudes.
        lead = tuple(ex.rng.randint(1, 3) for _ in range(ex.rng.randint(0, 2)))
        R, D, N, BN = ex.rng.randint(1, 6), ex.rng.randint(1, 9), ex.rng.randint(1, 40), ex.rng.randint(1, 12)
        scale = ex.rng.choice([1.0, 3.0, 10.0, 50.0])
        rs = ex.randn(*lead, R, N) * scale
        rs = rs.masked_fill(ex.randint(0, 5, *lead, R, N) == 0, NEG_INF)  # holes
        rs[..., 0, : ex.rng.randint(0, N - 1)] = NEG_INF  # row 0: a masked prefix, whole blocks of it
        rs[..., :, -1] = ex.randn(*lead, R)  # every row has a real key
        rv = ex.randn(*lead, N, D)
        ex.check(
            f"random case: {lead + (R,)} rows, D={D}, {N} keys in blocks of {BN}, scores x{scale:g} with -inf "
            "holes: each step matches the reference step, and acc / l_i is softmax(s) @ v",
            lambda: gives_softmax(rs, rv, BN, "acc / l_i", check_steps=True),
        )

        R, D, BN = ex.rng.randint(2, 6), ex.rng.randint(1, 6), ex.rng.randint(1, 8)
        num_blocks = ex.rng.randint(2, 5)
        ns = ex.randn(R, BN * num_blocks) * 3
        low = ex.randn(R, 1).abs() * 1000 + 200  # rows end far below 0
        masked_rows = ex.rng.randint(1, R - 1)
        for r in range(R):
            first = ex.rng.randint(1, num_blocks - 1) * BN  # blocks before `first`: masked, or normal scores
            ns[r, :first] = NEG_INF if r < masked_rows else ns[r, :first]
            ns[r, first:] -= low[r]
        nv = ex.randn(BN * num_blocks, D)
        ex.check(
            f"random case: {R} rows whose scores drop by 200..3000 after {BN}-key blocks that are fully masked "
            f"(rows 0..{masked_rows - 1}) or normal",
            lambda: gives_softmax(ns, nv, BN, "acc / l_i", check_steps=True),
        )

        R, D, BN = ex.rng.randint(1, 7), ex.rng.randint(1, 7), ex.rng.randint(1, 9)
        m_old = ex.randn(R) * 5
        fresh = ex.randint(0, 4, R) == 0  # rows that have seen no key yet
        state = (m_old.masked_fill(fresh, NEG_INF), (ex.randn(R).abs() * 5 + 1).masked_fill(fresh, 0.0),
                 ex.randn(R, D).masked_fill(fresh[:, None], 0.0))
        shift = torch.tensor([ex.rng.choice([-1000.0, -30.0, 0.0, 4.0, 60.0]) for _ in range(R)])
        block = (m_old + shift)[:, None] + ex.randn(R, BN)
        block = block.masked_fill(ex.randint(0, 4, R, 1) == 0, NEG_INF)  # some rows: the whole block masked
        ex.check(
            f"random case: a state of {R} rows and a block of {BN} far below, near or above each row's max",
            lambda: step_matches(state, block, ex.randn(BN, D), "after one block"),
        )


def check_tiled_attention(fn: Callable) -> None:
    """Exercise 2.3. `fn(q, k, v, block_m, block_n) -> o`: causal attention computed tile by tile.

    q (B, H, T, D), k, v (B, H, S, D), T <= S, causal bottom-right aligned, scale 1 / sqrt(D); fp32 inside, o in q's
    dtype.
    """
    from minillm.attention import attention_ref

    def compare(q, k, v, block_m, block_n, what="output"):
        atol = _tolerance(q.dtype)
        assert_close(fn(q, k, v, block_m, block_n), attention_ref(q, k, v), atol=atol, rtol=atol, what=what)

    def case(T, S, block_m, block_n, seed, dtype=torch.float32):
        q = randn(1, 2, T, 16, seed=seed, dtype=dtype)
        k, v = randn(1, 2, S, 16, seed=seed + 1, dtype=dtype), randn(1, 2, S, 16, seed=seed + 2, dtype=dtype)
        compare(q, k, v, block_m, block_n)

    def random_tiles_and_lengths():
        """(block_m, block_n, T, S): T and S - T at a multiple of the tile or one off it; 1 in 5: tiles > S."""
        if ex.rng.random() < 0.2:
            T = ex.rng.randint(1, 15)
            return ex.rng.choice([16, 64]), ex.rng.choice([16, 64]), T, T + ex.rng.randint(0, 15)
        block_m, block_n = ex.rng.randint(1, 9), ex.rng.randint(1, 9)
        T = max(1, block_m * ex.rng.randint(0, 3) + ex.rng.choice([-1, 0, 1]))
        return block_m, block_n, T, T + max(0, block_n * ex.rng.randint(0, 3) + ex.rng.choice([-1, 0, 1]))

    with exercise("2.3", "tiled attention with the online softmax") as ex:
        ex.check("T = S = 32, tiles of 8 x 8", lambda: case(32, 32, 8, 8, seed=40))
        ex.check("odd T = S = 29, tiles of 8 x 4 (tails, diagonal tiles)", lambda: case(29, 29, 8, 4, seed=43))
        ex.check("T = 5 < S = 19 (bottom-right causal)", lambda: case(5, 19, 4, 8, seed=46))
        ex.check("T = 1 (one decode query)", lambda: case(1, 13, 16, 4, seed=49))
        ex.check("tiles bigger than the sequence", lambda: case(7, 7, 64, 64, seed=52))
        ex.check("fp16 in, fp16 out", lambda: case(12, 12, 4, 4, seed=55, dtype=torch.float16))
        ex.check(
            "T = S = 9, tiles of 5 x 4: row 4 needs key 4, the first key of the second K tile",
            lambda: case(9, 9, 5, 4, seed=58),
        )
        neg = _separated_qkv(_FixedDraws(61), 1, 2, 6, 9, 8, sign=-1, dtype=torch.float32)
        ex.check(
            "every score near -1e5: the running max starts at -inf (from 0, exp(s - 0) underflows to 0)",
            lambda: compare(*neg, 4, 4, what="output with scores near -1e5"),
        )
        big = _separated_qkv(_FixedDraws(62), 1, 2, 6, 9, 8, sign=1, dtype=torch.float16)
        ex.check(
            "fp16 inputs whose q . k passes 65504 (fp16's largest): scores and sums in fp32",
            lambda: compare(*big, 4, 4, what="fp16 output with |q . k| > 65504"),
        )

        # Fresh random cases: lengths at and around tile multiples, tiles of 1 and bigger than the sequence.
        for dtype in (torch.float32, torch.float16):
            block_m, block_n, T, S = random_tiles_and_lengths()
            D = ex.rng.choice([1, 3, 4, 7, 16])
            B, H = ex.rng.randint(1, 2), ex.rng.randint(1, 3)
            qkv = (ex.randn(B, H, n, D, dtype=dtype) for n in (T, S, S))
            ex.check(
                f"random case: {str(dtype)[6:]}, B={B}, H={H}, T={T}, S={S}, D={D}, tiles of {block_m} x {block_n}",
                lambda qkv=tuple(qkv), bm=block_m, bn=block_n: compare(*qkv, bm, bn),
            )

        sign, dtype = ex.rng.choice([-1, 1]), ex.rng.choice([torch.float32, torch.float16])
        block_m, block_n, T, S = random_tiles_and_lengths()
        D = ex.rng.choice([4, 8, 16])
        xqkv = _separated_qkv(ex, 1, ex.rng.randint(1, 2), T, S, D, sign, dtype)
        ex.check(
            f"random case: scores near {sign * 1e5:+.0e}, {str(dtype)[6:]}, T={T}, S={S}, D={D}, tiles of "
            f"{block_m} x {block_n}",
            lambda: compare(*xqkv, block_m, block_n, what="output with extreme scores"),
        )


def check_softmax_kernel(fn: Callable) -> None:
    """Exercise 2.4. `fn(x) -> y`: row softmax of a 2-D fp32 tensor by a Triton kernel, one program per row.

    Runs on CUDA when available, else on the CPU in Triton's interpreter, which importing minillm switches on when
    there is no GPU (before the learner's kernel is defined).
    """

    device = triton_device("Exercise 2.4 (row-softmax kernel)")

    def run(x):
        return call_kernel(fn, x)

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
            s[:, 20:] = NEG_INF
            case(s, "softmax(x) with -inf entries")

        ex.check("-inf entries (masked scores) get probability 0", masked_scores)
        x_low = randn(3, 37, seed=64, device=device) * 40 - 1e5
        ex.check(
            "rows far below 0 (x * 40 - 1e5), N = 37: the masked lanes must be -inf, not a 'large' negative",
            lambda: case(x_low, "softmax(40x - 1e5)"),
        )

        # Fresh random cases: N at and around powers of two (1 included), strided views, magnitudes, -inf holes.
        rows, N = ex.rng.randint(1, 6), max(1, 2 ** ex.rng.randint(0, 7) + ex.rng.choice([-1, 0, 1]))
        scale = ex.rng.choice([1.0, 5.0, 40.0])
        xr = ex.randn(rows, N, device=device) * scale
        ex.check(f"random case: {rows} rows of N = {N}, x * {scale:g}", lambda: case(xr, f"softmax(x), N={N}"))

        rows, N, extra = ex.rng.randint(1, 5), ex.rng.randint(1, 150), ex.rng.randint(1, 9)
        offset, shift = ex.rng.randint(0, extra), ex.rng.choice([-1e5, -1e3, 0.0, 1e3])
        wide = ex.randn(rows, N + extra, device=device) * ex.rng.choice([1.0, 40.0]) + shift
        ex.check(
            f"random case: a ({rows}, {N}) view with row stride {N + extra}, values around {shift:g}",
            lambda: case(wide[:, offset : offset + N], f"softmax of a strided view, N={N}"),
        )

        rows, N = ex.rng.randint(1, 5), ex.rng.randint(2, 130)
        scores = ex.randn(rows, N, device=device) * 5 + ex.rng.choice([-1e5, 0.0, 1e3])
        xm = scores.masked_fill(ex.randint(0, 3, rows, N, device=device) == 0, NEG_INF)
        real = (torch.arange(rows), ex.randint(0, N, rows))
        xm[real] = scores[real]  # every row keeps a real score
        ex.check(
            f"random case: {rows} rows of N = {N} with -inf entries",
            lambda: case(xm, f"softmax(x) with -inf entries, N={N}"),
        )
