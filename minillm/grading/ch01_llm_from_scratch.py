"""Chapter 1 checks (an LLM from scratch), used by solutions/01_llm_from_scratch.ipynb.

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

def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from minillm.model import RMSNorm

    norm = RMSNorm(x.shape[-1], eps).to(weight.dtype)
    norm.weight.data = weight
    return norm(x)


def check_rmsnorm(fn: Callable) -> None:
    """Exercise 1.1. `fn(x, weight, eps) -> y`: RMSNorm over the last axis, y = weight * x / sqrt(mean(x^2) + eps).

    x (..., C), weight (C,). Normalize in fp32 and return x's dtype times the weight (as ``minillm.model.RMSNorm``).
    """
    x = randn(3, 5, 37, seed=100) * 3 + 0.5  # a non-zero mean: RMSNorm must not subtract it
    w = randn(37, seed=101)
    with exercise("1.1", "RMSNorm") as ex:
        ex.check("returns the input's shape", lambda: assert_shape(fn(x, w, 1e-6), x.shape, what="rms_norm(x)"))
        ex.check("matches minillm.model.RMSNorm", lambda: assert_close(fn(x, w, 1e-6), _rms_norm_ref(x, w, 1e-6)))

        def unit_rms():
            y = fn(x, torch.ones(37), 1e-6)
            assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(3, 5), atol=1e-4, what="RMS of the output (weight 1)")

        ex.check("with weight 1 every row of the output has RMS 1", unit_rms)
        tiny = randn(2, 37, seed=102) * 1e-3
        ex.check(
            "eps sits inside the square root (inputs near zero, eps = 1e-2)",
            lambda: assert_close(fn(tiny, w, 1e-2), _rms_norm_ref(tiny, w, 1e-2), what="rms_norm(tiny x)"),
        )
        xh, wh = x.to(torch.bfloat16), w.to(torch.bfloat16)
        ex.check(
            "bf16 in, bf16 out, close to the fp32 result",
            lambda: assert_close(fn(xh, wh, 1e-6), _rms_norm_ref(xh, wh, 1e-6), atol=2e-2, rtol=2e-2),
        )


def check_rope(fn: Callable) -> None:
    """Exercise 1.2. `fn(x, cos, sin) -> x_rotated`: rotary embedding of queries or keys.

    x (B, H, T, D); cos, sin (B, T, D) from ``minillm.model.rope_cos_sin`` (each angle repeated for both halves).
    Pair i is (x_i, x_{i + D/2}), rotated by the angle in cos[..., i], sin[..., i].
    """
    from minillm.model import apply_rope, rope_cos_sin

    D = 16
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # (D/2,)
    positions = randint(0, 100, 2, 7, seed=110)  # (B, T): arbitrary, unsorted positions
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    x = randn(2, 3, 7, D, seed=111)

    def rotate_at(vec, pos):
        c, s = rope_cos_sin(torch.tensor([[pos]]), inv_freq, torch.float32)
        return fn(vec[None, None, None], c, s)[0, 0, 0]

    def relative():
        q, k = randn(D, seed=112), randn(D, seed=113)
        dots = torch.stack([rotate_at(q, m + 5) @ rotate_at(k, m) for m in (0, 3, 20, 41)])
        assert_close(dots, dots[:1].expand(4), atol=1e-4, what="q(m + 5) . k(m) for m = 0, 3, 20, 41")

    with exercise("1.2", "rotary position embedding") as ex:
        ex.check("returns x's shape", lambda: assert_shape(fn(x, cos, sin), x.shape, what="apply_rope(x)"))
        ex.check("matches minillm.model.apply_rope", lambda: assert_close(fn(x, cos, sin), apply_rope(x, cos, sin)))
        ex.check(
            "preserves the norm of every head vector (a rotation)",
            lambda: assert_close(fn(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-4, what="norms"),
        )
        zero = torch.zeros(2, 7, dtype=torch.long)
        c0, s0 = rope_cos_sin(zero, inv_freq, torch.float32)
        ex.check("position 0 is the identity", lambda: assert_close(fn(x, c0, s0), x, what="apply_rope at position 0"))
        ex.check("q . k depends only on the distance between positions", relative)


def check_repeat_kv(fn: Callable) -> None:
    """Exercise 1.3. `fn(x, n_rep) -> y`: repeat each K/V head n_rep times for grouped-query attention.

    x (B, Hkv, S, D) -> y (B, Hkv * n_rep, S, D), where query head h reads KV head h // n_rep.
    """
    from minillm.attention.reference import repeat_kv

    x = randn(2, 3, 5, 4, seed=120)
    with exercise("1.3", "repeat K/V heads for GQA") as ex:
        ex.check("returns (B, Hkv * n_rep, S, D)", lambda: assert_shape(fn(x, 3), (2, 9, 5, 4), what="repeat_kv(x, 3)"))
        ex.check("matches minillm's repeat_kv", lambda: assert_close(fn(x, 3), repeat_kv(x, 3)))

        def groups():
            y = fn(x, 4)
            for h in range(12):
                assert_equal(y[:, h], x[:, h // 4], what=f"query head {h} must read KV head {h // 4}")

        ex.check("query head h reads KV head h // n_rep (contiguous groups)", groups)
        ex.check("n_rep = 1 changes nothing", lambda: assert_equal(fn(x, 1), x, what="repeat_kv(x, 1)"))


def check_top_p(fn: Callable) -> None:
    """Exercise 1.4. `fn(logits, p) -> logits`: nucleus (top-p) filtering, dropped tokens set to -inf.

    logits (B, V). Keep the smallest set of most likely tokens whose probabilities sum to >= p (so the token that
    crosses p is kept, and the most likely token always is); leave kept logits unchanged.
    """
    from minillm.engine.sampling import apply_top_p

    logits = randn(4, 53, seed=130) * 2

    def kept(out):
        assert_shape(out, logits.shape, what="top_p(logits)")
        return torch.isfinite(out)

    def smallest_prefix_reaching_p(p):
        keep = kept(fn(logits, p))
        probs = logits.softmax(-1)
        for row in range(logits.shape[0]):
            order = probs[row].argsort(descending=True)
            n = int(keep[row].sum())
            most_likely = keep[row][order[:n]].all().item()
            assert_equal(most_likely, True, what=f"row {row}: the {n} kept tokens are the {n} most likely")
            mass = probs[row][order[:n]].sum().item()
            assert mass >= p, f"row {row}: the kept tokens hold {mass:.4f} < p = {p} of the probability"
            short = mass - probs[row][order[n - 1]].item()
            assert short < p, f"row {row}: {n - 1} tokens already reach p = {p}; the set is not the smallest"

    with exercise("1.4", "top-p (nucleus) filtering") as ex:
        ex.check(
            "keeps the same tokens as minillm's apply_top_p (p = 0.9)",
            lambda: assert_equal(kept(fn(logits, 0.9)), kept(apply_top_p(logits, 0.9)), what="kept tokens"),
        )
        ex.check(
            "kept logits are unchanged, dropped ones are -inf",
            lambda: assert_equal(fn(logits, 0.9), apply_top_p(logits, 0.9), what="filtered logits"),
        )
        for p in (0.5, 0.75):
            ex.check(
                f"p = {p}: keeps the smallest set of most likely tokens whose mass reaches p",
                lambda p=p: smallest_prefix_reaching_p(p),
            )
        ex.check(
            "a tiny p (0.001) still keeps the most likely token",
            lambda: assert_equal(kept(fn(logits, 0.001)).sum(-1), torch.ones(4, dtype=torch.long), what="tokens kept"),
        )
        ex.check(
            "p = 1.0 keeps every token",
            lambda: assert_equal(bool(kept(fn(logits, 1.0)).all()), True, what="every token kept"),
        )


def check_swiglu_mlp(fn: Callable) -> None:
    """Exercise 1.5. `fn(x, gate_w, up_w, down_w) -> y`: the SwiGLU MLP, down(silu(gate(x)) * up(x)).

    x (..., C); gate_w, up_w (I, C) and down_w (C, I) are nn.Linear weights (y = x @ W.T), no biases.
    """
    import torch.nn.functional as F

    def ref(x, gate_w, up_w, down_w):
        return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)

    C, I = 24, 40
    x = randn(2, 7, C, seed=140)
    gate_w, up_w = randn(I, C, seed=141) / C**0.5, randn(I, C, seed=142) / C**0.5
    down_w = randn(C, I, seed=143) / I**0.5
    with exercise("1.5", "the SwiGLU MLP") as ex:
        ex.check("returns x's shape", lambda: assert_shape(fn(x, gate_w, up_w, down_w), x.shape, what="mlp(x)"))
        ex.check(
            "matches down(silu(gate(x)) * up(x))",
            lambda: assert_close(fn(x, gate_w, up_w, down_w), ref(x, gate_w, up_w, down_w)),
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
