"""Paged KV cache: block pools per layer, storage only.

Teaches: the storage side of PagedAttention (Kwon et al., SOSP 2023, arXiv:2309.06180, section 4). Every layer owns
one K pool and one V pool of shape (NB, BS, Hkv, D); a sequence's tokens are scattered over blocks named by its block
table (kept by ``minillm.kvcache.blocks.BlockManager``). The pool offers what attention needs and nothing more: store
new K/V at flat slots, hand out the blocks for decode attention to read where they lie, gather the K/V of given slots
into one packed tensor (prefill chunks), copy blocks (copy-on-write), and its size. Attention itself -- splitting a
step into decodes and prefill chunks, picking kernels -- is ``minillm.attention.backends.PagedAttention``.
Explained in notebooks/04_paged_attention.ipynb; the engine (notebook 05) builds the batches.
"""

from types import SimpleNamespace

import torch

from minillm.kvcache.blocks import check_block_size
from minillm.kvcache.memory import check_fits, format_bytes, kv_bytes_per_token
from minillm.kvcache.store import store_kv, store_kv_ref


class PagedKVCache:
    """K and V block pools for every layer: ``k_cache[layer]``, ``v_cache[layer]`` are (NB, BS, Hkv, D)."""

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
        check_block_size(block_size)
        for name, value in [("num_layers", num_layers), ("num_blocks", num_blocks), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        per_block = type(self).bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        check_fits(num_blocks * per_block, device, f"a paged KV pool of {num_blocks} blocks of {block_size} tokens",
                   f"pass fewer num_kv_blocks ({format_bytes(per_block)} each) or a smaller block_size, or "
                   "num_kv_blocks=None to size the pool from memory")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)  # (L, NB, BS, Hkv, D)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.pools = [self.k_cache, self.v_cache]  # everything indexed (L, NB, ...): what copy-on-write copies

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one block in every layer: BS tokens of ``kvcache.memory.kv_bytes_per_token`` (2 * L * Hkv * D *
        bytes per element)."""
        shape = SimpleNamespace(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
        return block_size * kv_bytes_per_token(shape, dtype)

    @classmethod
    def num_blocks_for_memory(
        cls, memory_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """How many blocks fit in ``memory_bytes`` (e.g. a fraction of ``torch.cuda.mem_get_info()[0]``)."""
        return int(memory_bytes // cls.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype))

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    @property
    def nbytes(self) -> int:
        return sum(pool.nbytes for pool in self.pools)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst becomes a copy of block src, in every layer, for each (src, dst) pair."""
        if not pairs:
            return
        src, dst = (torch.tensor(x, dtype=torch.long, device=self.k_cache.device) for x in zip(*pairs))
        for pool in self.pools:
            pool[:, dst] = pool[:, src]

    # ---- how K/V go in and come out: the three places a cache with another storage format changes -------------
    def store(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, use_triton: bool = False
    ) -> None:
        """Write k, v (N, Hkv, D) at their flat pool slots (-1 = don't write), with the Triton kernel if asked."""
        store = store_kv if use_triton else store_kv_ref
        store(k, v, self.k_cache[layer_idx], self.v_cache[layer_idx], slot_mapping)

    def read_blocks(
        self, layer_idx: int, block_tables: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What decode attention reads: K and V pools (NB, BS, Hkv, D) and the block tables into them.

        Here the layer's pools themselves, untouched: paged attention reads the blocks where they lie.
        """
        return self.k_cache[layer_idx], self.v_cache[layer_idx], block_tables

    def read_slots(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at flat pool slots (S,) -> (S, Hkv, D) each, gathered into one packed tensor."""
        k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]  # (NB, BS, Hkv, D)
        return k_cache.view(-1, *k_cache.shape[2:])[slots], v_cache.view(-1, *v_cache.shape[2:])[slots]
