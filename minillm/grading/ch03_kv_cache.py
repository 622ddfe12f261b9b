"""Chapter 3 checks (KV cache), used by solutions/03_kv_cache.ipynb.

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
    "check_kv_bytes_per_token",
    "check_decode_step",
    "check_left_pad_batch",
]

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
