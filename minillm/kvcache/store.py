"""Writing new K/V into a paged cache: one scatter through the slot mapping.

Teaches: the write half of PagedAttention (Kwon et al., SOSP 2023, arXiv:2309.06180, section 4.1; vLLM's
``reshape_and_cache`` kernel). Each new token's key and value go to slot ``slot_mapping[n]`` of the flat pool
``(NB * BS, Hkv, D)``, wherever its block happens to live; slot -1 means "padding, don't write". A Triton kernel does
it with one program per token, and ``store_kv_ref`` with one indexed assignment. Explained in
notebooks/04_paged_attention.ipynb.
"""

import torch

from minillm._triton import HAS_TRITON, record_launch, require_triton, tl, triton

if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(
        # Pointers
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        # Sizes
        HKV, D,
        # Strides
        stride_kn, stride_kh, stride_kd,
        stride_vn, stride_vh, stride_vd,
        stride_cb, stride_ct, stride_ch, stride_cd,
        stride_vcb, stride_vct, stride_vch, stride_vcd,
        # Meta-parameters
        BS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + n).to(tl.int64)  # int64: NB * BS * Hkv * D can pass 2**31 elements
        if slot >= 0:
            block, offset = slot // BS, slot % BS
            offs_h = tl.arange(0, BLOCK_H)
            offs_d = tl.arange(0, BLOCK_D)
            mask = (offs_h[:, None] < HKV) & (offs_d[None, :] < D)  # [BLOCK_H, BLOCK_D]
            k = tl.load(k_ptr + n * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
            v = tl.load(v_ptr + n * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
            k_dst = k_cache_ptr + block * stride_cb + offset * stride_ct
            v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct
            tl.store(k_dst + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd, k, mask=mask)
            tl.store(v_dst + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd, v, mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping):
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be (N, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"caches must be (NB, BS, Hkv, D) = (NB, BS, {k.shape[1]}, {k.shape[2]}), "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be ({k.shape[0]},) int32/int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(f"k/v dtype {k.dtype}/{v.dtype} must match the cache dtype {k_cache.dtype}/{v_cache.dtype}")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"k, v, caches and slot_mapping must share one device, got {devices}")


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v (N, Hkv, D) into k_cache, v_cache (NB, BS, Hkv, D) at flat slots ``slot_mapping`` (N,), in place."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]  # (NB * BS, Hkv, D) view of the pool
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def plan(Hkv: int, D: int) -> dict:
    """The launch choices: one [BLOCK_H, BLOCK_D] tile holds a token's K (or V) for every KV head."""
    # One small tile per program and no loop to pipeline: the same on every GPU.
    return dict(BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(D), num_warps=4, num_stages=1)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton version of ``store_kv_ref`` (raises where Triton cannot run)."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    require_triton(k.device, "store_kv")
    n, hkv, d = k.shape
    if n == 0:
        return
    record_launch("store_kv")
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        hkv, d,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        BS=k_cache.shape[1], **plan(hkv, d),
    )
