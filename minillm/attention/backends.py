"""Attention backends: the one place that knows how a step's attention meets the KV cache.

In doing so, you will learn about the seam every engine has (vLLM calls it an attention backend): the model computes
q, k, v for its new tokens and hands them to ``backend.forward(layer_idx, q, k, v, metadata)``; the backend writes the
new keys and values into its KV pool (if it has one) and attends over everything the pool holds. ``metadata`` is
what this step needs to know -- where each token's K/V goes, which sequence it belongs to -- and the backend builds it
(``PagedAttention.prepare``) from the scheduler's plan. The pools in ``minillm.kvcache`` only store; the model knows
no cache. Three backends, one per chapter:

    NoCacheAttention    attention over the given tokens only (chapters 01-02): every step recomputes everything
    ContiguousAttention a preallocated slab per sequence, left-padded batches (chapter 03)
    PagedAttention      block pools, block tables, a packed batch of prefill chunks and decodes (chapters 04-05)

The kernel -- the torch reference or Triton -- is chosen once, when the backend is built (``resolve_kernel``), and is
what ``LLM.stats()["attention_backend"]`` reports. A Triton kernel that cannot run raises instead of quietly running
the reference; the one deliberate fallback (a padded contiguous batch: the flash kernel takes no padding mask) is
counted in ``num_fallbacks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minillm._triton import triton_available
from minillm.attention.flash import flash_attention
from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.attention.reference import attention_ref
from minillm.attention.varlen import flash_attention_varlen, flash_attention_varlen_ref

KERNELS = ("reference", "triton")


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """"auto" -> Triton where it runs compiled (a CUDA GPU), else the torch reference; an explicit choice is checked."""
    device = torch.device(device)
    if kernel == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "reference"
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention backend {kernel!r}; choose 'auto' or one of {KERNELS}")
    if kernel == "triton" and not triton_available(device):
        raise ValueError(
            f"attention_backend='triton' cannot run on {device}: Triton needs a CUDA GPU, or TRITON_INTERPRET=1 set "
            "before minillm is imported to run the kernels in its CPU interpreter; use 'reference' or 'auto'"
        )
    return kernel


class NoCacheAttention:
    """Causal attention over the tokens of this forward pass only: q (B, H, T, D), k, v (B, Hkv, T, D)."""

    def __init__(self, kernel: str = "reference"):
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
        self.kernel = kernel

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata=None) -> torch.Tensor:
        if self.kernel == "triton":
            return flash_attention(q, k, v, causal=True)
        return attention_ref(q, k, v, causal=True)


class ContiguousAttention:
    """Append the new K/V to a ``ContiguousKVCache`` and attend over every stored column (metadata: a
    ``ContiguousBatch``). The T queries are the last T of the S stored columns, so the causal mask is bottom-right
    aligned; the batch's key padding mask hides the left pads."""

    def __init__(self, cache, kernel: str = "reference"):
        self.cache, self.kernel = cache, kernel
        self.num_fallbacks = 0  # layer calls that took the reference because the batch was padded

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch) -> torch.Tensor:
        """q (B, H, T, D), new k, v (B, Hkv, T, D) -> o (B, H, T, D)."""
        k_all, v_all = self.cache.append(layer_idx, k, v, batch.start)  # (B, Hkv, S, D)
        if batch.key_padding_mask is not None:
            # The flash kernel takes no padding mask: a padded batch runs the exact reference, and we count it.
            self.num_fallbacks += self.kernel == "triton"
            return attention_ref(q, k_all, v_all, causal=True, key_padding_mask=batch.key_padding_mask)
        if self.kernel == "triton":
            return flash_attention(q, k_all, v_all, causal=True)
        return attention_ref(q, k_all, v_all, causal=True)


