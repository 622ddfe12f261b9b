"""int8 paged KV cache: the block pools hold int8 codes plus one fp16 scale per token per KV head.

In doing so, you will learn about:
  * why quantize the cache and not only the weights: at long contexts and large batches the KV cache, not the
    weights, fills the GPU (Kwon et al., arXiv 2309.06180 §2), and decode attention reads all of it every step;
  * where the quantization sits in the data path: keys and values are quantized when they are *written* (after RoPE,
    so the cache stores exactly what attention reads), with ``minillm.quant.kv.quantize_kv``'s absmax scale per
    token per head, which needs no calibration; they are dequantized when they are *read*;
  * the cost: D int8 codes + one fp16 scale per vector, (D + 2) bytes instead of 2 * D in fp16 (4 * D in fp32),
    so the same memory holds ~2x (fp16) or ~3.8x (fp32) more tokens.
Only the storage changes: this is a ``PagedKVCache`` whose three storage methods quantize on write (``store``) and
dequantize on read (``read_blocks`` for decode, ``read_slots`` for prefill chunks), so the attention backend
(``minillm.attention.backends.PagedAttention``), its step metadata and kernels are the ones notebook 04 built.
Reads dequantize only the blocks a step needs into a small fp tensor; the dequantization is plain torch here, not fused into the attention kernel as production engines do (vLLM's fp8/int8 paged attention):
that is the next step, not a different idea. ``LLM(kv_cache_dtype="int8")`` builds it. Notebook 06
(``06_quantization``) measures its accuracy on the real model.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from minillm.kvcache.memory import kv_bytes_per_token
from minillm.kvcache.paged import PagedKVCache
from minillm.quant.kv import KV_SCALE_DTYPE, dequantize_kv, quantize_kv


class Int8PagedKVCache(PagedKVCache):
    """int8 K and V pools ``k_cache[layer]`` (NB, BS, Hkv, D) with fp16 scales ``k_scale[layer]`` (NB, BS, Hkv, 1).

    ``dtype`` is the model's compute dtype, what reads dequantize to; the pools themselves are int8.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, torch.int8, device)
        self.dtype = dtype
        scale_shape = self.k_cache.shape[:-1] + (1,)  # (L, NB, BS, Hkv, 1)
        self.k_scale = torch.ones(scale_shape, dtype=KV_SCALE_DTYPE, device=device)
        self.v_scale = torch.ones(scale_shape, dtype=KV_SCALE_DTYPE, device=device)
        self.pools += [self.k_scale, self.v_scale]  # copy-on-write copies a block's scales with its codes

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype | None = None
    ) -> int:
        """K and V of one block in every layer: 2 * L * BS * Hkv * (D + 2) bytes (codes + fp16 scale), from
        ``kvcache.memory.kv_bytes_per_token(..., int8=True)``; `dtype` (the compute dtype) does not change it and is
        accepted only to match ``PagedKVCache.bytes_per_block``."""
        shape = SimpleNamespace(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
        return block_size * kv_bytes_per_token(shape, int8=True)

    def store(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, use_triton: bool = False
    ) -> None:
        """Quantize k, v (N, Hkv, D) and write codes and scales at their flat slots (-1 = don't write).

        The new tokens too are read back quantized, so a token sees exactly the cache a later step will see. The
        quantizing write is plain torch: `use_triton` is accepted for the same signature and changes nothing.
        """
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        for x, codes_pool, scale_pool in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
            codes, scale = quantize_kv(x[keep])  # (n, Hkv, D) int8, (n, Hkv, 1) fp16
            codes_pool[layer_idx].view(-1, *codes_pool.shape[3:])[slots] = codes  # (NB * BS, Hkv, D) view
            scale_pool[layer_idx].view(-1, *scale_pool.shape[3:])[slots] = scale

    def read_blocks(
        self, layer_idx: int, block_tables: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantize just the blocks these tables name into a small pool (B * max_blocks, BS, Hkv, D) in `dtype`;
        its block tables are then simply 0, 1, 2, ..."""
        blocks = block_tables.reshape(-1).long()
        k_pool = dequantize_kv(self.k_cache[layer_idx][blocks], self.k_scale[layer_idx][blocks], dtype)
        v_pool = dequantize_kv(self.v_cache[layer_idx][blocks], self.v_scale[layer_idx][blocks], dtype)
        local = torch.arange(blocks.numel(), dtype=torch.int32, device=blocks.device).view(block_tables.shape)
        return k_pool, v_pool, local

    def read_slots(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V at flat pool slots (S,) -> (S, Hkv, D) each, in `dtype`."""
        out = []
        for codes_pool, scale_pool in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale)):
            codes, scale = codes_pool[layer_idx], scale_pool[layer_idx]  # (NB, BS, Hkv, D), (NB, BS, Hkv, 1)
            flat_codes, flat_scale = codes.view(-1, *codes.shape[2:]), scale.view(-1, *scale.shape[2:])
            out.append(dequantize_kv(flat_codes[slots], flat_scale[slots], dtype))
        return out[0], out[1]
