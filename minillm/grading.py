"""Checks for the graded exercises: each runs a few sub-checks and prints one deterministic line, or raises.

An exercise notebook asks the learner to rewrite a function the package already has; its check cell calls
``minillm.grading.check_<name>(learner_fn)``, which tests the function against the package's reference on seeded
random inputs and on properties (shapes, dtypes, invariants). A check either prints exactly

    Exercise 1.1 passed: 3/3 checks

or raises ``AssertionError`` naming the first sub-check that failed and what went wrong (expected vs got, shapes).
It raises rather than only printing because a learner who saves the notebook overwrites its stored outputs: the
exception is what makes ``pytest --nbval`` fail, whatever was saved (see ``minillm/course.py`` for grading that does
not trust saved outputs at all).

Writing a check::

    def check_rmsnorm(fn: Callable) -> None:
        x = randn(3, 5, 64, seed=0)
        w = randn(64, seed=1)
        with exercise("1.1", "RMSNorm") as ex:
            ex.check("matches the reference", lambda: assert_close(fn(x, w, 1e-6), rms_norm(x, w, 1e-6), what="output"))
            ex.check("keeps the input dtype", lambda: assert_equal(fn(x.half(), w.half(), 1e-6).dtype, torch.float16))

The stub the learner starts from raises ``NotImplementedError``; ``ex.check`` turns that into an AssertionError that
says "not implemented yet". Any other exception raised by the learner's code (a shape error, say) also fails the
sub-check, with the exception named. Inputs come from ``randn``/``generator`` with fixed seeds, drawn on the CPU, so
the inputs, and therefore the printed line, are the same on every machine.

Checks for each chapter live in that chapter's section at the end of this file, in notebook order. Every check has
a plausible wrong answer in ``tests/test_grading.py`` that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


class Exercise:
    """Runs the sub-checks of one exercise in order and stops at the first failure."""

    def __init__(self, number: str, title: str):
        self.number = number
        self.title = title
        self.num_passed = 0

    @property
    def name(self) -> str:
        return f"Exercise {self.number} ({self.title})"

    def check(self, description: str, test: Callable[[], Any]) -> Any:
        """Run one sub-check; `test` raises AssertionError (or anything else) when it fails. Returns its result."""
        index = self.num_passed + 1
        try:
            result = test()
        except NotImplementedError as e:
            raise AssertionError(
                f"{self.name}: not implemented yet. Replace the `raise NotImplementedError(...)` line in your "
                f"function with your code, run that cell, then run this check again."
            ) from None  # the stub's own traceback would only add noise
        except AssertionError as e:
            raise AssertionError(f"{self.name}, check {index} failed: {description}\n{e}") from None
        except Exception as e:  # the learner's code crashed: report it as this sub-check failing
            raise AssertionError(
                f"{self.name}, check {index} failed: {description}\n"
                f"your code raised {type(e).__name__}: {e}"
            ) from e
        self.num_passed += 1
        return result


@contextmanager
def exercise(number: str, title: str) -> Iterator[Exercise]:
    """Group the sub-checks of exercise `number` ("N.M"); print the verdict line when all of them passed."""
    ex = Exercise(number, title)
    try:
        yield ex
    except NotImplementedError:
        # The check called the learner's function outside ex.check (e.g. to build inputs for later sub-checks).
        raise AssertionError(f"{ex.name}: not implemented yet.") from None
    assert ex.num_passed > 0, f"{ex.name}: the check ran no sub-checks"
    print(f"Exercise {number} passed: {ex.num_passed}/{ex.num_passed} checks")


# ---------------------------------------------------------------------------------------------------------------------
# Generic helpers: seeded inputs and comparisons with readable messages.
# ---------------------------------------------------------------------------------------------------------------------


def generator(seed: int = 0) -> torch.Generator:
    """A CPU random generator with a fixed seed, so a check draws the same inputs on every machine and every run."""
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(
    *shape: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal tensor of `shape`, drawn on the CPU from `seed` and then moved: identical on any device."""
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float32).to(device=device, dtype=dtype)


def randint(
    low: int,
    high: int,
    *shape: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Integers in [low, high) of `shape` (int64), drawn on the CPU from `seed`."""
    return torch.randint(low, high, shape, generator=generator(seed)).to(device)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}"


def assert_shape(got: Any, shape: Sequence[int], what: str = "output") -> None:
    """`got` is a tensor of exactly `shape`."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor of shape {tuple(shape)}, got {_describe(got)}")
    if tuple(got.shape) != tuple(shape):
        raise AssertionError(f"{what}: expected shape {tuple(shape)}, got {tuple(got.shape)}")


def assert_close(
    got: Any,
    expected: torch.Tensor | float,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    what: str = "output",
    check_dtype: bool = True,
) -> None:
    """`got` matches `expected` elementwise within |got - expected| <= atol + rtol * |expected|.

    The message names `what`, the shapes or dtypes when they differ, else the worst element: its index, both values,
    the error, and how many elements are off.
    """
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=torch.float64)
        check_dtype = False
        if isinstance(got, (int, float)):
            got = torch.tensor(got, dtype=torch.float64)
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected {_describe(expected)}, got {_describe(got)}")
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if check_dtype and got.dtype != expected.dtype:
        raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
    g = got.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if torch.isnan(g).any() and not torch.isnan(e).any():
        raise AssertionError(f"{what}: contains NaN at {int(torch.isnan(g).sum())} of {g.numel()} elements")
    ok = torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
    if bool(ok.all()):
        return
    err = (g - e).abs().nan_to_num(nan=float("inf"))
    worst = int(err.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), g.shape)) if g.dim() else ()
    raise AssertionError(
        f"{what}: {int((~ok).sum())} of {g.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); "
        f"worst at index {index}: got {g.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g} "
        f"(abs error {err.flatten()[worst].item():.3g})"
    )


