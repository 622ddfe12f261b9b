"""int8 paged KV cache: the block pools hold int8 codes plus one fp16 scale per token per KV head.

In doing so, you will learn about:
  * why quantize the cache and not only the weights: at long contexts and large batches the KV cache, not the
    weights, fills the GPU (Kwon et al., arXiv 2309.06180 §2), and decode attention reads all of it every step;
  * where the quantization sits in the data path: keys and values are quantized when they are *written* (after RoPE,
    so the cache stores exactly what attention reads), with ``minillm.quant.kv.quantize_kv``'s absmax scale per
    token per head, which needs no calibration; they are dequantized when they are *read*;
  * the cost: D int8 codes + one fp16 scale per vector, (D + 2) bytes instead of 2 * D in fp16 (4 * D in fp32),
    so the same memory holds ~2x (fp16) or ~3.8x (fp32) more tokens.
Reads dequantize only the blocks a step needs (each decoding sequence's block table, each prefill chunk's context)
into a small fp tensor and then call the same attention functions as ``PagedKVCache`` (the torch references, or
the Triton kernels with attention_backend="triton"). The dequantization itself is plain torch here, not fused into
the attention kernel as production engines do (vLLM's fp8/int8 paged attention); that is the next step, not a
different idea. Same interface as ``minillm.kvcache.paged.PagedKVCache``; ``LLM(kv_cache_dtype="int8")`` builds it.
Notebook 06 (``06_quantization``) measures its accuracy on the real model.
"""

from __future__ import annotations

import torch

from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.attention.varlen import flash_attention_varlen, flash_attention_varlen_ref
from minillm.kvcache.paged import BACKENDS, PagedBatch
from minillm.quant.kv import KV_SCALE_DTYPE, dequantize_kv, quantize_kv


