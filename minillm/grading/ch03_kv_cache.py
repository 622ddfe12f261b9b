"""Chapter 3 checks (KV cache), used by solutions/03_kv_cache.ipynb.

Each check runs fixed cases, then fresh random ones drawn from the exercise's seed (``ex.randn``, ``ex.rng``): every
random sub-check draws the same number of cases whatever the seed, and each case class (a dtype, a boundary, a
degenerate batch) is drawn on every run, so a wrong answer fails on every seed, not on lucky ones. Every check has
plausible wrong answers in tests/answers/ch03_kv_cache.py that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minillm.grading.framework import (
    Exercise,
    assert_close,
    assert_equal,
    assert_shape,
    exercise,
    randn,
)

__all__ = [  # the checks, re-exported by minillm.grading
    "check_kv_bytes_per_token",
    "check_decode_step",
    "check_left_pad_batch",
    "check_kv_waste",
]


def _random_config(ex: Exercise, num_heads: int | None = None, num_kv_heads: int | None = None):
    """A random valid ModelConfig: L, H, Hkv (a divisor of H) and an even head_dim that is often not C / H."""
    from minillm.config import ModelConfig

    H = num_heads or ex.rng.randint(1, 64)
    Hkv = num_kv_heads or ex.rng.choice([d for d in range(1, H + 1) if H % d == 0])
    D = 2 * ex.rng.randint(1, 128)
    hidden = H * D if ex.rng.random() < 0.5 else H * D + 2 * ex.rng.randint(1, 64)  # explicit head_dim != C / H
    return ModelConfig(1000, hidden, 4 * hidden, ex.rng.randint(1, 96), H, Hkv, head_dim=D, name="random")


def check_kv_bytes_per_token(fn: Callable) -> None:
    """Exercise 3.1. `fn(config, dtype) -> int`: bytes of K and V one token leaves in the cache, all layers."""
    from minillm.config import ModelConfig
    from minillm.kvcache.memory import KV_PRESETS, kv_bytes_per_token

    # Every dtype a KV cache might use, each drawn on every run: 1, 2, 4 and 8 bytes per element.
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8]
    dtypes += [torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else []

    def describe(config):
        return (f"{config.name} (L={config.num_layers}, C={config.hidden_size}, H={config.num_heads}, "
                f"Hkv={config.num_kv_heads}, head_dim={config.head_dim})")

    def case(config, dtype):
        got = fn(config, dtype)
        assert_equal(isinstance(got, int), True, what=f"isinstance(fn({config.name}, {dtype}), int)")
        assert_equal(got, kv_bytes_per_token(config, dtype), what=f"bytes per token of {describe(config)} in {dtype}")

    with exercise("3.1", "KV bytes per token") as ex:
        smol, llama8, llama70 = KV_PRESETS["SmolLM2-135M"], KV_PRESETS["Llama-3.1-8B"], KV_PRESETS["Llama-3.1-70B"]
        ex.check("SmolLM2-135M in fp16 (30 layers, 3 KV heads of 64)", lambda: case(smol, torch.float16))
        ex.check("fp32 doubles it", lambda: case(smol, torch.float32))
        ex.check("Llama-3.1-8B in bf16 (GQA: 8 KV heads for 32 query heads)", lambda: case(llama8, torch.bfloat16))
        ex.check("Llama-3.1-70B in int8 (one byte per value)", lambda: case(llama70, torch.int8))
        odd = ModelConfig(1000, 96, 256, 5, 6, 2, head_dim=24, name="odd")
        ex.check("a config whose head_dim is not hidden_size / num_heads", lambda: case(odd, torch.float16))

        randoms = [(_random_config(ex), dtype) for dtype in dtypes]
        ex.check(f"random configs in every dtype ({', '.join(str(d).split('.')[1] for d in dtypes)})",
                 lambda: [case(config, dtype) for config, dtype in randoms])
        H = ex.rng.choice([16, 32, 64])
        boundaries = [_random_config(ex, H, 1), _random_config(ex, H, H)]
        ex.check("random configs at the GQA boundaries: one KV head (MQA), as many KV heads as query heads (MHA)",
                 lambda: [case(config, ex.rng.choice(dtypes)) for config in boundaries])


def check_decode_step(fn: Callable) -> None:
    """Exercise 3.2. `fn(k_cache, v_cache, length, q, k, v) -> o`: append one token to a cache, attend over it.

    k_cache, v_cache (B, Hkv, S_max, D): one layer's slabs, columns [0, length) filled, modified in place;
    q (B, H, 1, D), k, v (B, Hkv, 1, D): the new token. Writes k, v at column `length`, returns
    o (B, H, 1, D) = attention of q over columns [0, length + 1), scale 1 / sqrt(D), H % Hkv == 0.
    Columns past `length` hold stale values (NaN in the random cases, as unfilled memory may) and must not be read.
    """
    from minillm.attention import attention_ref

    B, H, Hkv, S_max, D, length = 2, 4, 2, 12, 8, 7

    def inputs(seed, dtype=torch.float32):
        k_cache = randn(B, Hkv, S_max, D, seed=seed, dtype=dtype)
        v_cache = randn(B, Hkv, S_max, D, seed=seed + 1, dtype=dtype)
        q, k, v = (randn(B, h, 1, D, seed=seed + 2 + i, dtype=dtype) for i, h in enumerate((H, Hkv, Hkv)))
        return k_cache, v_cache, q, k, v

    def expected(k_cache, v_cache, length, q, k, v):
        k_all = torch.cat([k_cache[:, :, :length], k], dim=2)  # (B, Hkv, length + 1, D)
        v_all = torch.cat([v_cache[:, :, :length], v], dim=2)
        return attention_ref(q, k_all, v_all)

    def matches(seed, dtype=torch.float32, tol=1e-5):
        k_cache, v_cache, q, k, v = inputs(seed, dtype)
        want = expected(k_cache, v_cache, length, q, k, v)
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
        want = expected(k_cache, v_cache, length, q, k, v)
        k_cache[:, :, length + 1 :], v_cache[:, :, length + 1 :] = 30.0, -30.0  # stale values past the end
        assert_close(fn(k_cache, v_cache, length, q, k, v), want, what="o with stale values past column `length`")

    def random_case(ex, B, Hkv, group, D, length, S_max, dtype=torch.float32, sink=None):
        """Fresh inputs of the given shape with NaN in the stale columns; checks o and the slabs after the step.

        sink = (a, b): an "attention sink" of huge magnitude, q = noise + a u and one key (cached or new) = b u for a
        unit vector u, so its score a * b / sqrt(D) overflows a naive exp (and fp16 when a * b > 65504 sqrt(D)).
        """
        H = Hkv * group
        k_cache, v_cache = ex.randn(B, Hkv, S_max, D), ex.randn(B, Hkv, S_max, D)
        q, k, v = ex.randn(B, H, 1, D), ex.randn(B, Hkv, 1, D), ex.randn(B, Hkv, 1, D)
        if sink is not None:
            a, b = sink
            u = ex.randn(D)
            u = u / u.norm()
            q = q + a * u
            column = ex.rng.randint(0, length)  # a cached token, or the new one when column == length
            if column == length:
                k = (b * u).expand(B, Hkv, 1, D).clone()
            else:
                k_cache[:, :, column] = b * u
        k_cache, v_cache, q, k, v = (x.to(dtype) for x in (k_cache, v_cache, q, k, v))
        k_cache[:, :, length + 1 :], v_cache[:, :, length + 1 :] = float("nan"), float("nan")
        want = expected(k_cache, v_cache, length, q, k, v)
        want_k, want_v = k_cache[:, :, :length].clone(), v_cache[:, :, :length].clone()
        where = (f"B={B}, H={H}, Hkv={Hkv}, D={D}, length={length}, S_max={S_max}, {str(dtype).split('.')[1]}"
                 + (f", a key of norm {sink[1]} aligned with q" if sink else ""))
        got = fn(k_cache, v_cache, length, q, k, v)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # about one ulp of the output
        assert_close(got, want, atol=tol, rtol=tol, what=f"o ({where}; the columns past `length` hold NaN)")
        assert_equal(k_cache[:, :, :length], want_k, what=f"k_cache[:, :, :length] after the step ({where})")
        assert_equal(v_cache[:, :, :length], want_v, what=f"v_cache[:, :, :length] after the step ({where})")
        assert_equal(k_cache[:, :, length : length + 1], k, what=f"k_cache[:, :, length] after the step ({where})")
        assert_equal(v_cache[:, :, length : length + 1], v, what=f"v_cache[:, :, length] after the step ({where})")
        stale = torch.cat([k_cache[:, :, length + 1 :], v_cache[:, :, length + 1 :]], dim=2)
        assert bool(stale.isnan().all()), f"columns past `length` must stay untouched ({where}): they were written"

    with exercise("3.2", "one decode step over a KV cache") as ex:
        def shape():
            k_cache, v_cache, q, k, v = inputs(60)
            assert_shape(fn(k_cache, v_cache, length, q, k, v), (B, H, 1, D), what="o")

        ex.check("returns o of shape (B, H, 1, D)", shape)
        ex.check("writes k, v at column `length` and nothing else", writes_in_place)
        ex.check("o matches attention over the cached tokens plus the new one", lambda: matches(90))
        ex.check("columns past the new token are not read", ignores_unfilled_columns)
        ex.check("fp16 cache and inputs: fp16 output", lambda: matches(100, torch.float16, tol=2e-3))

        rng = ex.rng

        def grouped():  # Hkv >= 2 and H // Hkv >= 2 in both cases: head h must use KV head h // (H // Hkv)
            for _ in range(2):
                length = rng.randint(1, 20)
                random_case(ex, rng.randint(1, 3), rng.randint(2, 3), rng.randint(2, 4), rng.randint(2, 17), length,
                            length + 1 + rng.randint(0, 4))

        ex.check("random grouped-query shapes, odd head dims, NaN in the unfilled columns", grouped)

        def boundaries():
            S_max = rng.randint(2, 9)
            random_case(ex, 1, 1, rng.randint(2, 4), rng.randint(2, 16), 0, S_max)  # empty cache, MQA, B = 1
            random_case(ex, rng.randint(2, 3), rng.randint(1, 3), 1, rng.randint(2, 16), S_max - 1, S_max)  # full
            random_case(ex, 1, 1, 1, 1, rng.randint(0, 6), 7)  # every size 1 but the sequence
            length = rng.randint(0, 10)
            random_case(ex, rng.randint(1, 3), 2, 2, 8, length, length + 3, dtype=torch.bfloat16)

        ex.check("boundaries: empty cache (length 0), last free column, sizes of 1, bf16", boundaries)

        def extremes():
            for dtype, a in [(torch.float32, 30.0), (torch.float16, 600.0)]:
                length = rng.randint(1, 12)
                random_case(ex, rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 3), rng.randint(4, 16), length,
                            length + 1 + rng.randint(0, 3), dtype, sink=(a, a))

        ex.check("extreme magnitudes: a score that overflows exp in fp32 and q k^T in fp16 (compute in fp32, "
                 "subtract the max)", extremes)


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
            assert_equal(g, want, what=f"{what} of left_pad_batch({token_ids}, pad_token_id={pad})")

    with exercise("3.3", "position ids and masks for a left-padded batch") as ex:
        ex.check("one row: no padding", lambda: case([[5, 6, 7]], 0))
        ex.check("two rows of different lengths", lambda: case([[5, 6, 7, 8], [9, 10]], 0))
        ex.check("pads use pad_token_id", lambda: case([[5], [6, 7, 8]], 99))
        ex.check("four rows, the longest not first", lambda: case([[1, 2], [3, 4, 5, 6, 7], [8], [9, 10, 11]], 0))
        ex.check("the worked example: a real token equal to pad_token_id", lambda: case([[5, 6, 7], [8], [0, 9]], 0))

        rng = ex.rng

        def prompts(num_rows, lengths):
            return [[rng.randrange(50_000) for _ in range(n)] for n in lengths[:num_rows]]

        def random_batches():
            for _ in range(3):
                B = rng.randint(1, 6)
                case(prompts(B, [rng.randint(1, 12) for _ in range(B)]), rng.randrange(50_000))

        ex.check("random batches: 1 to 6 prompts of 1 to 12 tokens, a random pad id", random_batches)

        def pad_id_in_prompts():  # EOS often doubles as the pad token, and a prompt may contain it
            B = rng.randint(2, 5)
            token_ids = prompts(B, [rng.randint(1, 10) for _ in range(B)])
            row = rng.randrange(B)
            pad = token_ids[row][rng.randrange(len(token_ids[row]))]
            case(token_ids, pad)

        ex.check("pad_token_id also occurs as a real token in a prompt (e.g. EOS used as the pad)", pad_id_in_prompts)

        def one_fills_the_width():
            B, P = rng.randint(2, 6), rng.randint(2, 16)
            lengths = [1] * B
            lengths[rng.randrange(B)] = P
            case(prompts(B, lengths), rng.randrange(50_000))

        ex.check("one prompt fills the whole width, every other prompt has 1 token", one_fills_the_width)

        def same_length():
            for n in (1, rng.randint(2, 9)):
                B = rng.randint(1, 5)
                case(prompts(B, [n] * B), rng.randrange(50_000))

        ex.check("prompts of one length (1 token, then more): no padding, the mask is all True", same_length)


def check_kv_waste(fn: Callable) -> None:
    """Exercise 3.4. `fn(lengths, max_len, block_size) -> (contiguous_waste, paged_waste)`.

    lengths: the final lengths (prompt + output tokens) of a set of requests, each in [1, max_len]. A contiguous
    cache reserves max_len slots per request; a paged one reserves whole blocks of block_size slots per request,
    ceil(n / block_size) of them. Each waste is the fraction of its reservation that never holds a token.
    """
    from minillm.config import ModelConfig
    from minillm.kvcache.memory import contiguous_reservation, paged_reservation

    config = ModelConfig.tiny()  # the waste is a ratio of token counts: the bytes per token cancel

    def case(lengths, max_len, block_size):
        call = f"kv_waste({lengths}, max_len={max_len}, block_size={block_size})"
        got = fn(list(lengths), max_len, block_size)
        assert_equal(isinstance(got, (tuple, list)) and len(got), 2, what=f"number of values {call} returns")
        contiguous = contiguous_reservation(lengths, max_len, config)
        paged = paged_reservation(lengths, block_size, config)
        for g, plan, what in zip(got, (contiguous, paged), ("contiguous", "paged")):
            assert_close(float(g), plan.waste, atol=1e-9, rtol=1e-9,
                         what=f"{what} waste of {call} ({plan.used_tokens} tokens in {plan.reserved_tokens} "
                              f"reserved slots)")

    with exercise("3.4", "reserved but never filled") as ex:
        ex.check("the worked example", lambda: case([5, 16, 20], 32, 16))
        ex.check("lengths that are whole blocks: a paged cache wastes nothing", lambda: case([16, 32, 48], 64, 16))
        ex.check("lengths one past a block: BS - 1 idle slots in each last block", lambda: case([17, 33], 64, 16))
        ex.check("every request reaches max_len: a contiguous cache wastes nothing", lambda: case([8, 8, 8], 8, 3))
        ex.check("blocks of one token", lambda: case([3, 1, 7], 10, 1))

        rng = ex.rng

        def around_block_boundaries():
            for _ in range(3):
                BS = rng.randint(2, 32)
                lengths = [max(1, rng.randint(1, 8) * BS + d) for d in (-1, 0, 1, rng.randint(-BS + 1, BS - 1))]
                rng.shuffle(lengths)
                case(lengths, max(lengths) + rng.randint(0, 64), BS)

        ex.check("random lengths around block boundaries (k BS - 1, k BS, k BS + 1), random block sizes",
                 around_block_boundaries)

        def many_requests():
            for _ in range(2):
                max_len = rng.randint(1, 4096)
                lengths = [rng.randint(1, max_len) for _ in range(rng.randint(2, 64))]
                case(lengths, max_len, rng.choice([1, 3, 7, 16, 32, 64, 100, 256]))

        ex.check("a random mix of up to 64 requests, lengths 1 to max_len, odd block sizes", many_requests)

        def single_requests():
            BS = rng.randint(2, 64)
            n = rng.randint(0, 4) * BS + rng.randint(1, BS - 1)  # not a multiple of BS
            case([n], n + rng.randint(1, 100), BS)
            case([1], 1, rng.randint(2, 64))  # one token in a cache of one: a block holds it with BS - 1 idle

        ex.check("one request: a partial block, and a single token", single_requests)