@dataclass
class PagedMetadata:
    """One step's metadata for a packed batch of N new tokens from ``num_seqs`` sequences (all on the pool's device).

    slot_mapping: (N,) int64, flat pool slot of each new token's K/V (``block * BS + offset``; -1 = don't write).
    cu_seqlens_q: (num_seqs + 1,) int32, sequence i's new tokens are packed rows [cu[i], cu[i + 1]).
    context_lens: (num_seqs,) int32, tokens of sequence i in the cache AFTER this step's writes (cached + new).
    block_tables: (num_seqs, max_blocks) int32, padded with 0 past each table's end (never read there).
    query_lens_host, context_lens_host: host copies of the lengths; ``forward`` needs them on the host to split
        decodes from prefills, and reading them back from the GPU every layer would cost a sync each.
    """

    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seqlen_q: int
    max_context_len: int
    query_lens_host: list[int] = field(repr=False)
    context_lens_host: list[int] = field(repr=False)
    plan: StepPlan | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        slot_mapping: list[int],
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> PagedMetadata:
        """Make the tensors from host lists (one transfer each) and split the step into decodes and prefills."""
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
        metadata = cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(block_tables), max_blocks),
            max_seqlen_q=max(query_lens, default=0),
            max_context_len=max(context_lens, default=0),
            query_lens_host=list(query_lens),
            context_lens_host=list(context_lens),
        )
        metadata.plan = StepPlan.build(metadata, block_size)
        return metadata

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


@dataclass
class StepPlan:
    """Where the decodes and the prefill chunks of one step sit (device index tensors, None = none).

    decode_rows: (B_dec,) which sequences decode; decode_tokens: their packed rows (None when every token decodes).
    prefill_tokens: (sum T,) packed rows of the prefill chunks; prefill_slots: (sum S,) pool slots of their whole
    contexts, sequence after sequence; prefill_cu_q, prefill_cu_k: (P + 1,) int32 cumulative T and S.
    """

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
    def build(cls, m: PagedMetadata, block_size: int) -> StepPlan:
        query_lens, context_lens = m.query_lens_host, m.context_lens_host
        device = m.block_tables.device
        starts = [0]
        for t in query_lens:
            starts.append(starts[-1] + t)
        plan = cls()
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
            plan.prefill_slots = m.block_tables[rows, pos // block_size].long() * block_size + pos % block_size
        return plan


def prepare_batch(
    out, block_manager, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata, list[int]]:
    """Pack a scheduled step: -> input_ids (1, N), positions (1, N), its PagedMetadata, and the rows to sample.

    ``out`` is the scheduler's plan (``SchedulerOutput``): sequence ``out.seqs[i]`` computes ``out.num_new_tokens[i]``
    tokens from its ``num_computed_tokens``. Their new tokens are laid end to end, no padding (Orca's selective
    batching; vLLM's packed ``input_ids``). Example, block size 4: a prefills tokens 0..4 (a chunk of 5), b decodes
    its token at position 9:

        input_ids    [a0 a1 a2 a3 a4 | b9]          positions  [0 1 2 3 4 | 9]
        cu_seqlens_q [0, 5, 6]                      context_lens [5, 10]
        slot_mapping [a's slots of positions 0..4 | b's slot of position 9]

    Logits are read at the last row of each sequence whose known tokens are all computed after this step; a prompt
    chunk that is not the last one produces no token. Notebook 05 builds such a batch by hand (exercise 5.3).
    """
    input_ids, positions, slot_mapping, query_lens, context_lens, tables, sample_rows = [], [], [], [], [], [], []
    for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        slot_mapping += block_manager.slot_mapping(seq.seq_id, start, end)
        query_lens.append(n)
        context_lens.append(end)
        tables.append(block_manager.block_table(seq.seq_id))
        if out.is_last_chunk(i):
            sample_rows.append(len(input_ids) - 1)
    metadata = PagedMetadata.build(slot_mapping, query_lens, context_lens, tables, block_manager.block_size, device)
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)[None]  # (1, N)
    pos = torch.tensor(positions, dtype=torch.long, device=device)[None]  # (1, N)
    return ids, pos, metadata, sample_rows


