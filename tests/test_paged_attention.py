"""Paged decode attention and the K/V store: Triton kernels (interpreter on CPU) against their torch references."""

import math

import pytest
import torch

from minillm._triton import triton_available
from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.kvcache.store import store_kv, store_kv_ref

needs_triton = pytest.mark.skipif(not triton_available("cpu") and not torch.cuda.is_available(), reason="no Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_paged(B, H, Hkv, D, BS, max_len, dtype, seed=0, device=DEVICE):
    """Random q, pools and block tables whose blocks are a random permutation (no two sequences share a block)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (B,), generator=g)
    lens[0] = max_len  # always one sequence at full length, one odd length
    blocks_per_seq = [-(-int(n) // BS) for n in lens]
    max_blocks, NB = max(blocks_per_seq), sum(blocks_per_seq) + 3
    perm = torch.randperm(NB, generator=g).tolist()
    tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)])
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k_cache = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), to(tables), to(lens.int())


def test_reference_matches_contiguous_attention():
    q, k_cache, v_cache, tables, lens = random_paged(3, 6, 2, 16, 4, 23, torch.float64, device="cpu")
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens)
    for b in range(3):
        s = int(lens[b])
        k = k_cache[tables[b].long()].reshape(-1, 2, 16)[:s].repeat_interleave(3, dim=1)  # (S, H, D)
        v = v_cache[tables[b].long()].reshape(-1, 2, 16)[:s].repeat_interleave(3, dim=1)
        p = torch.softmax(torch.einsum("hd,shd->hs", q[b], k) / math.sqrt(16), dim=-1)
        torch.testing.assert_close(out[b], torch.einsum("hs,shd->hd", p, v))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B, H, Hkv, D, BS, max_len",
    [
        (3, 4, 4, 16, 4, 37),  # MHA, block size below a token tile
        (2, 6, 2, 32, 16, 70),  # GQA ratio 3, long enough for several tiles
        (4, 3, 1, 24, 8, 19),  # MQA, head dim not a power of two
        (1, 2, 2, 16, 1, 9),  # one token per block
    ],
)
@pytest.mark.parametrize("num_splits", [1, None, 3])
def test_kernel_matches_reference(B, H, Hkv, D, BS, max_len, dtype, num_splits):
    q, k_cache, v_cache, tables, lens = random_paged(B, H, Hkv, D, BS, max_len, dtype, seed=B * 100 + max_len)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=num_splits)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens)
    assert out.dtype == dtype and out.shape == (B, H, D)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
def test_kernel_custom_scale_and_shared_blocks():
    q, k_cache, v_cache, tables, lens = random_paged(2, 4, 2, 16, 4, 12, torch.float32)
    tables[1] = tables[0]  # two sequences reading the same blocks (a shared prefix) is fine for a reader
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=0.3)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale=0.3))


def test_launcher_errors():
    q, k_cache, v_cache, tables, lens = random_paged(2, 4, 2, 16, 4, 12, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(q, k_cache[:, :3], v_cache[:, :3], tables, lens)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(q[:, :3], k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, k_cache, v_cache, tables.long(), lens)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens[:1])
    with pytest.raises(TypeError, match="dtype"):
        paged_decode_attention(q.half(), k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention(q[..., :8], k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError, match=r"\(B, H, D\)"):
        paged_decode_attention(q[None], k_cache, v_cache, tables, lens)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kernel_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    N, NB, BS, Hkv, D = 7, 5, 4, 3, 24
    k, v = torch.randn(2, N, Hkv, D, generator=g).to(dtype).to(DEVICE)
    slots = torch.randperm(NB * BS, generator=g)[:N]
    slots[3] = -1  # padding: not written
    slots = slots.to(DEVICE)
    caches = [torch.zeros(NB, BS, Hkv, D, dtype=dtype, device=DEVICE) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    flat = caches[0].view(-1, Hkv, D)
    assert torch.equal(flat[slots[0]], k[0]) and flat.abs().sum(dim=(1, 2)).count_nonzero() == N - 1


def test_store_errors():
    k = torch.zeros(3, 2, 16)
    cache = torch.zeros(4, 4, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, k, cache, cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        store_kv(k.half(), k.half(), cache, cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="caches"):
        store_kv(k, k, cache[:, :, :1], cache[:, :, :1], torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_real_sizes_gpu(dtype):
    """SmolLM2-like heads (H=9, Hkv=3, D=64), long and short contexts, split-K chosen by the launcher."""
    q, k_cache, v_cache, tables, lens = random_paged(8, 9, 3, 64, 16, 4000, dtype, device="cuda")
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens), atol=2e-2, rtol=2e-2)


def test_bench_builds_the_same_kv_paged_and_contiguous():
    from minillm.bench.paged import kv_bytes, make_inputs

    q, k, v, k_cache, v_cache, tables, lens = make_inputs(2, 37, 4, 2, 16, 8, torch.float32, torch.device("cpu"))
    expected = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(paged_decode_attention_ref(q, k_cache, v_cache, tables, lens), expected)
    assert sorted(tables.flatten().tolist()) == list(range(k_cache.shape[0]))  # every block used exactly once
    assert kv_bytes(2, 37, 2, 16, torch.bfloat16) == 2 * 2 * 37 * 2 * 16 * 2
