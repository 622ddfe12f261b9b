"""Paged KV cache: block pools per layer, and attention over a packed batch that reads and writes them.

Teaches: the storage side of PagedAttention (Kwon et al., SOSP 2023, arXiv:2309.06180, section 4). Every layer owns
one K pool and one V pool of shape (NB, BS, Hkv, D); a sequence's tokens are scattered over blocks named by its block
table (kept by ``minillm.kvcache.blocks.BlockManager``). One model step processes a *packed* batch: the N new tokens
of several sequences laid end to end (prefill chunks and single decode tokens, no padding, as in Orca's
iteration-level batching, OSDI 2022, and Sarathi-Serve's chunked prefill, arXiv:2403.02310). ``PagedBatch`` carries
that step's metadata explicitly; ``PagedKVCache.attend`` writes the new K/V into their slots, then
  * batches all decode sequences (one query token each) into one ``paged_decode_attention`` call, and
  * gathers the contexts of all prefill chunks from the blocks into one packed tensor and runs variable-length
    causal attention, bottom-right aligned (a chunk's T new queries see the S - T cached tokens before them plus
    the causal part of the chunk; FlashAttention's varlen interface, arXiv:2307.08691).
Explained in notebooks/04_paged_attention.ipynb; the engine (notebook 05) builds the batches.
"""

from dataclasses import dataclass, field

import torch

from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.attention.varlen import flash_attention_varlen, flash_attention_varlen_ref
from minillm.kvcache.store import store_kv, store_kv_ref

BACKENDS = ("reference", "triton")


@dataclass
class PagedBatch:
    """One step's metadata for a packed batch of N new tokens from ``num_seqs`` sequences (all on the cache device).

    slot_mapping: (N,) int64, flat pool slot of each new token's K/V (``block * BS + offset``; -1 = don't write).
    cu_seqlens_q: (num_seqs + 1,) int32, sequence i's new tokens are packed rows [cu[i], cu[i + 1]).
    context_lens: (num_seqs,) int32, tokens of sequence i in the cache AFTER this step's writes (cached + new).
    block_tables: (num_seqs, max_blocks) int32, padded with 0 past each table's end (never read there).
    query_lens_host, context_lens_host: optional host copies of the lengths; ``attend`` needs them on the host to
        split decodes from prefills, and reading them back from the GPU every layer would cost a sync each.
    """

    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seqlen_q: int
    max_context_len: int
    query_lens_host: list[int] | None = field(default=None, repr=False)
    context_lens_host: list[int] | None = field(default=None, repr=False)
    _plan: "StepPlan | None" = field(default=None, init=False, repr=False)

    @classmethod
    def build(
        cls,
        slot_mapping: list[int],
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        device: torch.device | str = "cpu",
    ) -> "PagedBatch":
        """Make the tensors from host lists (one transfer each) and keep the host lengths."""
        if not len(query_lens) == len(context_lens) == len(block_tables):
            raise ValueError(
                f"one entry per sequence needed: {len(query_lens)} query_lens, {len(context_lens)} context_lens, "
                f"{len(block_tables)} block_tables"
            )
        if sum(query_lens) != len(slot_mapping):
            raise ValueError(f"slot_mapping has {len(slot_mapping)} entries but query_lens sum to {sum(query_lens)}")
        if any(not 1 <= t <= s for t, s in zip(query_lens, context_lens)):
            raise ValueError(f"need 1 <= query_len <= context_len per sequence, got {query_lens} and {context_lens}")
        cu = [0]
        for t in query_lens:
            cu.append(cu[-1] + t)
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(block_tables), max_blocks),
            max_seqlen_q=max(query_lens, default=0),
            max_context_len=max(context_lens, default=0),
            query_lens_host=list(query_lens),
            context_lens_host=list(context_lens),
        )

    def plan(self, block_size: int) -> "StepPlan":
        """Index tensors that split this step into decodes and prefill chunks; built once, reused by every layer."""
        if self._plan is None or self._plan.block_size != block_size:
            self._plan = StepPlan.build(self, block_size)
        return self._plan

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def host_lens(self) -> tuple[list[int], list[int]]:
        """(query_lens, context_lens) as host lists, read back from the tensors once if not given."""
        if self.query_lens_host is None or self.context_lens_host is None:
            cu = self.cu_seqlens_q.tolist()
            self.query_lens_host = [b - a for a, b in zip(cu[:-1], cu[1:])]
            self.context_lens_host = self.context_lens.tolist()
        return self.query_lens_host, self.context_lens_host


