"""Online-softmax attention in plain PyTorch: the FlashAttention loop, one tile at a time, before any Triton.

This module teaches the online softmax (Milakov & Gimelshein, arXiv:1805.02867, §3) and how FlashAttention uses it
to compute exact attention without ever holding the T x S score matrix (Dao et al., arXiv:2205.14135, §3.1;
FlashAttention-2, arXiv:2307.08691, §3.1, whose loop order — a Q tile stays put while K/V tiles stream past — is
the one used here and in `flash.py`).

For each query row we keep three running quantities over the keys seen so far:
  m_i  the largest score,
  l_i  the sum of exp(score - m_i),
  acc  the sum of exp(score - m_i) * v.
When a new block of scores arrives with a larger maximum, the old sums are rescaled by alpha = exp(m_old - m_new);
at the end o = acc / l_i. The loops below are the kernel's loops: `flash.py` does the same with exp2 instead of exp
(log2(e) folded into the scale) and one GPU program per Q tile. Notebook 02_attention derives and checks each step.
"""

import torch

from minillm.attention.reference import check_attention_inputs, repeat_kv

# Tile kinds in a causal attention grid, as drawn in notebook 02_attention.
TILE_SKIPPED, TILE_FULL, TILE_MASKED = 0, 1, 2


def online_softmax_step(
    m_i: torch.Tensor, l_i: torch.Tensor, acc: torch.Tensor, s: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one block of scores into the running softmax state.

    m_i, l_i: (..., T) running max and running sum (start at -inf and 0).
    acc: (..., T, D) running sum of exp(s - m_i) v (starts at 0).
    s: (..., T, BN) this block's scaled scores, -inf where masked; v: (..., BN, D) this block's values.
    Returns the new (m_i, l_i, acc). After the last block, acc / l_i is softmax(all scores) @ all values.
    """
    m_new = torch.maximum(m_i, s.amax(dim=-1))
    # A row that has only seen masked keys still has m = -inf; subtract 0 instead so exp gives 0 rather than NaN.
    m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m_i - m_safe)  # rescales the old sums to the new maximum
    p = torch.exp(s - m_safe[..., None])  # (..., T, BN)
    l_new = alpha * l_i + p.sum(dim=-1)
    acc_new = alpha[..., None] * acc + p @ v
    return m_new, l_new, acc_new


def causal_tile_range(m0: int, block_m: int, T: int, S: int, block_n: int, causal: bool) -> tuple[int, int]:
    """Which keys a Q tile starting at row m0 visits: (full_end, hi).

    Keys [0, full_end) are visible to every row of the tile, in whole K tiles: no mask needed.
    Keys [full_end, hi) need the mask (the diagonal, or the tail past S). Keys >= hi are skipped: no row sees them.
    """
    if not causal:
        return S // block_n * block_n, S
    offset = S - T  # bottom-right alignment: query i sits at position i + offset
    full_end = max(0, min(m0 + offset + 1, S)) // block_n * block_n
    hi = max(0, min(m0 + block_m + offset, S))
    return full_end, hi


def causal_tile_map(T: int, S: int, block_m: int, block_n: int, causal: bool = True) -> torch.Tensor:
    """(num Q tiles, num K tiles) int map of TILE_SKIPPED / TILE_FULL / TILE_MASKED, for drawing the tiling."""
    num_m, num_n = -(-T // block_m), -(-S // block_n)
    tiles = torch.full((num_m, num_n), TILE_SKIPPED, dtype=torch.int64)
    for tm in range(num_m):
        full_end, hi = causal_tile_range(tm * block_m, block_m, T, S, block_n, causal)
        tiles[tm, : full_end // block_n] = TILE_FULL
        tiles[tm, full_end // block_n : -(-hi // block_n)] = TILE_MASKED
    return tiles


def online_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Exact attention computed tile by tile with the online softmax (same result as `attention_ref`).

    q: (B, H, T, D); k, v: (B, Hkv, S, D). Causal is bottom-right aligned. Works in fp32, returns q's dtype.
    block_m, block_n: the Q tile and K/V tile sizes, as in the kernel.
    """
    check_attention_inputs(q, k, v)
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block sizes must be positive, got block_m={block_m}, block_n={block_n}")
    B, H, T, D = q.shape
    S = k.shape[2]
    if scale is None:
        scale = D**-0.5
    # The kernel indexes KV head h // (H // Hkv) instead of copying; copying keeps this loop short.
    kf = repeat_kv(k.float(), H // k.shape[1])  # (B, H, S, D)
    vf = repeat_kv(v.float(), H // k.shape[1])  # (B, H, S, D)
    o = torch.empty(B, H, T, D, dtype=torch.float32, device=q.device)
    for m0 in range(0, T, block_m):  # one GPU program per Q tile in the kernel
        q_tile = q[:, :, m0 : m0 + block_m].float() * scale  # (B, H, BM, D)
        rows = torch.arange(m0, m0 + q_tile.shape[2], device=q.device)  # (BM,)
        m_i = torch.full(q_tile.shape[:3], float("-inf"), device=q.device)  # (B, H, BM)
        l_i = torch.zeros(q_tile.shape[:3], device=q.device)  # (B, H, BM)
        acc = torch.zeros(q_tile.shape, device=q.device)  # (B, H, BM, D)
        full_end, hi = causal_tile_range(m0, block_m, T, S, block_n, causal)
        for n0 in range(0, hi, block_n):  # K/V tiles past `hi` are never loaded
            s = q_tile @ kf[:, :, n0 : n0 + block_n].transpose(-2, -1)  # (B, H, BM, BN)
            if causal and n0 + block_n > full_end:  # only tiles on the diagonal pay for the mask
                cols = torch.arange(n0, n0 + s.shape[-1], device=q.device)
                s = s.masked_fill(cols[None, :] > rows[:, None] + (S - T), float("-inf"))
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, vf[:, :, n0 : n0 + block_n])
        # One write of O per tile; rows that saw no key at all (T > S) get zeros.
        o[:, :, m0 : m0 + block_m] = acc / torch.where(l_i == 0, torch.ones_like(l_i), l_i)[..., None]
    return o.to(q.dtype)