@dataclass
class StepInputs:
    """What one engine step feeds the model: packed input_ids and positions (1, N), the backend's metadata, and the
    packed rows whose logits are sampled (one per sequence whose known tokens are all computed after this step)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: PagedMetadata
    sample_rows: torch.Tensor


class PagedAttention:
    """Attention over a ``PagedKVCache`` (or its int8 twin) for a packed batch of prefill chunks and decodes.

    ``prepare`` turns the scheduler's plan into ``StepInputs`` (``prepare_batch``, reading the block tables of
    ``block_manager``); ``forward`` stores each layer's new K/V at their slots, then
      * batches all decode sequences (one query token each) into one paged decode call, reading through the block
        tables where the blocks lie, and
      * gathers the contexts of all prefill chunks from the blocks into one packed tensor and runs variable-length
        causal attention, bottom-right aligned (a chunk's T new queries see the S - T cached tokens before them plus
        the causal part of the chunk; FlashAttention's varlen interface, arXiv:2307.08691).
    """

    def __init__(self, cache, block_manager=None, kernel: str = "reference"):
        self.cache, self.block_manager, self.kernel = cache, block_manager, kernel

    def prepare(self, out) -> StepInputs:
        """The model's inputs and this backend's metadata for a scheduled step (``SchedulerOutput``).

        First the step's copy-on-write: blocks the scheduler un-shared get their contents before anyone writes.
        """
        self.cache.copy_blocks(out.copies)
        input_ids, positions, metadata, rows = prepare_batch(out, self.block_manager, self.cache.device)
        return StepInputs(input_ids, positions, metadata, torch.tensor(rows, dtype=torch.long, device=self.cache.device))

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: PagedMetadata) -> torch.Tensor:
        """Store the new k, v (1, Hkv, N, D) in their slots, then attend q (1, H, N, D) to each sequence's cache."""
        cache = self.cache
        if q.dim() != 4 or q.shape[0] != 1 or k.shape != v.shape or k.shape[0] != 1 or k.shape[2:] != q.shape[2:]:
            raise ValueError(
                f"paged attention takes a packed batch: q (1, H, N, D), k, v (1, Hkv, N, D); got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if k.shape[1] != cache.num_kv_heads:
            raise ValueError(f"k has {k.shape[1]} KV heads, the cache {cache.num_kv_heads}")
        triton = self.kernel == "triton"
        cache.store(layer_idx, k[0].transpose(0, 1), v[0].transpose(0, 1), m.slot_mapping, triton)  # (N, Hkv, D)

        plan = m.plan
        out = torch.empty_like(q)
        if plan.decode_rows is not None:  # (B_dec, H, D): one query per sequence, read through the block tables
            q_dec = q[0].transpose(0, 1) if plan.decode_tokens is None else q[0, :, plan.decode_tokens].transpose(0, 1)
            tables, lens = m.block_tables, m.context_lens
            if plan.decode_tokens is not None:  # a mixed step: only the decoding sequences' rows
                tables, lens = tables[plan.decode_rows], lens[plan.decode_rows]
            k_pool, v_pool, tables = cache.read_blocks(layer_idx, tables, q.dtype)
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
            k_ctx, v_ctx = cache.read_slots(layer_idx, plan.prefill_slots, q.dtype)  # (sum S, Hkv, D) each
            q_pre = q[0, :, plan.prefill_tokens].transpose(0, 1).contiguous()  # (sum T, H, D)
            varlen = flash_attention_varlen if triton else flash_attention_varlen_ref
            o_pre = varlen(
                q_pre, k_ctx, v_ctx, plan.prefill_cu_q, plan.prefill_cu_k, plan.prefill_max_q, plan.prefill_max_k
            )
            out[0, :, plan.prefill_tokens] = o_pre.transpose(0, 1)
        return out