class Int8PagedKVCache:
    """int8 K and V pools ``k_cache[layer]`` (NB, BS, Hkv, D) with fp16 scales ``k_scale[layer]`` (NB, BS, Hkv, 1).

    ``dtype`` (the model's compute dtype) is kept for the interface; the pools are int8 and `attend` dequantizes
    to q's dtype.
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
        attention_backend: str = "reference",
    ):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if attention_backend not in BACKENDS:
            raise ValueError(f"unknown attention_backend {attention_backend!r}; choose one of {BACKENDS}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.attention_backend = dtype, attention_backend
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)  # (L, NB, BS, Hkv, D)
        self.k_cache = torch.zeros(shape, dtype=torch.int8, device=device)
        self.v_cache = torch.zeros(shape, dtype=torch.int8, device=device)
        self.k_scale = torch.ones(shape[:-1] + (1,), dtype=KV_SCALE_DTYPE, device=device)  # (L, NB, BS, Hkv, 1)
        self.v_scale = torch.ones(shape[:-1] + (1,), dtype=KV_SCALE_DTYPE, device=device)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype | None = None
    ) -> int:
        """K and V of one block in every layer: 2 * L * BS * Hkv * (D + 2) bytes (codes + fp16 scale); `dtype`
        (the compute dtype) does not change it and is accepted only to match ``PagedKVCache.bytes_per_block``."""
        return 2 * num_layers * block_size * num_kv_heads * (head_dim + KV_SCALE_DTYPE.itemsize)

    @staticmethod
    def num_blocks_for_memory(
        memory_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype | None = None,
    ) -> int:
        """How many blocks fit in ``memory_bytes``."""
        return int(memory_bytes // Int8PagedKVCache.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim))

    @property
    def nbytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes + self.k_scale.nbytes + self.v_scale.nbytes

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst becomes a copy of block src (codes and scales), in every layer."""
        if not pairs:
            return
        src, dst = (torch.tensor(x, dtype=torch.long, device=self.k_cache.device) for x in zip(*pairs))
        for pool in (self.k_cache, self.v_cache, self.k_scale, self.v_scale):
            pool[:, dst] = pool[:, src]

    def _store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Quantize k, v (N, Hkv, D) and write codes and scales at their flat slots (-1 = don't write)."""
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        for x, codes_pool, scale_pool in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
            codes, scale = quantize_kv(x[keep])  # (n, Hkv, D) int8, (n, Hkv, 1) fp16
            codes_pool[layer_idx].view(-1, *codes_pool.shape[3:])[slots] = codes  # (NB * BS, Hkv, D) view
            scale_pool[layer_idx].view(-1, *scale_pool.shape[3:])[slots] = scale

    def _read(
        self, layer_idx: int, index: torch.Tensor, flat: bool, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V of the blocks (flat=False: index (B, max_blocks) -> (B * max_blocks, BS, Hkv, D))
        or of the slots (flat=True: index (S,) -> (S, Hkv, D)), in `dtype`."""
        out = []
        for codes_pool, scale_pool in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale)):
            codes, scale = codes_pool[layer_idx], scale_pool[layer_idx]  # (NB, BS, Hkv, D), (NB, BS, Hkv, 1)
            if flat:
                codes, scale = codes.view(-1, *codes.shape[2:]), scale.view(-1, *scale.shape[2:])
            else:
                index = index.reshape(-1).long()
            out.append(dequantize_kv(codes[index], scale[index], dtype))
        return out[0], out[1]

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch
    ) -> torch.Tensor:
        """Quantize and store the new k, v (1, Hkv, N, D), then attend q (1, H, N, D) to the dequantized caches.

        Returns o (1, H, N, D). Batch layout as in ``PagedBatch``; the new tokens too are read back quantized, so
        a token sees exactly the cache a later step will see.
        """
        if q.dim() != 4 or q.shape[0] != 1 or k.shape != v.shape or k.shape[0] != 1 or k.shape[2:] != q.shape[2:]:
            raise ValueError(
                f"paged attend takes a packed batch: q (1, H, N, D), k, v (1, Hkv, N, D); got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if k.shape[1] != self.num_kv_heads:
            raise ValueError(f"k has {k.shape[1]} KV heads, the cache {self.num_kv_heads}")
        triton = self.attention_backend == "triton"
        self._store(layer_idx, k[0].transpose(0, 1), v[0].transpose(0, 1), batch.slot_mapping)  # (N, Hkv, D)

        plan = batch.plan(self.block_size)
        out = torch.empty_like(q)
        if plan.decode_rows is not None:  # (B_dec, H, D): one query per sequence
            q_dec = q[0].transpose(0, 1) if plan.decode_tokens is None else q[0, :, plan.decode_tokens].transpose(0, 1)
            tables, lens = batch.block_tables, batch.context_lens
            if plan.decode_tokens is not None:  # a mixed step: only the decoding sequences' rows
                tables, lens = tables[plan.decode_rows], lens[plan.decode_rows]
            # Dequantize just these sequences' blocks into a small pool (B_dec * max_blocks, BS, Hkv, D) whose
            # block tables are simply 0, 1, 2, ...
            k_pool, v_pool = self._read(layer_idx, tables, flat=False, dtype=q.dtype)
            local = torch.arange(tables.numel(), dtype=torch.int32, device=tables.device).view(tables.shape)
            if triton:
                o_dec = paged_decode_attention(q_dec, k_pool, v_pool, local, lens, max_context_len=plan.decode_max_len)
            else:
                o_dec = paged_decode_attention_ref(q_dec, k_pool, v_pool, local, lens)
            if plan.decode_tokens is None:
                out[0] = o_dec.transpose(0, 1)
            else:
                out[0, :, plan.decode_tokens] = o_dec.transpose(0, 1)
        if plan.prefill_tokens is not None:  # every chunk's whole context, dequantized into (sum S, Hkv, D)
            k_ctx, v_ctx = self._read(layer_idx, plan.prefill_slots, flat=True, dtype=q.dtype)
            q_pre = q[0, :, plan.prefill_tokens].transpose(0, 1).contiguous()  # (sum T, H, D)
            varlen = flash_attention_varlen if triton else flash_attention_varlen_ref
            o_pre = varlen(
                q_pre, k_ctx, v_ctx, plan.prefill_cu_q, plan.prefill_cu_k, plan.prefill_max_q, plan.prefill_max_k
            )
            out[0, :, plan.prefill_tokens] = o_pre.transpose(0, 1)
        return out
