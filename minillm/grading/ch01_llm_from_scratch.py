"""Chapter 1 checks (an LLM from scratch), used by solutions/01_llm_from_scratch.ipynb.

Each check runs fixed cases (the same on every machine) and fresh random ones drawn from the exercise's seed: odd and
size-1 shapes, degenerate rows (all zero, all equal, mostly -inf), extreme magnitudes (fp16 outliers, confident
logits), a real 49,152-token vocabulary, and the non-contiguous views the model really passes. Every check has
plausible wrong answers in tests/answers/ch01_llm_from_scratch.py that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from minillm.grading.framework import (
    Exercise,
    assert_close,
    assert_equal,
    assert_shape,
    exercise,
    randint,
    randn,
)

__all__ = [  # the checks, re-exported by minillm.grading
    "check_rmsnorm",
    "check_rope",
    "check_repeat_kv",
    "check_top_p",
    "check_swiglu_mlp",
]

REAL_VOCAB = 49_152  # SmolLM2's vocabulary: where float32 sums over the whole vocabulary start to round


def _leading_shape(ex: Exercise) -> tuple[int, ...]:
    """A random batch shape in front of the feature axis: none, a single 1, one odd size, or two sizes."""
    kind = ex.rng.randrange(4)
    if kind == 0:
        return ()
    if kind == 1:
        return (1,)
    if kind == 2:
        return (ex.rng.randrange(2, 8),)
    return (ex.rng.randrange(1, 4), ex.rng.randrange(1, 6))


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from minillm.model import RMSNorm

    norm = RMSNorm(x.shape[-1], eps).to(weight.dtype)
    norm.weight.data = weight
    with torch.no_grad():
        return norm(x)


def check_rmsnorm(fn: Callable) -> None:
    """Exercise 1.1. `fn(x, weight, eps) -> y`: RMSNorm over the last axis, y = weight * x / sqrt(mean(x^2) + eps).

    x (..., C), weight (C,). Normalize in fp32 and return x's dtype times the weight (as ``minillm.model.RMSNorm``).
    """
    x = randn(3, 5, 37, seed=100) * 3 + 0.5  # a non-zero mean: RMSNorm must not subtract it
    w = randn(37, seed=101)
    with exercise("1.1", "RMSNorm") as ex:
        # Fresh cases: any leading shape, an odd (or 1, or SmolLM2's 576) width, rows whose scales span 1e-3..1e3.
        C = ex.rng.choice([1, 576, 2 * ex.rng.randrange(1, 50) + 1])
        lead = _leading_shape(ex)
        scales = 10 ** (ex.randn(*lead, 1) * 1.5)  # (..., 1)
        x_rand = ex.randn(*lead, C) * scales
        w_rand = ex.randn(C)
        eps_rand = ex.rng.choice([1e-6, 1e-5, 1e-2])
        # Degenerate rows: all zero, all one value, tiny, huge.
        C_deg = 2 * ex.rng.randrange(1, 40) + 1
        x_deg = torch.stack([
            torch.zeros(C_deg),
            torch.full((C_deg,), ex.rng.uniform(-5, 5)),
            ex.randn(C_deg) * 1e-4,
            ex.randn(C_deg) * 1e4,
        ])
        w_deg = ex.randn(C_deg)
        eps_deg = ex.rng.choice([1e-6, 1e-5])
        # fp16 activations with outliers of a few hundred to a few thousand (arXiv 2402.17762, "Massive Activations"):
        # their squares overflow fp16 (max 65504) unless the mean of squares is taken in fp32.
        C_half = 2 * ex.rng.randrange(8, 64) + 1
        x_half = ex.randn(6, C_half)
        for row in range(0, 6, 2):
            x_half[row, ex.rng.randrange(C_half)] = ex.rng.choice([-1, 1]) * ex.rng.uniform(300, 3000)
        x_half, w_half = x_half.half(), (1 + 0.1 * ex.randn(C_half)).half()

        ex.check("returns the input's shape", lambda: assert_shape(fn(x, w, 1e-6), x.shape, what="rms_norm(x)"))
        ex.check("matches minillm.model.RMSNorm", lambda: assert_close(fn(x, w, 1e-6), _rms_norm_ref(x, w, 1e-6)))
        ex.check(
            f"random shape {(*lead, C)}, rows scaled 1e-3..1e3, eps = {eps_rand:g}: matches the reference",
            lambda: assert_close(
                fn(x_rand.clone(), w_rand, eps_rand), _rms_norm_ref(x_rand, w_rand, eps_rand), what="rms_norm(x)"
            ),
        )

        def unit_rms():
            y = fn(x.clone(), torch.ones(37), 1e-6)
            assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(3, 5), atol=1e-4, what="RMS of the output (weight 1)")

        ex.check("with weight 1 every row of the output has RMS 1", unit_rms)
        tiny = randn(2, 37, seed=102) * 1e-3
        ex.check(
            "eps sits inside the square root (inputs near zero, eps = 1e-2)",
            lambda: assert_close(fn(tiny.clone(), w, 1e-2), _rms_norm_ref(tiny, w, 1e-2), what="rms_norm(tiny x)"),
        )
        ex.check(
            "degenerate rows (all zero -> zero, all one value, 1e-4 and 1e4 scales): matches the reference",
            lambda: assert_close(
                fn(x_deg.clone(), w_deg, eps_deg), _rms_norm_ref(x_deg, w_deg, eps_deg), what="rms_norm(rows)"
            ),
        )

        def leaves_input_alone():
            x_in = x_rand.clone()
            fn(x_in, w_rand, eps_rand)
            assert_equal(x_in, x_rand, what="x after rms_norm(x) (x.float() is x itself for a float32 x)")

        ex.check("leaves x unchanged (the model still adds it to the residual stream)", leaves_input_alone)
        xh, wh = x.to(torch.bfloat16), w.to(torch.bfloat16)
        ex.check(
            "bf16 in, bf16 out, close to the fp32 result",
            lambda: assert_close(fn(xh, wh, 1e-6), _rms_norm_ref(xh, wh, 1e-6), atol=2e-2, rtol=2e-2),
        )
        ex.check(
            "fp16 rows with outliers of 300..3000 (their squares overflow fp16): mean of squares in fp32",
            lambda: assert_close(
                fn(x_half.clone(), w_half, 1e-5), _rms_norm_ref(x_half, w_half, 1e-5), atol=2e-3, rtol=4e-3,
                what="rms_norm(fp16 x)",
            ),
        )


def check_rope(fn: Callable) -> None:
    """Exercise 1.2. `fn(x, cos, sin) -> x_rotated`: rotary embedding of queries or keys.

    x (B, H, T, D); cos, sin (B, T, D) from ``minillm.model.rope_cos_sin`` (each angle repeated for both halves).
    Pair i is (x_i, x_{i + D/2}), rotated by the angle in cos[..., i], sin[..., i].
    """
    from minillm.model import apply_rope, rope_cos_sin

    def inv_freq_for(D, theta=10000.0):
        return 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # (D/2,)

    D = 16
    inv_freq = inv_freq_for(D)
    positions = randint(0, 100, 2, 7, seed=110)  # (B, T): arbitrary, unsorted positions
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    x = randn(2, 3, 7, D, seed=111)

    with exercise("1.2", "rotary position embedding") as ex:
        # Fresh case: any B, H, T (1 is a decode step), an even head dim from 2 up, positions up to 32k, and x as the
        # model passes it: a transposed, non-contiguous view of (B, T, H, D).
        B, H, T = ex.rng.randrange(1, 4), ex.rng.randrange(1, 5), ex.rng.choice([1, ex.rng.randrange(2, 10)])
        D_rand = ex.rng.choice([2, 6, 10, 64])
        theta = ex.rng.choice([10000.0, 100000.0])
        pos_rand = ex.randint(0, 32768, B, T)
        cos_rand, sin_rand = rope_cos_sin(pos_rand, inv_freq_for(D_rand, theta), torch.float32)
        x_rand = ex.randn(B, T, H, D_rand).transpose(1, 2)  # (B, H, T, D), non-contiguous
        x_bf16 = ex.randn(B, T, H, D_rand).transpose(1, 2).to(torch.bfloat16)
        cos_bf16, sin_bf16 = rope_cos_sin(pos_rand, inv_freq_for(D_rand, theta), torch.bfloat16)
        # Relative positions: q at m + delta and k at m give the same dot product for every m.
        D_rel = ex.rng.choice([2, 8, 16])
        q_rel, k_rel = ex.randn(D_rel), ex.randn(D_rel)
        delta = ex.rng.randrange(0, 50)
        starts = [0] + [ex.rng.randrange(1, 100) for _ in range(3)]

        def rotate_at(vec, pos):
            c, s = rope_cos_sin(torch.tensor([[pos]]), inv_freq_for(vec.shape[-1]), torch.float32)
            return fn(vec[None, None, None].clone(), c, s)[0, 0, 0]

        def relative():
            dots = torch.stack([rotate_at(q_rel, m + delta) @ rotate_at(k_rel, m) for m in starts])
            assert_close(dots, dots[:1].expand(4), atol=1e-3, rtol=1e-4,
                         what=f"q(m + {delta}) . k(m) for m = {', '.join(map(str, starts))} (D = {D_rel})")

        ex.check("returns x's shape", lambda: assert_shape(fn(x.clone(), cos, sin), x.shape, what="apply_rope(x)"))
        ex.check(
            "matches minillm.model.apply_rope (each sequence of the batch at its own positions)",
            lambda: assert_close(fn(x.clone(), cos, sin), apply_rope(x, cos, sin)),
        )
        ex.check(
            f"random (B, H, T, D) = {(B, H, T, D_rand)}, positions up to 32k, x a transposed view: matches the reference",
            lambda: assert_close(fn(x_rand.clone(), cos_rand, sin_rand), apply_rope(x_rand, cos_rand, sin_rand),
                                 what="apply_rope(x)"),
        )
        ex.check(
            "preserves the norm of every head vector (a rotation)",
            lambda: assert_close(fn(x.clone(), cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-4, what="norms"),
        )
        zero = torch.zeros(2, 7, dtype=torch.long)
        c0, s0 = rope_cos_sin(zero, inv_freq, torch.float32)
        ex.check("position 0 is the identity", lambda: assert_close(fn(x.clone(), c0, s0), x, what="apply_rope at 0"))
        ex.check("q . k depends only on the distance between positions", relative)
        ex.check(
            "bf16 in (x, cos, sin), bf16 out, close to the reference",
            lambda: assert_close(fn(x_bf16, cos_bf16, sin_bf16), apply_rope(x_bf16, cos_bf16, sin_bf16),
                                 atol=3e-2, rtol=2e-2, what="apply_rope(bf16 x)"),
        )


def check_repeat_kv(fn: Callable) -> None:
    """Exercise 1.3. `fn(x, n_rep) -> y`: repeat each K/V head n_rep times for grouped-query attention.

    x (B, Hkv, S, D) -> y (B, Hkv * n_rep, S, D), where query head h reads KV head h // n_rep.
    """
    from minillm.attention.reference import repeat_kv

    x = randn(2, 3, 5, 4, seed=120)
    # As the model passes K and V: k_proj(h).view(B, S, Hkv, D).transpose(1, 2), a non-contiguous view.
    x_model = randn(2, 5, 3, 4, seed=121).transpose(1, 2)  # (B, Hkv, S, D)
    with exercise("1.3", "repeat K/V heads for GQA") as ex:
        B, Hkv, S, D = ex.rng.randrange(1, 4), ex.rng.randrange(1, 5), ex.rng.randrange(1, 10), ex.rng.randrange(1, 9)
        n_rep = ex.rng.randrange(1, 6)
        x_rand = ex.randn(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D), non-contiguous

        ex.check("returns (B, Hkv * n_rep, S, D)", lambda: assert_shape(fn(x, 3), (2, 9, 5, 4), what="repeat_kv(x, 3)"))
        ex.check("matches minillm's repeat_kv", lambda: assert_close(fn(x, 3), repeat_kv(x, 3)))

        def groups():
            y = fn(x, 4)
            assert_shape(y, (2, 12, 5, 4), what="repeat_kv(x, 4)")
            for h in range(12):
                assert_equal(y[:, h], x[:, h // 4], what=f"query head {h} must read KV head {h // 4}")

        ex.check("query head h reads KV head h // n_rep (contiguous groups)", groups)
        ex.check("n_rep = 1 changes nothing", lambda: assert_equal(fn(x, 1), x, what="repeat_kv(x, 1)"))
        ex.check(
            "works on K/V as the model passes them (a transposed, non-contiguous view)",
            lambda: assert_equal(fn(x_model, 3), repeat_kv(x_model, 3), what="repeat_kv(transposed x, 3)"),
        )
        ex.check(
            f"random (B, Hkv, S, D) = {(B, Hkv, S, D)}, n_rep = {n_rep}: matches minillm's repeat_kv",
            lambda: assert_equal(fn(x_rand, n_rep), repeat_kv(x_rand, n_rep), what=f"repeat_kv(x, {n_rep})"),
        )


def _assert_nucleus(out, logits: torch.Tensor, p: float, tol: float, what: str = "top_p(logits)") -> None:
    """`out` is `logits` with everything outside a valid nucleus of mass p set to -inf, checked row by row in float64.

    Valid: the kept tokens are the n most likely (any order among equal logits), the n most likely hold >= p and the
    n - 1 most likely < p, both within `tol` of float32 rounding (so only a boundary closer than tol is ambiguous).
    """
    assert_shape(out, logits.shape, what=what)
    assert_equal(out.dtype, logits.dtype, what=f"{what} dtype")
    keep = torch.isfinite(out)
    assert_equal(out[keep], logits[keep], what=f"{what}: the kept logits, unchanged")
    assert_equal(bool((out[~keep] == float("-inf")).all()), True, what=f"{what}: every dropped logit is -inf")
    probs = logits.double().softmax(-1)
    for row in range(logits.shape[0]):
        n = int(keep[row].sum())
        if n == 0:
            raise AssertionError(f"{what}, row {row}: keeps no token; the most likely one always stays")
        if bool(keep[row].all()):
            lowest_kept, highest_dropped = logits[row].min(), torch.tensor(float("-inf"))
        else:
            lowest_kept, highest_dropped = logits[row][keep[row]].min(), logits[row][~keep[row]].max()
        if highest_dropped > lowest_kept:
            raise AssertionError(
                f"{what}, row {row}: drops a token with logit {highest_dropped.item():.4g} but keeps one with "
                f"{lowest_kept.item():.4g}; the kept tokens must be the {n} most likely"
            )
        kept_probs = probs[row][keep[row]]  # the n most likely, as just checked: no sort needed
        mass = kept_probs.sum().item()
        assert mass >= p - tol, (
            f"{what}, row {row}: the {n} kept tokens hold {mass:.6f} < p = {p:.6g} of the probability; "
            f"keep the token that crosses p"
        )
        short = mass - kept_probs.min().item()
        assert short < p + tol, (
            f"{what}, row {row}: the {n - 1} most likely tokens already hold {short:.6f} >= p = {p:.6g}; "
            f"{n} is not the smallest set"
        )


def check_top_p(fn: Callable) -> None:
    """Exercise 1.4. `fn(logits, p) -> logits`: nucleus (top-p) filtering, dropped tokens set to -inf.

    logits (B, V). Keep the smallest set of most likely tokens whose probabilities sum to >= p (so the token that
    crosses p is kept, and the most likely token always is); leave kept logits unchanged.
    """
    from minillm.engine.sampling import apply_top_p

    logits = randn(4, 53, seed=130) * 2

    def kept(out, like=logits):
        assert_shape(out, like.shape, what="top_p(logits)")
        return torch.isfinite(out)

    with exercise("1.4", "top-p (nucleus) filtering") as ex:
        # Fresh case, an odd vocabulary with degenerate rows: all equal (the kept count is ceil-like in p * V, rarely
        # whole), one dominant token, most tokens already -inf (after top-k), and confident logits of 100+ (exp
        # overflows float32 without the max subtracted).
        V = 2 * ex.rng.randrange(1, 100) + 1
        rows = [ex.randn(V) * ex.rng.uniform(0.5, 4) for _ in range(ex.rng.randrange(1, 4))]
        rows.append(torch.full((V,), ex.rng.uniform(-3, 3)))
        dominant = ex.randn(V)
        dominant[ex.rng.randrange(V)] += 30
        rows.append(dominant)
        after_top_k = torch.full((V,), float("-inf"))
        finite = ex.rng.sample(range(V), ex.rng.randint(1, min(V, 6)))
        after_top_k[finite] = ex.randn(len(finite))
        rows.append(after_top_k)
        rows.append(ex.randn(V) * 5 + ex.rng.uniform(100, 500))
        order = ex.rng.sample(range(len(rows)), len(rows))
        logits_rand = torch.stack([rows[i] for i in order])  # (B, V)
        p_rand = ex.rng.uniform(0.05, 0.95)
        # A real vocabulary with confident logits, as a trained model gives them.
        logits_real = ex.randn(2, REAL_VOCAB) * ex.rng.uniform(3, 5)
        p_real = ex.rng.uniform(0.3, 0.99)
        # Exact ties: 2^k (and 2^(k+1)) equal logits, the rest -inf, p = j / 2^k: the j (2j) most likely tokens hold
        # exactly p (exact in float32), so the smallest set stops there.
        k = ex.rng.randint(1, 4)
        j = ex.rng.randrange(1, 2**k)
        p_tie = j / 2**k
        V_tie = 2 * ex.rng.randrange(2**k, 40) + 1
        logits_tie = torch.full((2, V_tie), float("-inf"))
        for row, count in enumerate((2**k, 2 ** (k + 1))):
            logits_tie[row, ex.rng.sample(range(V_tie), count)] = ex.rng.uniform(-3, 3)

        ex.check(
            "keeps the same tokens as minillm's apply_top_p (p = 0.9)",
            lambda: assert_equal(kept(fn(logits.clone(), 0.9)), kept(apply_top_p(logits, 0.9)), what="kept tokens"),
        )
        ex.check(
            "kept logits are unchanged, dropped ones are -inf",
            lambda: assert_equal(fn(logits.clone(), 0.9), apply_top_p(logits, 0.9), what="filtered logits"),
        )
        for p in (0.5, 0.75):
            ex.check(
                f"p = {p}: keeps the smallest set of most likely tokens whose mass reaches p",
                lambda p=p: _assert_nucleus(fn(logits.clone(), p), logits, p, tol=1e-6),
            )
        ex.check(
            "a tiny p (0.001) still keeps the most likely token",
            lambda: assert_equal(kept(fn(logits.clone(), 0.001)).sum(-1), torch.ones(4, dtype=torch.long),
                                 what="tokens kept"),
        )
        ex.check(
            f"random V = {V}, p = {p_rand:.3f}, with rows all equal, dominated by one token, mostly -inf, "
            f"and of logits 100+: a valid nucleus in every row",
            lambda: _assert_nucleus(fn(logits_rand.clone(), p_rand), logits_rand, p_rand, tol=1e-5),
        )
        ex.check(
            f"exact ties: when the {j} (and {2 * j}) most likely tokens hold exactly p = {p_tie:g}, the set stops "
            f"there",
            lambda: assert_equal(kept(fn(logits_tie.clone(), p_tie), logits_tie).sum(-1), torch.tensor([j, 2 * j]),
                                 what=f"tokens kept with {2**k} and {2 ** (k + 1)} equal logits"),
        )
        ex.check(
            f"a real {REAL_VOCAB:,}-token vocabulary, p = {p_real:.3f}: a valid nucleus in every row",
            lambda: _assert_nucleus(fn(logits_real.clone(), p_real), logits_real, p_real, tol=1e-4),
        )

        def keeps_everything_at_one():
            assert_equal(bool(kept(fn(logits.clone(), 1.0)).all()), True, what=f"every one of {logits.shape[1]} kept")
            out = fn(logits_real.clone(), 1.0)
            assert_shape(out, logits_real.shape, what="top_p(logits, 1.0)")
            dropped = int((~torch.isfinite(out)).sum())
            assert dropped == 0, (
                f"p = 1.0 dropped {dropped} of {logits_real.numel()} tokens of a {REAL_VOCAB:,}-token vocabulary: "
                f"the float32 cumulative sum reaches 1.0 before the tail, so p = 1.0 must keep everything outright"
            )

        ex.check(f"p = 1.0 keeps every token, also of a real {REAL_VOCAB:,}-token vocabulary", keeps_everything_at_one)


def _swiglu_ref(x, gate_w, up_w, down_w):
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def check_swiglu_mlp(fn: Callable) -> None:
    """Exercise 1.5. `fn(x, gate_w, up_w, down_w) -> y`: the SwiGLU MLP, down(silu(gate(x)) * up(x)).

    x (..., C); gate_w, up_w (I, C) and down_w (C, I) are nn.Linear weights (y = x @ W.T), no biases.
    """
    C, I = 24, 40
    x = randn(2, 7, C, seed=140)
    gate_w, up_w = randn(I, C, seed=141) / C**0.5, randn(I, C, seed=142) / C**0.5
    down_w = randn(C, I, seed=143) / I**0.5
    with exercise("1.5", "the SwiGLU MLP") as ex:
        # Fresh case: any leading shape, odd widths (sometimes 1, sometimes I == C).
        C_r = ex.rng.choice([1, 2 * ex.rng.randrange(1, 40) + 1])
        I_r = ex.rng.choice([C_r, 2 * ex.rng.randrange(1, 60) + 1])
        lead = _leading_shape(ex)
        x_r = ex.randn(*lead, C_r)
        w_r = (ex.randn(I_r, C_r) / C_r**0.5, ex.randn(I_r, C_r) / C_r**0.5, ex.randn(C_r, I_r) / I_r**0.5)
        # Large activations: gate values in the hundreds (exp(z) overflows float32 above z ~ 88).
        x_big = ex.randn(3, C) * ex.rng.uniform(100, 300)
        x_bf16 = ex.randn(*lead, C_r).to(torch.bfloat16)
        w_bf16 = tuple(w.to(torch.bfloat16) for w in w_r)

        ex.check("returns x's shape", lambda: assert_shape(fn(x, gate_w, up_w, down_w), x.shape, what="mlp(x)"))
        ex.check(
            "matches down(silu(gate(x)) * up(x))",
            lambda: assert_close(fn(x, gate_w, up_w, down_w), _swiglu_ref(x, gate_w, up_w, down_w)),
        )

        def matches_module():
            from minillm.config import ModelConfig
            from minillm.model import MLP

            mlp = MLP(ModelConfig.tiny(hidden_size=C, intermediate_size=I, num_heads=4, num_kv_heads=2))
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data = gate_w, up_w, down_w
            with torch.no_grad():
                assert_close(fn(x, gate_w, up_w, down_w), mlp(x), what="mlp(x) vs minillm.model.MLP")

        ex.check("agrees with minillm.model.MLP", matches_module)
        ex.check(
            "the gate decides: a zero gate weight gives a zero output",
            lambda: assert_close(fn(x, torch.zeros_like(gate_w), up_w, down_w), torch.zeros_like(x), what="mlp(x)"),
        )
        ex.check(
            f"random x {(*lead, C_r)}, I = {I_r}: matches down(silu(gate(x)) * up(x))",
            lambda: assert_close(fn(x_r, *w_r), _swiglu_ref(x_r, *w_r), atol=1e-4, rtol=1e-4, what="mlp(x)"),
        )

        def large_activations():
            expected = _swiglu_ref(x_big, gate_w, up_w, down_w)
            scale = expected.abs().max().item()
            assert_close(fn(x_big, gate_w, up_w, down_w), expected, atol=1e-5 * scale, rtol=1e-4,
                         what="mlp(x) with gate values in the hundreds")

        ex.check("large activations (gate values in the hundreds): finite and right", large_activations)
        ex.check(
            "bf16 in, bf16 out, close to the reference",
            lambda: assert_close(fn(x_bf16, *w_bf16), _swiglu_ref(x_bf16, *w_bf16), atol=0.1, rtol=0.05,
                                 what="mlp(bf16 x)"),
        )