def assert_equal(got: Any, expected: Any, what: str = "output") -> None:
    """Exact equality, for token ids, shapes, dtypes, block tables: tensors compare by shape, dtype and values."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{what}: expected {_describe(expected)}, got {_describe(got)}")
        if got.shape != expected.shape:
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if got.dtype != expected.dtype:
            raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
        diff = (got.cpu() != expected.cpu()).nonzero()
        if len(diff):
            first = tuple(int(i) for i in diff[0])
            raise AssertionError(
                f"{what}: {len(diff)} of {got.numel()} elements differ; first at index {first}: "
                f"got {got.cpu()[first].item()!r}, expected {expected.cpu()[first].item()!r}"
            )
        return
    if got != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {got!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Chapter checks, one section per notebook in course order. Each check is `check_<name>(fn)`, documented with the
# signature it expects from the learner, and has a wrong answer registered in tests/test_grading.py.
# ---------------------------------------------------------------------------------------------------------------------

# == Chapter 00: setup and roofline ==================================================================================

# == Chapter 01: an LLM from scratch =================================================================================
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


# == Chapter 02: attention ===========================================================================================
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

    Runs on CUDA when available, else on the CPU under Triton's interpreter (TRITON_INTERPRET=1 set before the
    kernel is defined, which `python -m minillm.course` and the tests do).
    """
    from minillm._triton import triton_available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available(device):
        raise AssertionError(
            "Exercise 2.4 (row-softmax kernel): Triton cannot run here. On a CPU, start Jupyter with "
            "TRITON_INTERPRET=1 in the environment (e.g. `TRITON_INTERPRET=1 jupyter lab`), or use a GPU runtime."
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


# == Chapter 03: KV cache ============================================================================================
def check_kv_bytes_per_token(fn: Callable) -> None:
    """Exercise 3.1. `fn(config, dtype) -> int`: bytes of K and V one token leaves in the cache, all layers."""
    from minillm.config import ModelConfig
    from minillm.kvcache.memory import KV_PRESETS, kv_bytes_per_token

    def case(config, dtype):
        got = fn(config, dtype)
        assert_equal(isinstance(got, int), True, what=f"isinstance(fn({config.name}, {dtype}), int)")
        assert_equal(got, kv_bytes_per_token(config, dtype), what=f"bytes per token of {config.name} in {dtype}")

    with exercise("3.1", "KV bytes per token") as ex:
        smol, llama8, llama70 = KV_PRESETS["SmolLM2-135M"], KV_PRESETS["Llama-3.1-8B"], KV_PRESETS["Llama-3.1-70B"]
        ex.check("SmolLM2-135M in fp16 (30 layers, 3 KV heads of 64)", lambda: case(smol, torch.float16))
        ex.check("fp32 doubles it", lambda: case(smol, torch.float32))
        ex.check("Llama-3.1-8B in bf16 (GQA: 8 KV heads for 32 query heads)", lambda: case(llama8, torch.bfloat16))
        ex.check("Llama-3.1-70B in int8 (one byte per value)", lambda: case(llama70, torch.int8))
        odd = ModelConfig(1000, 96, 256, 5, 6, 2, head_dim=24, name="odd")
        ex.check("a config whose head_dim is not hidden_size / num_heads", lambda: case(odd, torch.float16))


def check_decode_step(fn: Callable) -> None:
    """Exercise 3.2. `fn(k_cache, v_cache, length, q, k, v) -> o`: append one token to a cache, attend over it.

    k_cache, v_cache (B, Hkv, S_max, D): one layer's slabs, columns [0, length) filled, modified in place;
    q (B, H, 1, D), k, v (B, Hkv, 1, D): the new token. Writes k, v at column `length`, returns
    o (B, H, 1, D) = attention of q over columns [0, length + 1), scale 1 / sqrt(D), H % Hkv == 0.
    """
    from minillm.attention import attention_ref

    B, H, Hkv, S_max, D, length = 2, 4, 2, 12, 8, 7

    def inputs(seed, dtype=torch.float32):
        k_cache = randn(B, Hkv, S_max, D, seed=seed, dtype=dtype)
        v_cache = randn(B, Hkv, S_max, D, seed=seed + 1, dtype=dtype)
        q, k, v = (randn(B, h, 1, D, seed=seed + 2 + i, dtype=dtype) for i, h in enumerate((H, Hkv, Hkv)))
        return k_cache, v_cache, q, k, v

    def expected(k_cache, v_cache, q, k, v):
        k_all = torch.cat([k_cache[:, :, :length], k], dim=2)  # (B, Hkv, length + 1, D)
        v_all = torch.cat([v_cache[:, :, :length], v], dim=2)
        return attention_ref(q, k_all, v_all)

    def matches(seed, dtype=torch.float32, tol=1e-5):
        k_cache, v_cache, q, k, v = inputs(seed, dtype)
        want = expected(k_cache, v_cache, q, k, v)
        assert_close(fn(k_cache, v_cache, length, q, k, v), want, atol=tol, rtol=tol, what="o")

    def writes_in_place():
        k_cache, v_cache, q, k, v = inputs(70)
        before_k, before_v = k_cache.clone(), v_cache.clone()
        fn(k_cache, v_cache, length, q, k, v)
        before_k[:, :, length : length + 1], before_v[:, :, length : length + 1] = k, v
        assert_equal(k_cache, before_k, what="k_cache after the step (only column `length` changes, to k)")
        assert_equal(v_cache, before_v, what="v_cache after the step (only column `length` changes, to v)")

    def ignores_unfilled_columns():
        k_cache, v_cache, q, k, v = inputs(80)
        want = expected(k_cache, v_cache, q, k, v)
        k_cache[:, :, length + 1 :], v_cache[:, :, length + 1 :] = 30.0, -30.0  # stale values past the end
        assert_close(fn(k_cache, v_cache, length, q, k, v), want, what="o with garbage past column `length`")

    with exercise("3.2", "one decode step over a KV cache") as ex:
        def shape():
            k_cache, v_cache, q, k, v = inputs(60)
            assert_shape(fn(k_cache, v_cache, length, q, k, v), (B, H, 1, D), what="o")

        ex.check("returns o of shape (B, H, 1, D)", shape)
        ex.check("writes k, v at column `length` and nothing else", writes_in_place)
        ex.check("o matches attention over the cached tokens plus the new one", lambda: matches(90))
        ex.check("columns past the new token are not read", ignores_unfilled_columns)
        ex.check("fp16 cache and inputs: fp16 output", lambda: matches(100, torch.float16, tol=2e-3))


def check_left_pad_batch(fn: Callable) -> None:
    """Exercise 3.3. `fn(token_ids, pad_token_id) -> (input_ids, positions, mask)` for a left-padded prefill.

    token_ids: list of B non-empty token lists; P = the longest. input_ids (B, P) long, each row's tokens at its end;
    positions (B, P) long, 0, 1, ... over the real tokens (0 on pads); mask (B, P) bool, True on real tokens.
    """
    from minillm.kvcache.contiguous import left_pad

    def case(token_ids, pad):
        got = fn(token_ids, pad)
        assert_equal(isinstance(got, tuple) and len(got), 3, what="number of returned tensors")
        ids, batch = left_pad(token_ids, pad)
        mask = batch.key_padding_mask if batch.key_padding_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        for g, want, what in zip(got, (ids, batch.positions, mask), ("input_ids", "positions", "mask")):
            assert_equal(g, want, what=what)

    with exercise("3.3", "position ids and masks for a left-padded batch") as ex:
        ex.check("one row: no padding", lambda: case([[5, 6, 7]], 0))
        ex.check("two rows of different lengths", lambda: case([[5, 6, 7, 8], [9, 10]], 0))
        ex.check("pads use pad_token_id", lambda: case([[5], [6, 7, 8]], 99))
        ex.check("four rows, the longest not first", lambda: case([[1, 2], [3, 4, 5, 6, 7], [8], [9, 10, 11]], 0))


# == Chapter 04: paged attention =====================================================================================
def _raises(fn: Callable, *args: Any) -> Exception | None:
    """The exception ``fn(*args)`` raised (None if it returned); NotImplementedError goes through to the stub message."""
    try:
        fn(*args)
    except NotImplementedError:
        raise
    except Exception as e:  # the learner may raise any error type here; the check only needs *an* error
        return e
    return None


def check_block_allocator(cls: Callable) -> None:
    """Exercise 4.1. `cls(num_blocks)`: a block allocator with a free list and reference counts.

    Methods: ``allocate() -> int`` takes a free block (reference count 1) and raises when none is left;
    ``share(block_id)`` adds a reference (a second block table points at the block); ``free(block_id)`` drops one
    reference and returns the block to the free list only when its count reaches 0, raising ``ValueError`` for a
    block that is not allocated (a double free); ``num_free_blocks`` (property) counts free blocks.
    """

    def fresh_pool():
        alloc = cls(5)
        got = [alloc.allocate() for _ in range(5)]
        assert_equal(sorted(got), [0, 1, 2, 3, 4], what="ids of 5 allocations from a pool of 5")
        assert_equal(alloc.num_free_blocks, 0, what="num_free_blocks when all are taken")
        assert _raises(alloc.allocate) is not None, "allocate() on an empty pool must raise, it returned a block"

    def free_and_reuse():
        alloc = cls(3)
        a, b = alloc.allocate(), alloc.allocate()
        alloc.free(a)
        assert_equal(alloc.num_free_blocks, 2, what="num_free_blocks after one free")
        c, d = alloc.allocate(), alloc.allocate()
        assert_equal(sorted([b, c, d]), [0, 1, 2], what="blocks held after freeing one and allocating two")

    def shared_block_stays():
        alloc = cls(2)
        a = alloc.allocate()
        alloc.share(a)  # two block tables point at a
        alloc.free(a)  # one of them lets go
        assert_equal(alloc.num_free_blocks, 1, what="num_free_blocks after freeing one of two references")
        b = alloc.allocate()
        assert b != a, f"block {a} is still referenced once, yet allocate() handed it out again"
        alloc.free(a)
        assert_equal(alloc.num_free_blocks, 1, what="num_free_blocks after the last reference is freed")

    def double_free():
        alloc = cls(3)
        a = alloc.allocate()
        alloc.free(a)
        err = _raises(alloc.free, a)
        assert isinstance(err, ValueError), f"freeing block {a} twice must raise ValueError, got {err!r}"
        err = _raises(alloc.free, 2)
        assert isinstance(err, ValueError), f"freeing never-allocated block 2 must raise ValueError, got {err!r}"

    def random_workload():
        # 300 seeded random operations against a model of what must hold: counts, no block handed out twice.
        rng = generator(40)
        alloc, refs = cls(8), {}
        for step in range(300):
            op = int(torch.randint(0, 3, (), generator=rng))
            if op == 0 and len(refs) < 8:
                block = alloc.allocate()
                assert block not in refs, f"operation {step}: allocate() returned block {block}, which is in use"
                assert 0 <= block < 8, f"operation {step}: allocate() returned {block}, outside [0, 8)"
                refs[block] = 1
            elif refs:
                block = sorted(refs)[int(torch.randint(0, len(refs), (), generator=rng))]
                if op == 1:
                    alloc.share(block)
                    refs[block] += 1
                else:
                    alloc.free(block)
                    refs[block] -= 1
                    if refs[block] == 0:
                        del refs[block]
            assert_equal(alloc.num_free_blocks, 8 - len(refs), what=f"num_free_blocks after operation {step}")

    with exercise("4.1", "a block allocator with reference counts") as ex:
        ex.check("hands out every block once, then raises", fresh_pool)
        ex.check("a freed block can be allocated again", free_and_reuse)
        ex.check("a shared block is freed only when its last reference goes", shared_block_stays)
        ex.check("a double free raises ValueError", double_free)
        ex.check("300 random allocate/share/free operations keep the counts right", random_workload)


def check_slot_mapping(fn: Callable) -> None:
    """Exercise 4.2. `fn(block_table, start, end, block_size) -> list[int]`: flat pool slots of positions [start, end).

    Position p lives in block ``block_table[p // block_size]`` at offset ``p % block_size``, i.e. in slot
    ``block_table[p // block_size] * block_size + p % block_size`` of the (NB * BS) flat pool.
    """
    from minillm.kvcache.blocks import BlockManager

    def reference(table, start, end, bs):
        bm = BlockManager(max(table) + 1, bs, enable_prefix_caching=False)
        bm.tables[0] = list(table)  # the manager's own addressing, for an arbitrary table
        return bm.slot_mapping(0, start, end)

    def case(seed, bs, num_blocks, start, end):
        table = torch.randperm(64, generator=generator(seed))[:num_blocks].tolist()
        got = fn(list(table), start, end, bs)
        assert_equal([int(s) for s in got], reference(table, start, end, bs),
                     what=f"slots of positions [{start}, {end}) with block_size={bs}, block_table={table}")

    def slots_are_in_table_blocks():
        table, bs = [9, 3, 17, 0], 8
        slots = [int(s) for s in fn(table, 0, 30, bs)]
        assert_equal(len(set(slots)), 30, what="number of distinct slots for 30 positions")
        assert_equal(sorted({s // bs for s in slots}), sorted(table), what="blocks the slots fall in")

    with exercise("4.2", "slot mapping from a block table") as ex:
        ex.check("a whole prompt, block_size 4", lambda: case(50, 4, 5, 0, 18))
        ex.check("a chunk starting mid-block, block_size 16", lambda: case(51, 16, 6, 21, 90))
        ex.check("one decode position at a block boundary", lambda: case(52, 16, 3, 32, 33))
        ex.check("block_size 1 (one token per block)", lambda: case(53, 1, 9, 2, 9))
        ex.check("an empty range gives no slots", lambda: case(54, 8, 2, 5, 5))
        ex.check("30 positions land in 30 distinct slots of the table's blocks", slots_are_in_table_blocks)


def check_paged_attention_gather(fn: Callable) -> None:
    """Exercise 4.3. `fn(q, k_cache, v_cache, block_tables, context_lens, scale=None) -> o`: decode by gathering.

    q (B, H, D); k_cache, v_cache (NB, BS, Hkv, D); block_tables (B, max_blocks) int32, padded with 0;
    context_lens (B,) int32. Returns (B, H, D) in q's dtype; same contract as
    ``minillm.attention.paged_decode_attention_ref``.
    """
    from minillm.attention.paged import paged_decode_attention_ref

    def inputs(B, H, Hkv, D, BS, lens, seed, dtype=torch.float32):
        nb = 48
        q = randn(B, H, D, seed=seed, dtype=dtype)
        k_cache, v_cache = randn(nb, BS, Hkv, D, seed=seed + 1, dtype=dtype), randn(nb, BS, Hkv, D, seed=seed + 2, dtype=dtype)
        max_blocks = max(-(-n // BS) for n in lens) + 1  # one spare column: every row is padded
        perm = torch.randperm(nb - 1, generator=generator(seed + 3)) + 1  # block 0 is the padding value
        tables = torch.zeros(B, max_blocks, dtype=torch.int32)
        used = 0
        for b, n in enumerate(lens):
            k = -(-n // BS)
            tables[b, :k] = perm[used : used + k].to(torch.int32)  # scattered, in no particular order
            used += k
        return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)

    def case(B, H, Hkv, D, BS, lens, seed, dtype=torch.float32, scale=None, atol=1e-5):
        args = inputs(B, H, Hkv, D, BS, lens, seed, dtype)
        expected = paged_decode_attention_ref(*args, scale=scale)
        got = fn(*args) if scale is None else fn(*args, scale=scale)
        assert_close(got, expected, atol=atol, rtol=atol, what=f"output (B={B}, H={H}, Hkv={Hkv}, BS={BS}, lens={lens})")

    def ignores_slots_past_the_end():
        q, k_cache, v_cache, tables, lens = inputs(2, 4, 2, 16, 8, [5, 11], seed=66)
        before = fn(q, k_cache, v_cache, tables, lens)
        k2, v2 = k_cache.clone(), v_cache.clone()
        k2[int(tables[0, 0]), 5:], v2[int(tables[0, 0]), 5:] = 30.0, -30.0  # the unused tail of sequence 0's only block
        k2[0], v2[0] = 30.0, -30.0  # the padding block
        assert_close(fn(q, k2, v2, tables, lens), before, what="output after changing slots past context_len")

    with exercise("4.3", "paged attention by gathering") as ex:
        ex.check("one sequence, full blocks, H = Hkv", lambda: case(1, 2, 2, 16, 4, [16], seed=60))
        ex.check("scattered blocks, odd lengths, GQA (H = 6, Hkv = 2)",
                 lambda: case(3, 6, 2, 16, 4, [13, 1, 30], seed=61))
        ex.check("block size 16, a one-token context", lambda: case(2, 4, 1, 32, 16, [1, 47], seed=62))
        ex.check("slots past context_len (and padding blocks) are never attended", ignores_slots_past_the_end)
        ex.check("an explicit scale", lambda: case(2, 4, 2, 16, 4, [9, 14], seed=63, scale=0.5))
        ex.check("fp16 in, fp16 out", lambda: case(2, 4, 2, 16, 8, [7, 20], seed=64, dtype=torch.float16, atol=2e-3))


def _manager_hashes(token_ids: list[int], block_size: int) -> list[int]:
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(-(-len(token_ids) // block_size) + 1, block_size)
    bm.allocate_prompt(0, token_ids)
    bm.ensure_capacity(0, len(token_ids))
    bm.commit(0, token_ids, len(token_ids))
    return list(bm.seq_hashes[0])


def check_block_hashes(fn: Callable) -> None:
    """Exercise 4.4. `fn(token_ids, block_size) -> list[int]`: the prefix hash chain of a token sequence.

    One hash per *full* block: ``h_i = hash((h_{i-1}, tuple(block i's token ids)))`` with ``h_{-1} = None``, the
    chain ``minillm.kvcache.blocks.BlockManager`` keys its prefix cache with.
    """
    rng = generator(70)
    tokens = torch.randint(0, 49152, (37,), generator=rng).tolist()

    def case(ids, bs):
        assert_equal(list(fn(list(ids), bs)), _manager_hashes(list(ids), bs),
                     what=f"hashes of {len(ids)} tokens with block_size={bs}")

    def chain_names_the_prefix():
        other = [tokens[0] + 1] + tokens[1:]  # differs only in the first token
        a, b = fn(list(tokens), 4), fn(other, 4)
        assert all(x != y for x, y in zip(a, b)), (
            "changing token 0 must change every block's hash (each hash names the whole prefix), but blocks "
            f"{[i for i, (x, y) in enumerate(zip(a, b)) if x == y]} kept theirs"
        )

    with exercise("4.4", "the prefix hash chain") as ex:
        ex.check("37 tokens, block_size 4: 9 full blocks", lambda: case(tokens, 4))
        ex.check("block_size 16", lambda: case(tokens, 16))
        ex.check("fewer tokens than a block: no hash", lambda: case(tokens[:3], 4))
        ex.check("a length that is a multiple of the block size", lambda: case(tokens[:32], 8))
        ex.check("a block's hash depends on every token before it", chain_names_the_prefix)


def check_cached_prefix_blocks(fn: Callable) -> None:
    """Exercise 4.5. `fn(token_ids, block_size, hash_to_block) -> list[int]`: the cached blocks a new prompt reuses.

    Walk the prompt's hash chain over its full blocks that end *before* its last token (the last token must be
    computed anyway, for its logits) and collect ``hash_to_block[h]`` until the first hash not in the cache.
    Must agree with ``BlockManager.allocate_prompt``.
    """
    from minillm.kvcache.blocks import BlockManager

    bs = 4
    rng = generator(80)
    system = torch.randint(0, 1000, (10,), generator=rng).tolist()  # 2 full blocks + 2 tokens
    first = system + torch.randint(1000, 2000, (9,), generator=rng).tolist()
    exact = list(range(5000, 5016))  # 4 full blocks, nothing else

    def served_manager():
        """A manager that served `first` and `exact`, then freed both (their full blocks stay cached)."""
        bm = BlockManager(32, bs)
        for seq_id, ids in ((0, first), (1, exact)):
            bm.allocate_prompt(seq_id, ids)
            bm.ensure_capacity(seq_id, len(ids))
            bm.commit(seq_id, ids, len(ids))
            bm.free(seq_id)
        return bm

    def case(prompt, what):
        bm = served_manager()
        cache = dict(bm.hash_to_block)
        got = [int(b) for b in fn(list(prompt), bs, cache)]
        bm.allocate_prompt(99, list(prompt))
        assert_equal(got, bm.block_table(99), what=what)

    with exercise("4.5", "which cached blocks a new prompt reuses") as ex:
        ex.check("same system prompt, new question: its 2 full blocks",
                 lambda: case(system + [7, 7, 7, 7, 7], "blocks reused by system prompt + new question"))
        ex.check("a longer prompt extending a cached one: every full cached block",
                 lambda: case(first + [1, 2, 3, 4, 5, 6], "blocks reused by an extension of a cached prompt"))
        ex.check("a different first token: nothing (hashes chain through the prefix)",
                 lambda: case([system[0] + 1] + first[1:], "blocks reused after changing token 0"))
        ex.check("an identical 16-token prompt: not its last block (the last token is recomputed)",
                 lambda: case(exact, "blocks reused by an identical prompt of 4 full blocks"))
        ex.check("an empty cache: nothing", lambda: assert_equal(list(fn(list(first), bs, {})), [], what="blocks"))

# == Chapter 05: continuous batching =================================================================================
def _schedule_step_ref(running: list[int], waiting: list[int], budget: int, max_seqs: int) -> tuple[list[int], list[int]]:
    """Drive the real `Scheduler` (huge pool, no prefix caching) from the exercise's plain lists."""
    from minillm.engine.request import Sequence, Status
    from minillm.engine.sampling import SamplingParams
    from minillm.engine.scheduler import Scheduler
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(100_000, 16, enable_prefix_caching=False)
    sched = Scheduler(bm, max_seqs, budget)

    def seq(i, prompt_len):
        return Sequence(seq_id=i, request_id=str(i), prompt_token_ids=[5] * prompt_len,
                        params=SamplingParams(max_tokens=8), eos_token_ids=[], max_model_len=10**9)

    for i, rem in enumerate(running):  # a decode: 8 computed + 1 sampled token; a prompt: 8 computed, rem to go
        s = seq(i, 8 if rem == 1 else 8 + rem)
        if rem == 1:
            s.output_token_ids.append(7)
        bm.allocate_prompt(s.seq_id, s.token_ids[:8])
        bm.ensure_capacity(s.seq_id, 8)
        bm.commit(s.seq_id, s.token_ids, 8)
        s.status, s.num_computed_tokens = Status.RUNNING, 8
        sched.running.append(s)
    for j, n in enumerate(waiting):
        sched.add(seq(len(running) + j, n))
    out = sched.schedule()
    planned = {s.seq_id: n for s, n in zip(out.seqs, out.num_new_tokens)}
    admitted = [planned[len(running) + j] for j in range(len(waiting)) if len(running) + j in planned]
    return [planned.get(i, 0) for i in range(len(running))], admitted


def check_schedule_step(fn: Callable) -> None:
    """Exercise 5.1. `fn(running, waiting, max_num_batched_tokens, max_num_seqs) -> (running_tokens, admitted)`.

    running: tokens each running sequence still has to compute, oldest first (1 = a decode, > 1 = a prompt being
    prefilled in chunks); waiting: prompt lengths in arrival order. Decodes go first, then unfinished prompts (in
    order), then waiting prompts first come first served, each taking min(its tokens, budget left), while tokens
    are left and fewer than max_num_seqs sequences run. Returns the tokens given to each running sequence (0 if
    none) and the tokens of each admitted waiting prompt (the admitted ones are a prefix of `waiting`).
    """
    cases = [
        ("only prompts, all fit", [], [5, 7, 3], 32, 8),
        ("decodes first, then a prompt is chunked to the budget left", [1, 1, 1], [40, 4], 16, 8),
        ("an unfinished prompt continues before new ones are admitted", [1, 30, 1], [6], 16, 8),
        ("max_num_seqs caps admissions", [1, 1], [2, 2, 2, 2], 64, 3),
        ("the budget is used up exactly", [1], [7, 9], 8, 4),
        ("nothing waiting", [1, 1, 12], [], 64, 8),
    ]
    g = generator(150)
    for k in range(6):  # random mixes
        running = [1 if torch.rand(1, generator=g) < 0.6 else int(torch.randint(2, 40, (1,), generator=g))
                   for _ in range(int(torch.randint(0, 6, (1,), generator=g)))]
        waiting = torch.randint(1, 50, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        cases.append((f"random mix {k}", running, waiting, int(torch.randint(8, 64, (1,), generator=g)), 6))
    with exercise("5.1", "one scheduling step under a token budget") as ex:
        for name, running, waiting, budget, max_seqs in cases:
            expected = _schedule_step_ref(running, waiting, budget, max_seqs)

            def same(running=running, waiting=waiting, budget=budget, max_seqs=max_seqs, expected=expected):
                got = fn(list(running), list(waiting), budget, max_seqs)
                assert_equal((list(got[0]), list(got[1])), expected,
                             what=f"(running_tokens, admitted) for running={running}, waiting={waiting}, "
                                  f"budget={budget}, max_num_seqs={max_seqs}")

            ex.check(name, same)


def _preempt_ref(bm, running: list[int], seq_id: int, num_tokens: int) -> list[int]:
    victims = []
    while seq_id not in victims and not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)):
        victims.append(running.pop())
        bm.free(victims[-1])
    return victims


def _preempt_case(num_blocks: int, lengths: list[int], shared: bool = False):
    """A BlockManager with block size 4 holding sequences 0.. of the given lengths (1 and 2 share a prefix if asked)."""
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(num_blocks, 4, enable_prefix_caching=shared)
    for i, n in enumerate(lengths):
        tokens = [9] * n if shared else [10 + i] * n
        bm.allocate_prompt(i, tokens)
        bm.ensure_capacity(i, n)
        bm.commit(i, tokens, n)
    return bm


def check_preempt(fn: Callable) -> None:
    """Exercise 5.2. `fn(bm, running, seq_id, num_tokens) -> victims`: make room for a sequence to grow.

    Sequence `seq_id` (in `running`, a list of seq ids oldest first) must hold `num_tokens` tokens. While
    ``bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens))`` is false, preempt the NEWEST running sequence:
    remove it from `running` (in place) and ``bm.free`` it; stop early if `seq_id` itself was preempted (it then
    waits to be recomputed). Return the preempted ids in order (empty when nothing had to go).
    """
    cases = [
        ("nothing to do when a block is free", 8, [5, 6, 3], 0, 9),
        ("the newest goes first", 6, [8, 8, 7], 0, 9),
        ("as many as needed, newest first", 8, [4, 4, 4, 4, 12], 0, 25),
        ("the growing sequence may be the newest: it preempts itself and stops", 6, [8, 8, 7], 2, 9),
        ("shared prefix blocks only return when their last holder goes", 4, [8, 8, 8], 0, 16),
    ]
    with exercise("5.2", "preemption: choose victims, release blocks") as ex:
        for name, num_blocks, lengths, seq_id, num_tokens in cases:
            shared = "shared" in name

            def same(num_blocks=num_blocks, lengths=lengths, seq_id=seq_id, num_tokens=num_tokens, shared=shared):
                bm, ref_bm = _preempt_case(num_blocks, lengths, shared), _preempt_case(num_blocks, lengths, shared)
                running, ref_running = list(range(len(lengths))), list(range(len(lengths)))
                got = fn(bm, running, seq_id, num_tokens)
                expected = _preempt_ref(ref_bm, ref_running, seq_id, num_tokens)
                assert_equal(list(got), expected, what=f"victims (lengths {lengths}, seq {seq_id} grows to {num_tokens})")
                assert_equal(running, ref_running, what="`running` after preemption")
                assert_equal(sorted(bm.tables), sorted(ref_bm.tables), what="sequences still holding blocks")
                assert_equal(bm.num_free_blocks, ref_bm.num_free_blocks, what="free blocks after preemption")

            ex.check(name, same)


class _Tables:
    """The two BlockManager methods `prepare_batch` uses, over fixed block tables."""

    def __init__(self, tables: list[list[int]], block_size: int):
        self.tables, self.block_size = tables, block_size

    def block_table(self, i: int) -> list[int]:
        return list(self.tables[i])

    def slot_mapping(self, i: int, start: int, end: int) -> list[int]:
        return [self.tables[i][p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]


def _pack_ref(token_ids, num_computed, num_new, block_tables, block_size):
    from types import SimpleNamespace

    from minillm.engine.runner import prepare_batch
    from minillm.engine.scheduler import SchedulerOutput

    seqs = [SimpleNamespace(seq_id=i, token_ids=t, num_computed_tokens=c, num_tokens=len(t))
            for i, (t, c) in enumerate(zip(token_ids, num_computed))]
    ids, pos, batch, _ = prepare_batch(SchedulerOutput(seqs, list(num_new)), _Tables(block_tables, block_size))
    return (ids[0].tolist(), pos[0].tolist(), batch.slot_mapping.tolist(), batch.cu_seqlens_q.tolist(),
            batch.context_lens.tolist())


def check_pack_batch(fn: Callable) -> None:
    """Exercise 5.3. `fn(token_ids, num_computed, num_new, block_tables, block_size) -> packed lists`.

    Sequence i has tokens `token_ids[i]`, of which the first `num_computed[i]` have K/V in the cache; this step
    computes the next `num_new[i]`. Return (input_ids, positions, slot_mapping, cu_seqlens_q, context_lens) as
    lists: the new tokens of all sequences end to end, their positions, their pool slots
    ``block_table[p // BS] * BS + p % BS``, the cumulative query lengths starting at 0, and each context length
    after this step (as ``minillm.engine.runner.prepare_batch``).
    """
    g = generator(160)
    cases = [
        ("one prompt from scratch", [list(range(10, 17))], [0], [7], [[3, 8]], 4),
        ("a prompt chunk and two decodes", [list(range(20, 40)), list(range(40, 46)), list(range(50, 59))],
         [8, 5, 8], [6, 1, 1], [[0, 4, 2, 9, 9], [7, 1], [5, 6, 11]], 4),
    ]
    for k in range(4):
        n = int(torch.randint(1, 6, (1,), generator=g))
        lens = torch.randint(1, 40, (n,), generator=g).tolist()
        computed = [int(torch.randint(0, L, (1,), generator=g)) for L in lens]
        new = [int(torch.randint(1, L - c + 1, (1,), generator=g)) for L, c in zip(lens, computed)]
        tables = [torch.randperm(40, generator=g)[: -(-L // 8)].tolist() for L in lens]
        tokens = [torch.randint(0, 1000, (L,), generator=g).tolist() for L in lens]
        cases.append((f"random batch {k}", tokens, computed, new, tables, 8))
    with exercise("5.3", "packing a mixed prefill/decode batch") as ex:
        for name, tokens, computed, new, tables, bs in cases:
            def same(tokens=tokens, computed=computed, new=new, tables=tables, bs=bs):
                got = fn(tokens, list(computed), list(new), tables, bs)
                expected = _pack_ref(tokens, computed, new, tables, bs)
                names = ["input_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens"]
                assert_equal(len(got), 5, what="number of returned lists")
                for field_name, a, b in zip(names, got, expected):
                    assert_equal([int(x) for x in a], b, what=f"{field_name} (num_computed={computed}, num_new={new})")

            ex.check(name, same)


# == Chapter 06: quantization ========================================================================================
def _weight_with_outliers(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Rows of different scales, each with one outlier 8x its row's scale; negative in even rows, so max != absmax."""
    w = randn(out_features, in_features, seed=seed) * torch.logspace(-1, 0.5, out_features)[:, None]
    rows = torch.arange(out_features)
    cols = torch.randint(0, in_features, (out_features,), generator=generator(seed + 1))
    sign = torch.where(rows % 2 == 0, -1.0, 1.0)
    w[rows, cols] = sign * 8 * torch.logspace(-1, 0.5, out_features)
    return w


def _as_tuple(got: Any, n: int, names: str) -> tuple:
    assert isinstance(got, (tuple, list)) and len(got) == n, f"expected a tuple ({names}), got {_describe(got)}"
    return tuple(got)


def check_absmax_quantize(fn: Callable) -> None:
    """Exercise 6.1. `fn(w, bits) -> (q, scale)`: symmetric (absmax) quantization with one scale per output row.

    w (N, K) float; qmax = 2^(bits-1) - 1; scale (N, 1) float32 = max_k |w[n, k]| / qmax (1.0 for an all-zero row);
    q (N, K) int8 = clamp(round(w / scale), -qmax, qmax). Same as ``minillm.quant.quantize_symmetric(w, bits,
    "channel")``'s ``.q`` and ``.scale``.
    """
    from minillm.quant.numerics import quantize_symmetric

    def matches(N, K, bits, seed):
        w = _weight_with_outliers(N, K, seed)
        q, scale = _as_tuple(fn(w, bits), 2, "q, scale")
        ref = quantize_symmetric(w, bits, "channel")
        assert_close(scale, ref.scale, what=f"scale ({bits} bits)")
        assert_equal(q, ref.q, what=f"q ({bits} bits)")

    def error_within_half_step():
        w = _weight_with_outliers(12, 40, seed=62)
        q, scale = _as_tuple(fn(w, 8), 2, "q, scale")
        err = (q.float() * scale - w).abs()
        assert bool((err <= scale / 2 + 1e-6).all()), f"|q * scale - w| exceeds scale / 2 (worst {err.max():.4g})"

    def odd_symmetric():
        w = _weight_with_outliers(8, 32, seed=63)
        q_pos, _ = _as_tuple(fn(w, 4), 2, "q, scale")
        q_neg, _ = _as_tuple(fn(-w, 4), 2, "q, scale")
        assert_equal(q_neg, -q_pos, what="q of -w (must be -q: the range is symmetric)")

    def zero_row():
        w = _weight_with_outliers(4, 16, seed=64)
        w[2] = 0
        q, scale = _as_tuple(fn(w, 8), 2, "q, scale")
        assert not torch.isnan(scale).any() and not torch.isnan(q.float()).any(), "an all-zero row gives NaN"
        assert_equal(q[2], torch.zeros(16, dtype=torch.int8), what="q of an all-zero row")

    with exercise("6.1", "absmax quantization per output channel") as ex:
        ex.check("int8 of a 16 x 64 weight with outliers matches the reference", lambda: matches(16, 64, 8, seed=60))
        ex.check("4 bits (qmax = 7) matches the reference", lambda: matches(10, 48, 4, seed=61))
        ex.check("every dequantized weight is within half a step", error_within_half_step)
        ex.check("negating w negates q", odd_symmetric)
        ex.check("an all-zero row does not divide by zero", zero_row)


def check_zero_point_quantize(fn: Callable) -> None:
    """Exercise 6.2. `fn(w, bits) -> (q, scale, zero)`: asymmetric (zero-point) quantization per output row.

    qmax = 2^bits - 1; per row: lo = min(min w, 0), hi = max(max w, 0); scale = (hi - lo) / qmax (1.0 if 0);
    zero = clamp(round(-lo / scale), 0, qmax) (an integer-valued float); q = clamp(round(w / scale) + zero, 0, qmax)
    as uint8. scale, zero (N, 1). Same as ``minillm.quant.quantize_asymmetric(w, bits, "channel")``.
    """
    from minillm.quant.numerics import quantize_asymmetric

    def matches(w, bits, what):
        q, scale, zero = _as_tuple(fn(w, bits), 3, "q, scale, zero")
        ref = quantize_asymmetric(w, bits, "channel")
        assert_close(scale, ref.scale, what=f"scale ({what})")
        assert_close(zero, ref.zero, what=f"zero ({what})")
        assert_equal(q, ref.q, what=f"q ({what})")

    def integer_zero_in_range():
        _, _, zero = _as_tuple(fn(_weight_with_outliers(12, 32, seed=66), 4), 3, "q, scale, zero")
        assert bool((zero == zero.round()).all()), f"zero-points must be integers, got {zero.flatten()[:4].tolist()}"
        assert bool(((zero >= 0) & (zero <= 15)).all()), "zero-points must be valid 4-bit codes in [0, 15]"

    def zero_is_exact():
        w = _weight_with_outliers(8, 32, seed=67)
        w[:, ::5] = 0.0
        q, scale, zero = _as_tuple(fn(w, 4), 3, "q, scale, zero")
        deq = (q.float() - zero) * scale
        assert_equal(deq[:, ::5], torch.zeros_like(deq[:, ::5]), what="dequantized exact zeros (0.0 must map to zero)")

    with exercise("6.2", "zero-point quantization per output channel") as ex:
        ex.check("4 bits of a 16 x 64 weight matches the reference",
                 lambda: matches(_weight_with_outliers(16, 64, seed=65), 4, "4 bits"))
        ex.check("8 bits of all-positive rows (the range still includes 0)",
                 lambda: matches(_weight_with_outliers(6, 24, seed=68).abs() + 0.5, 8, "8 bits, w > 0"))
        ex.check("zero-points are integers in [0, 2^bits - 1]", integer_zero_in_range)
        ex.check("w = 0.0 dequantizes to exactly 0.0", zero_is_exact)


def check_group_quantize(fn: Callable) -> None:
    """Exercise 6.3. `fn(w, bits, group_size) -> (q, scale, zero)`: zero-point quantization per group.

    Groups are `group_size` consecutive weights of a row (along K, which group_size divides); each gets the scale and
    zero-point of exercise 6.2. q (N, K) uint8; scale, zero (N, K // group_size). Same as
    ``minillm.quant.quantize_asymmetric(w, bits, "group", group_size)``.
    """
    from minillm.quant.numerics import quantize_asymmetric

    def matches(N, K, bits, G, seed):
        w = _weight_with_outliers(N, K, seed)
        q, scale, zero = _as_tuple(fn(w, bits, G), 3, "q, scale, zero")
        ref = quantize_asymmetric(w, bits, "group", G)
        assert_close(scale, ref.scale, what=f"scale (G = {G})")
        assert_close(zero, ref.zero, what=f"zero (G = {G})")
        assert_equal(q, ref.q, what=f"q (G = {G})")

    def outlier_stays_in_its_group():
        w = _weight_with_outliers(4, 64, seed=73)
        w_out = w.clone()
        w_out[:, 3] = 50.0  # an outlier in group 0 of every row
        q, scale, _ = _as_tuple(fn(w, 4, 16), 3, "q, scale, zero")
        q_out, scale_out, _ = _as_tuple(fn(w_out, 4, 16), 3, "q, scale, zero")
        assert_equal(q_out[:, 16:], q[:, 16:], what="codes of groups 1..3 after an outlier in group 0")
        assert_close(scale_out[:, 1:], scale[:, 1:], what="scales of groups 1..3 after an outlier in group 0")

    with exercise("6.3", "per-group quantization") as ex:
        ex.check("4 bits, groups of 32 of an 8 x 128 weight", lambda: matches(8, 128, 4, 32, seed=70))
        ex.check("3 bits, groups of 16 of a 6 x 64 weight", lambda: matches(6, 64, 3, 16, seed=71))
        ex.check("one group per row is per-channel quantization", lambda: matches(5, 40, 4, 40, seed=72))
        ex.check("an outlier only changes its own group", outlier_stays_in_its_group)


def check_pack_int4(fn: Callable) -> None:
    """Exercise 6.4. `fn(q) -> packed`: two 4-bit codes per byte along the last dim.

    q (..., K) uint8 in [0, 15], K even -> (..., K / 2) uint8 where byte j = q[..., 2j] | (q[..., 2j + 1] << 4):
    column 2j in the low nibble, 2j + 1 in the high one. Same as ``minillm.quant.numerics.pack_int4``.
    """
    from minillm.quant.numerics import pack_int4, unpack_int4

    def codes(*shape, seed):
        return randint(0, 16, *shape, seed=seed).to(torch.uint8)

    def tiny():
        got = fn(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
        assert_equal(got, torch.tensor([[0x21, 0x0F]], dtype=torch.uint8), what="pack([[1, 2, 15, 0]])")

    def round_trip():
        q = codes(3, 5, 18, seed=81)
        assert_equal(unpack_int4(fn(q)), q, what="unpack_int4(your packing)")

    with exercise("6.4", "int4 packing") as ex:
        ex.check("[1, 2, 15, 0] packs to bytes 0x21, 0x0F", tiny)
        ex.check("an 8 x 64 code matrix matches the reference",
                 lambda: assert_equal(fn(codes(8, 64, seed=80)), pack_int4(codes(8, 64, seed=80)), what="packed"))
        ex.check("leading dims are kept, and minillm's unpacking inverts it", round_trip)


def _awq_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration rows x (64, 128) with 4 input channels 20x louder than the rest, and a weight (48, 128)."""
    x = randn(64, 128, seed=seed)
    loud = torch.randperm(128, generator=generator(seed + 1))[:4]
    x[:, loud] *= 20
    return x, randn(48, 128, seed=seed + 2)


def check_awq_search(fn: Callable) -> None:
    """Exercise 6.5. `fn(x, weight, group_size, num_grid) -> (s, alpha, losses)`: AWQ's scale search for one layer.

    x (n, K) calibration inputs, weight (N, K). x_mean = mean |x| over rows (K,). For every alpha in
    ``torch.linspace(0, 1, num_grid + 1).tolist()``: s = x_mean ** alpha clamped to >= 1e-4, then
    s = s / sqrt(s.max() * s.min()); W_q = fake_quantize_int4(weight * s, group_size) (from minillm.quant.awq);
    loss = mean((x / s) @ W_q^T - x @ weight^T)^2 as a float. Returns the s and alpha of the smallest loss (the first
    one on ties) and the list of all losses. Same as ``minillm.quant.awq.search_scale(x.abs().mean(0), x, weight,
    group_size, num_grid)``.
    """
    from minillm.quant.awq import fake_quantize_int4, search_scale

    def matches(G, num_grid, seed):
        x, weight = _awq_inputs(seed)
        s, alpha, losses = _as_tuple(fn(x, weight, G, num_grid), 3, "s, alpha, losses")
        s_ref, alpha_ref, losses_ref = search_scale(x.abs().mean(0), x, weight, G, num_grid)
        assert_close(torch.tensor(list(losses)), torch.tensor(losses_ref), rtol=1e-4, atol=1e-7,
                     what=f"losses (G = {G}, {num_grid + 1} alphas)")
        assert_close(float(alpha), alpha_ref, atol=1e-6, what="best alpha")
        assert_close(s, s_ref, rtol=1e-4, atol=1e-6, what="best s")

    def alpha_zero_is_round_to_nearest():
        x, weight = _awq_inputs(92)
        _, _, losses = _as_tuple(fn(x, weight, 32, 4), 3, "s, alpha, losses")
        rtn = (x @ fake_quantize_int4(weight, 32).t() - x @ weight.t()).pow(2).mean().item()
        assert_close(float(losses[0]), rtn, rtol=1e-4, what="loss at alpha = 0 (s = 1: plain round to nearest)")

    def helps_on_loud_channels():
        x, weight = _awq_inputs(93)
        _, alpha, losses = _as_tuple(fn(x, weight, 32, 10), 3, "s, alpha, losses")
        assert float(alpha) > 0 and min(losses) < losses[0], (
            f"with 4 loud input channels the search should pick alpha > 0 and beat round to nearest; "
            f"got alpha {float(alpha)}, losses[0] {losses[0]:.4g}, min {min(losses):.4g}")

    with exercise("6.5", "AWQ's scale search for one layer") as ex:
        ex.check("losses, alpha and s match the reference (G = 32, 11 alphas)", lambda: matches(32, 10, seed=90))
        ex.check("the same with G = 64 and 5 alphas", lambda: matches(64, 4, seed=91))
        ex.check("alpha = 0 is round to nearest", alpha_zero_is_round_to_nearest)
        ex.check("loud channels make a scale worth it", helps_on_loud_channels)


# == Chapter 07: pruning =============================================================================================
def _rows_of_different_scales(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A weight whose rows differ in scale by 100x, like real layers: a global threshold would empty the small rows."""
    scale = torch.logspace(-1, 1, out_features)[:, None]
    return randn(out_features, in_features, seed=seed) * scale


def _assert_mask(got: Any, shape: tuple[int, int], what: str) -> None:
    assert_shape(got, shape, what=what)
    assert_equal(got.dtype, torch.bool, what=f"{what} dtype (a keep-mask: True = keep)")


def _assert_row_counts(mask: torch.Tensor, num_kept: int, what: str) -> None:
    kept = mask.sum(dim=1)
    bad = (kept != num_kept).nonzero().flatten().tolist()
    assert not bad, (
        f"{what}: every row must keep exactly {num_kept} of {mask.shape[1]} weights, but rows {bad[:5]} keep "
        f"{kept[bad[:5]].tolist()}"
    )


def _assert_keeps_largest(score: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    """In every row, the smallest kept score is at least the largest dropped one."""
    kept_min = score.masked_fill(~mask, float("inf")).amin(dim=1)
    dropped_max = score.masked_fill(mask, float("-inf")).amax(dim=1)
    bad = (kept_min < dropped_max).nonzero().flatten().tolist()
    assert not bad, (
        f"{what}: rows {bad[:5]} keep a weight whose score is smaller than one they drop "
        f"(row {bad[0]}: kept min {kept_min[bad[0]].item():.4g} < dropped max {dropped_max[bad[0]].item():.4g})"
    )


def check_magnitude_mask(fn: Callable) -> None:
    """Exercise 7.1. `fn(weight, sparsity) -> mask`: per-row magnitude pruning of one weight.

    weight (out, in) float; sparsity in [0, 1). Returns a bool keep-mask (out, in) that drops, in every row, the
    ``round(sparsity * in)`` weights of smallest ``|W|``. Same contract as ``minillm.prune.magnitude_mask``.
    """
    from minillm.prune import magnitude_mask

    def matches(out_features, in_features, sparsity, seed):
        weight = _rows_of_different_scales(out_features, in_features, seed)
        got = fn(weight, sparsity)
        _assert_mask(got, weight.shape, what="mask")
        assert_equal(got, magnitude_mask(weight, sparsity),
                     what=f"mask at sparsity {sparsity} ({out_features} x {in_features})")

    def exact_per_row():
        weight = _rows_of_different_scales(16, 40, seed=72)
        mask = fn(weight, 0.3)
        _assert_mask(mask, weight.shape, what="mask")
        _assert_row_counts(mask, 28, what="sparsity 0.3 of 40 inputs")

    def keeps_largest():
        weight = _rows_of_different_scales(12, 64, seed=73)
        _assert_keeps_largest(weight.abs(), fn(weight, 0.75), what="|W| at sparsity 0.75")

    def negative_weights_count_by_size():
        weight = -_rows_of_different_scales(8, 32, seed=74).abs()  # all negative: |W| ranks them, not W
        assert_equal(fn(weight, 0.5), magnitude_mask(weight, 0.5), what="mask of an all-negative weight")

    with exercise("7.1", "a per-row magnitude mask") as ex:
        ex.check("50% of a 64 x 64 weight matches the reference", lambda: matches(64, 64, 0.5, seed=70))
        ex.check("25% of a 24 x 48 weight whose rows differ in scale", lambda: matches(24, 48, 0.25, seed=71))
        ex.check("every row loses exactly round(sparsity * in) weights", exact_per_row)
        ex.check("each row keeps its largest |W|", keeps_largest)
        ex.check("the sign does not matter: large negative weights are kept", negative_weights_count_by_size)
        ex.check("sparsity 0 keeps everything", lambda: matches(8, 16, 0.0, seed=75))


def _wanda_inputs(num_tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """Calibration inputs (N, in) with a few outlier channels 30x louder than the rest, as in real LLM layers."""
    x = randn(num_tokens, in_features, seed=seed)
    outliers = torch.randperm(in_features, generator=generator(seed + 1))[:3]
    x[:, outliers] *= 30
    return x


def _wanda_mask_ref(weight: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    from minillm.prune import row_mask, wanda_score

    norm = x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0).sqrt().float()  # (in,), as InputNormCollector
    return row_mask(wanda_score(weight, norm), sparsity)


def check_wanda_mask(fn: Callable) -> None:
    """Exercise 7.2. `fn(weight, x, sparsity) -> mask`: the Wanda keep-mask of one linear layer.

    weight (out, in); x (..., in): the layer's inputs on calibration tokens (any leading dims: every token is one
    sample). Score ``S_ij = |W_ij| * ||X_j||_2`` with the L2 norm of input feature j over all tokens; drop the
    ``round(sparsity * in)`` lowest scores of every output row. Returns a bool keep-mask (out, in).
    """

    def matches(weight, x, sparsity, what):
        got = fn(weight, x, sparsity)
        _assert_mask(got, weight.shape, what="mask")
        assert_equal(got, _wanda_mask_ref(weight, x, sparsity), what=what)

    def square():
        weight, x = _rows_of_different_scales(48, 48, seed=80), _wanda_inputs(96, 48, seed=81)
        matches(weight, x, 0.5, what="mask of a 48 x 48 weight at sparsity 0.5")

    def rectangular():
        weight, x = _rows_of_different_scales(20, 64, seed=82), _wanda_inputs(50, 64, seed=83)
        matches(weight, x, 0.25, what="mask of a 20 x 64 weight at sparsity 0.25")

    def batched_tokens():
        weight, x = _rows_of_different_scales(16, 32, seed=84), _wanda_inputs(3 * 10, 32, seed=85)
        matches(weight, x.reshape(3, 10, 32), 0.5, what="mask with x of shape (B=3, T=10, in=32)")

    def outlier_channel_survives():
        weight = randn(32, 64, seed=86)
        x = randn(40, 64, seed=87)
        x[:, 5] *= 1000  # one loud input channel
        weight[:, 5] = 0.02 * weight[:, 5].sign()  # small weights: magnitude pruning would drop all of them
        mask = fn(weight, x, 0.5)
        assert bool(mask[:, 5].all()), (
            f"input channel 5 carries activations 1000x larger than the rest; Wanda keeps its weights, "
            f"but the mask drops {int((~mask[:, 5]).sum())} of its 32"
        )

    def scale_free():
        weight, x = _rows_of_different_scales(24, 40, seed=88), _wanda_inputs(30, 40, seed=89)
        assert_equal(fn(weight, 7.0 * x, 0.5), fn(weight, x, 0.5), what="mask after scaling x by 7")

    with exercise("7.2", "the Wanda score and its per-row mask") as ex:
        ex.check("a square 48 x 48 layer at 50% matches the reference", square)
        ex.check("a 20 x 64 layer at 25% matches the reference", rectangular)
        ex.check("x with leading (B, T) dims: norms over every token", batched_tokens)
        ex.check("small weights on a loud input channel are kept", outlier_channel_survives)
        ex.check("scaling all inputs by a constant does not change the mask", scale_free)
        weight, x = _rows_of_different_scales(16, 48, seed=90), _wanda_inputs(20, 48, seed=91)
        ex.check("every row loses exactly round(sparsity * in) weights",
                 lambda: _assert_row_counts(fn(weight, x, 0.75), 12, what="sparsity 0.75 of 48 inputs"))


def check_nm_mask(fn: Callable) -> None:
    """Exercise 7.3. `fn(score, n, m) -> mask`: keep the N highest scores in every group of M consecutive inputs.

    score (out, in) with ``in % m == 0``; groups are ``score[r, g*m : (g+1)*m]`` along the input (last) dimension,
    the reduction dimension of ``x @ W.T`` that sparse tensor cores need. Returns a bool keep-mask (out, in).
    Same contract as ``minillm.prune.nm_mask``.
    """
    from minillm.prune import is_nm_sparse, nm_mask

    def matches(out_features, in_features, n, m, seed):
        score = randn(out_features, in_features, seed=seed).abs()
        got = fn(score, n, m)
        _assert_mask(got, score.shape, what="mask")
        assert_equal(got, nm_mask(score, n, m), what=f"{n}:{m} mask of a {out_features} x {in_features} score")

    def exact_pattern(n, m, seed):
        score = randn(12, 48, seed=seed).abs()
        mask = fn(score, n, m)
        _assert_mask(mask, score.shape, what="mask")
        kept = mask.reshape(12, 48 // m, m).sum(dim=-1)  # (out, in/M)
        bad = (kept != n).nonzero().tolist()
        assert not bad, (
            f"every group of {m} consecutive inputs in a row must keep exactly {n}; (row, group) {bad[0]} keeps "
            f"{kept[bad[0][0], bad[0][1]].item()} ({len(bad)} groups wrong)"
        )
        assert is_nm_sparse(score * mask, n, m), f"score * mask is not {n}:{m} sparse along the input dimension"

    def keeps_largest_in_group():
        score = randn(6, 32, seed=104).abs()
        mask = fn(score, 2, 4)
        _assert_mask(mask, score.shape, what="mask")
        _assert_keeps_largest(score.reshape(-1, 4), mask.reshape(-1, 4),
                              what="groups of 4 (the rows of score.reshape(-1, 4))")

    with exercise("7.3", "an N:M mask") as ex:
        ex.check("2:4 of a 16 x 32 score matches the reference", lambda: matches(16, 32, 2, 4, seed=100))
        ex.check("4:8 of a 10 x 64 score matches the reference", lambda: matches(10, 64, 4, 8, seed=101))
        ex.check("2:4: exactly 2 kept in every group of 4 consecutive inputs", lambda: exact_pattern(2, 4, seed=102))
        ex.check("1:4: exactly 1 kept in every group", lambda: exact_pattern(1, 4, seed=103))
        ex.check("each group keeps its largest scores", keeps_largest_in_group)
        ex.check("a single row of 8 inputs, 2:4", lambda: matches(1, 8, 2, 4, seed=105))

# == Chapter 08: fast decoding =======================================================================================