@dataclass
class StepPlan:
    """Where the decodes and the prefill chunks of one ``PagedBatch`` sit (device index tensors, None = none).

    decode_rows: (B_dec,) which sequences decode; decode_tokens: their packed rows (None when every token decodes).
    prefill_tokens: (sum T,) packed rows of the prefill chunks; prefill_slots: (sum S,) pool slots of their whole
    contexts, sequence after sequence; prefill_cu_q, prefill_cu_k: (P + 1,) int32 cumulative T and S.
    """

    block_size: int
    decode_rows: torch.Tensor | None = None
    decode_tokens: torch.Tensor | None = None
    decode_max_len: int = 0
    prefill_tokens: torch.Tensor | None = None
    prefill_slots: torch.Tensor | None = None
    prefill_cu_q: torch.Tensor | None = None
    prefill_cu_k: torch.Tensor | None = None
    prefill_max_q: int = 0
    prefill_max_k: int = 0

    @classmethod
    def build(cls, batch: PagedBatch, block_size: int) -> "StepPlan":
        query_lens, context_lens = batch.host_lens()
        device = batch.block_tables.device
        starts = [0]
        for t in query_lens:
            starts.append(starts[-1] + t)
        plan = cls(block_size)
        decodes = [i for i, t in enumerate(query_lens) if t == 1]  # a 1-token prefill chunk is a decode too
        prefills = [i for i, t in enumerate(query_lens) if t > 1]
        if decodes:
            plan.decode_rows = torch.tensor(decodes, device=device)
            if prefills:
                plan.decode_tokens = torch.tensor([starts[i] for i in decodes], device=device)
            plan.decode_max_len = max(context_lens[i] for i in decodes)
        if prefills:
            tokens = [n for i in prefills for n in range(starts[i], starts[i + 1])]
            plan.prefill_tokens = torch.tensor(tokens, device=device)
            cu_q, cu_k = [0], [0]
            for i in prefills:
                cu_q.append(cu_q[-1] + query_lens[i])
                cu_k.append(cu_k[-1] + context_lens[i])
            plan.prefill_cu_q = torch.tensor(cu_q, dtype=torch.int32, device=device)
            plan.prefill_cu_k = torch.tensor(cu_k, dtype=torch.int32, device=device)
            plan.prefill_max_q = max(query_lens[i] for i in prefills)
            plan.prefill_max_k = max(context_lens[i] for i in prefills)
            # Slot of position p of prefill sequence j: block_tables[row_j, p // BS] * BS + p % BS, all at once.
            lens = torch.tensor([context_lens[i] for i in prefills], device=device)
            seq = torch.repeat_interleave(torch.arange(len(prefills), device=device), lens, output_size=cu_k[-1])
            pos = torch.arange(cu_k[-1], device=device) - plan.prefill_cu_k[:-1].long()[seq]
            rows = torch.tensor(prefills, device=device)[seq]
            plan.prefill_slots = batch.block_tables[rows, pos // block_size].long() * block_size + pos % block_size
        return plan


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
        attention_backend: str = "reference",
    ):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if attention_backend not in BACKENDS:
            raise ValueError(f"unknown attention_backend {attention_backend!r}; choose one of {BACKENDS}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.attention_backend = attention_backend
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)  # (L, NB, BS, Hkv, D)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.pools = [self.k_cache, self.v_cache]  # everything indexed (L, NB, ...): what copy-on-write copies

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one block in every layer: 2 * L * BS * Hkv * D * bytes per element."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def num_blocks_for_memory(
        cls, memory_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """How many blocks fit in ``memory_bytes`` (e.g. a fraction of ``torch.cuda.mem_get_info()[0]``)."""
        return int(memory_bytes // cls.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype))

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
    def _store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write k, v (N, Hkv, D) at their flat pool slots (-1 = don't write)."""
        store = store_kv if self.attention_backend == "triton" else store_kv_ref
        store(k, v, self.k_cache[layer_idx], self.v_cache[layer_idx], slot_mapping)

    def _read_blocks(
        self, layer_idx: int, block_tables: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What decode attention reads: K and V pools (NB, BS, Hkv, D) and the block tables into them.

        Here the layer's pools themselves, untouched: paged attention reads the blocks where they lie.
        """
        return self.k_cache[layer_idx], self.v_cache[layer_idx], block_tables

    def _read_slots(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at flat pool slots (S,) -> (S, Hkv, D) each, gathered into one packed tensor."""
        k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]  # (NB, BS, Hkv, D)
        return k_cache.view(-1, *k_cache.shape[2:])[slots], v_cache.view(-1, *v_cache.shape[2:])[slots]

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch
    ) -> torch.Tensor:
        """Store the new k, v (1, Hkv, N, D) in their slots, then attend q (1, H, N, D) to each sequence's cache.

        Returns o (1, H, N, D). Batch layout as in ``PagedBatch`` (packed: B = 1, N = all new tokens).
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
        if plan.decode_rows is not None:  # (B_dec, H, D): one query per sequence, read through the block tables
            q_dec = q[0].transpose(0, 1) if plan.decode_tokens is None else q[0, :, plan.decode_tokens].transpose(0, 1)
            tables, lens = batch.block_tables, batch.context_lens
            if plan.decode_tokens is not None:  # a mixed step: only the decoding sequences' rows
                tables, lens = tables[plan.decode_rows], lens[plan.decode_rows]
            k_pool, v_pool, tables = self._read_blocks(layer_idx, tables, q.dtype)
            if triton:
                o_dec = paged_decode_attention(q_dec, k_pool, v_pool, tables, lens, max_context_len=plan.decode_max_len)
            else:
                o_dec = paged_decode_attention_ref(q_dec, k_pool, v_pool, tables, lens)
            if plan.decode_tokens is None:
                out[0] = o_dec.transpose(0, 1)
            else:
                out[0, :, plan.decode_tokens] = o_dec.transpose(0, 1)
        if plan.prefill_tokens is not None:
            # Gather every prefill chunk's whole context (its cached tokens, then the ones just written) into one
            # packed (sum S, Hkv, D) tensor, then one variable-length causal attention, bottom-right aligned.
            k_ctx, v_ctx = self._read_slots(layer_idx, plan.prefill_slots, q.dtype)  # (sum S, Hkv, D) each
            q_pre = q[0, :, plan.prefill_tokens].transpose(0, 1).contiguous()  # (sum T, H, D)
            varlen = flash_attention_varlen if triton else flash_attention_varlen_ref
            o_pre = varlen(
                q_pre, k_ctx, v_ctx, plan.prefill_cu_q, plan.prefill_cu_k, plan.prefill_max_q, plan.prefill_max_k
            )
            out[0, :, plan.prefill_tokens] = o_pre.transpose(0, 1)
        return out
