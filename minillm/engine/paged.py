"""PagedEngine: the engine loop (``engine/engine.py``) over a paged KV pool.

It builds the pieces chapters 04-05 teach -- a ``BlockManager``, a ``PagedKVCache`` (or its int8 twin, chapter 06),
a ``PagedAttention`` backend over both, and a ``Scheduler`` -- and hands them to ``Engine``, whose ``step()`` runs
schedule -> prepare -> model -> commit -> sample -> free. Notebook 05 (``05_continuous_batching``) runs it step by
step.

Sizing the pool (``num_kv_blocks=None``): on a GPU, ``GPU_MEMORY_FRACTION`` of the memory still free once the
weights are loaded (the rest is left for activations: the (N, V) logits of a 2048-token step alone are ~200 MB);
on a CPU, ``CPU_KV_CACHE_BYTES``. Either way no more than every sequence at full length would need
(``max_num_seqs * max_model_len`` tokens), since more could never be used.
"""

from __future__ import annotations

import torch

from minillm.attention.backends import PagedAttention
from minillm.engine.engine import Engine
from minillm.engine.scheduler import Scheduler
from minillm.kvcache.blocks import BlockManager, check_block_size
from minillm.kvcache.paged import PagedKVCache
from minillm.kvcache.paged_int8 import Int8PagedKVCache

KV_CACHE_DTYPES = (None, "int8")  # None: the model's dtype; "int8": kvcache/paged_int8.py (notebook 06)

GPU_MEMORY_FRACTION = 0.8
CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~1,450 blocks of 16 tokens for SmolLM2-135M in fp32 (23k tokens)


def default_num_kv_blocks(
    model, block_size: int, max_num_seqs: int, max_model_len: int, cache_cls: type = PagedKVCache
) -> int:
    """How many KV blocks to allocate when the user did not say (see the module docstring)."""
    cfg, param = model.config, next(model.parameters())
    per_block = cache_cls.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, param.dtype)
    if param.device.type == "cuda":
        memory = int(GPU_MEMORY_FRACTION * torch.cuda.mem_get_info(param.device)[0])
    else:
        memory = CPU_KV_CACHE_BYTES
    useful = max_num_seqs * -(-max_model_len // block_size)
    return max(1, min(memory // per_block, useful))


class PagedEngine(Engine):
    """The engine loop (``engine/engine.py``) over a paged KV pool: block manager, pool and paged attention."""

    def __init__(
        self,
        model,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        scheduler: str = "continuous",
        attention_backend: str = "reference",
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
        kv_cache_dtype: str | None = None,
    ):
        cfg, param = model.config, next(model.parameters())
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of {KV_CACHE_DTYPES}")
        cache_cls = Int8PagedKVCache if kv_cache_dtype == "int8" else PagedKVCache
        check_block_size(block_size)
        if num_kv_blocks is None:
            num_kv_blocks = default_num_kv_blocks(
                model, block_size, max_num_seqs, max_model_len or cfg.max_position_embeddings, cache_cls
            )
        if not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be a positive int or None (derive it), got {num_kv_blocks!r}")
        # The pool first: it refuses a size the device cannot hold before anything is allocated.
        self.kv_cache = cache_cls(
            cfg.num_layers, num_kv_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=param.dtype,
            device=param.device,
        )
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, scheduler, enable_chunked_prefill)
        super().__init__(model, scheduler, PagedAttention(self.kv_cache, self.block_manager, attention_backend))

    def stats(self) -> dict:
        """The engine loop's counts, and the block pool's: blocks in use (now, at the peak, per step), the prefix-cache
        hit rate of the last run, and the waste at the step where the most blocks were in use, as reserved-but-unfilled
        slots over reserved slots."""
        bm = self.block_manager
        hits, queries = bm.prefix_cache_hits - self._run_base[1], bm.prefix_cache_queries - self._run_base[2]
        loop = super().stats()
        return {
            "scheduler": loop.pop("scheduler"),
            "block_size": bm.block_size,
            "kv_cache_bytes": self.kv_cache.nbytes,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_peak": self.kv_blocks_peak,
            "kv_waste_pct": self.kv_waste_pct,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            **loop,
            "kv_blocks_used_history": list(self.kv_blocks_used_history),
        }
