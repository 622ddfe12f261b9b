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

from minillm._triton import record_fallback, triton_available
from minillm.attention import flash
from minillm.attention.flash import flash_attention
from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.attention.reference import attention_ref
from minillm.attention.varlen import flash_attention_varlen, flash_attention_varlen_ref
from minillm.kvcache.contiguous import ContiguousKVCache, left_pad
from minillm.kvcache.memory import waste_fraction

KERNELS = ("reference", "triton")


def why_not_triton(device: torch.device | str, head_dim: int | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Why the Triton attention kernels cannot run here (None: they can). head_dim and dtype: the model's."""
    device = torch.device(device)
    if not triton_available(device):
        return (f"Triton cannot run on {device} (it needs a CUDA GPU, or TRITON_INTERPRET=1 set before minillm is "
                "imported for its CPU interpreter)")
    if head_dim is not None and head_dim not in flash.HEAD_DIMS:
        return f"head_dim {head_dim} is not one the flash kernel supports {flash.HEAD_DIMS}"
    if dtype is not None and dtype not in flash.DTYPES:
        return f"{dtype} is not one the kernels support {flash.DTYPES}"
    return None


def resolve_kernel(
    kernel: str, device: torch.device | str, head_dim: int | None = None, dtype: torch.dtype | None = None
) -> str:
    """"auto" -> Triton where it runs compiled (a CUDA GPU), else the torch reference; an explicit choice is checked.

    On a GPU "auto" expects Triton: when it cannot run there (Triton missing, a head dim or dtype the kernels lack),
    the reference is a fallback, counted (``minillm._triton.record_fallback``) so ``LLM.stats()`` and ``doctor()``
    show it. On a CPU the reference is the plan, not a fallback: the interpreter is far too slow for a model.
    """
    device = torch.device(device)
    reason = why_not_triton(device, head_dim, dtype)
    if kernel == "auto":
        if device.type != "cuda":
            return "reference"
        if reason:
            record_fallback("attention_backend='auto'", reason)
        return "reference" if reason else "triton"
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention backend {kernel!r}; choose 'auto' or one of {KERNELS}")
    if kernel == "triton" and reason:
        raise ValueError(f"attention_backend='triton' cannot run: {reason}; use 'reference' or 'auto'")
    return kernel


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "reference", scale: float | None = None
) -> torch.Tensor:
    """Causal attention, q: (B, H, T, D), k, v: (B, Hkv, S, D) -> o: (B, H, T, D), with the kernel you name.

    The mask is bottom-right aligned: query i sees keys j <= i + (S - T).
    backend: "reference" (materialized scores, `reference.py`) or "triton" (`flash.py`; raises where Triton cannot run
    on the tensors' device).
    """
    if backend == "reference":
        return attention_ref(q, k, v, causal=True, scale=scale)
    if backend == "triton":
        return flash_attention(q, k, v, causal=True, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {KERNELS}")


class AttentionBackend:
    """What the model and the engine ask of every backend.

    The model calls ``forward(layer_idx, q, k, v, metadata)`` in every layer: q (B, H, T, D), new k and v
    (B, Hkv, T, D) already rotated -> the attention output (B, H, T, D). The engine calls ``prepare(out)`` once per
    step to get the model's inputs (``StepInputs``), reads ``keeps_kv`` (is anything stored between steps?) and
    ``forks_share_kv`` (do parallel-sampling children share their parent's K/V?), and ``stats()`` / ``start_run()``
    for the backend's own counts of the current run.
    """

    cache = None
    keeps_kv = True
    forks_share_kv = False

    def prepare(self, out) -> StepInputs:
        raise NotImplementedError

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata) -> torch.Tensor:
        raise NotImplementedError

    def start_run(self) -> None:
        """A new run starts at an idle engine: forget the last run's counts (none kept by default)."""

    def stats(self) -> dict:
        return {}


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS} (or resolve 'auto' first)")
    return kernel


class NoCacheAttention(AttentionBackend):
    """Causal attention over the tokens of this forward pass only: q (B, H, T, D), k, v (B, Hkv, T, D).

    As an engine's backend it keeps nothing, so every step runs each sequence's whole token list again (chapter 01's
    ``generate``, the baseline of chapter 03): ``prepare`` lays the sequences in rows, *right*-padded -- the causal
    mask already stops real tokens from seeing the pads after them -- and the logits are read at each row's last real
    token.
    """

    keeps_kv = False  # the engine recomputes every token at every step
    forks_share_kv = False  # nothing to share: each completion of a request runs on its own

    def __init__(self, kernel: str = "reference", pad_token_id: int = 0, device: torch.device | str = "cpu"):
        self.kernel, self.pad_token_id, self.device = check_kernel(kernel), pad_token_id, torch.device(device)
        self.cache = None

    def prepare(self, out) -> StepInputs:
        """Every scheduled sequence's tokens from position 0, one row each, right-padded to the longest."""
        if any(seq.num_computed_tokens for seq in out.seqs):
            raise RuntimeError("a no-cache step recomputes whole sequences; the scheduler sent a partly computed one")
        lengths = list(out.num_new_tokens)
        input_ids = torch.full((len(lengths), max(lengths)), self.pad_token_id, dtype=torch.long)  # (B, T)
        for row, (seq, n) in enumerate(zip(out.seqs, lengths)):
            input_ids[row, :n] = torch.tensor(seq.token_ids[:n])
        rows = torch.arange(len(lengths), device=self.device)
        cols = torch.tensor(lengths, device=self.device) - 1  # each row's last real token
        return StepInputs(input_ids.to(self.device), None, None, None, rows, cols)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata=None) -> torch.Tensor:
        return causal_attention(q, k, v, self.kernel)


class ContiguousAttention(AttentionBackend):
    """Append the new K/V to a ``ContiguousKVCache`` and attend over every stored column (metadata: a
    ``ContiguousBatch``). The T queries are the last T of the S stored columns, so the causal mask is bottom-right
    aligned; the batch's key padding mask hides the left pads.

    As an engine's backend (with the scheduler's static policy, chapter 03) it runs a static batch the way
    ``model.generate`` does in transformers and gpt-fast: ``prepare`` reserves a slab for the batch -- B rows of
    ``P + max_steps - 1`` columns, P the longest prompt, max_steps the most tokens any row may still generate --
    runs the prompts LEFT-padded to P in one prefill, then feeds each row its last token (B, 1) per step. A row that
    finishes keeps its place, fed a pad token nobody reads, until the whole batch is done. That idle work and the
    columns reserved for tokens never generated are what paging and continuous batching remove; ``stats()`` counts
    both.
    """

    forks_share_kv = False  # every completion gets its own row

    def __init__(self, cache: ContiguousKVCache | None = None, kernel: str = "reference", config=None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", pad_token_id: int = 0):
        self.cache, self.kernel = cache, check_kernel(kernel)
        self.config, self.dtype, self.device, self.pad_token_id = config, dtype, torch.device(device), pad_token_id
        self.batch = None  # the last step's ContiguousBatch
        self.start_run()

    def start_run(self) -> None:
        """Counts of the current run (the previous batch has finished: nothing of it is left to count)."""
        self.rows: list = []  # the static batch's sequences, one per row, finished ones included
        self.num_fallbacks = 0  # layer calls that took the reference because the batch was padded
        self.rows_per_step: list[int] = []  # rows computed per step, idle rows included
        self.num_idle_row_steps = 0  # rows fed only to keep the batch rectangular
        self.reserved_tokens = 0  # cache columns reserved, summed over batches
        self.used_tokens = 0  # columns that ended up holding a real token, over finished batches

    def prepare(self, out) -> StepInputs:
        """A new static batch: reserve its slab and prefill it; otherwise the batch's next decode step."""
        seqs = out.seqs
        if all(seq.num_computed_tokens == 0 for seq in seqs):
            return self._prefill(seqs)
        if any(seq.num_computed_tokens == 0 for seq in seqs) or any(n != 1 for n in out.num_new_tokens):
            raise RuntimeError("a contiguous batch is static: no sequence may join or prefill in the middle of it")
        row_of = {seq.seq_id: row for row, seq in enumerate(self.rows)}
        running = {seq.seq_id for seq in seqs}
        last = [seq.token_ids[-1] if seq.seq_id in running else self.pad_token_id for seq in self.rows]
        self.batch = self.batch.next_decode()
        self.num_idle_row_steps += len(self.rows) - len(seqs)
        self.rows_per_step.append(len(self.rows))
        rows = torch.tensor([row_of[seq.seq_id] for seq in seqs], device=self.device)
        input_ids = torch.tensor(last, device=self.device)[:, None]  # (B, 1)
        return StepInputs(input_ids, self.batch.positions, self.batch, None, rows, torch.zeros_like(rows))

    def _prefill(self, seqs) -> StepInputs:
        self.used_tokens += self._used_by_rows()
        input_ids, batch = left_pad([seq.token_ids for seq in seqs], self.pad_token_id, self.device)  # (B, P)
        B, P = input_ids.shape
        # The most tokens a row may still produce; the last one is sampled but never written to the cache.
        max_steps = max(min(s.params.max_tokens - len(s.output_token_ids), s.max_model_len - s.num_tokens) for s in seqs)
        max_len = P + max(max_steps, 1) - 1
        if self.cache is None or self.cache.max_batch_size < B or self.cache.max_len < max_len:
            self.cache = None  # free the old slab before reserving a bigger one
            self.cache = ContiguousKVCache.for_model(self.config, B, max_len, self.dtype, self.device)
        else:
            self.cache.reset()
        self.reserved_tokens += B * max_len
        self.rows, self.batch = list(seqs), batch
        self.rows_per_step.append(B)
        # Left padding: every row's last prompt token is in column P - 1, the only one whose logits we need.
        rows = torch.arange(B, device=self.device)
        logits_at = torch.tensor([P - 1], device=self.device)
        return StepInputs(input_ids, batch.positions, batch, logits_at, rows, torch.zeros_like(rows))

    def _used_by_rows(self) -> int:
        """Columns the current batch's rows filled: every token but the last, which is never fed back."""
        return sum(seq.num_tokens - 1 for seq in self.rows)

    def stats(self) -> dict:
        done = all(seq.is_finished for seq in self.rows)  # a batch's columns are counted once it has finished
        used = self.used_tokens + (self._used_by_rows() if done else 0)
        return {
            "batch_sizes": list(self.rows_per_step),  # rows computed per step, idle rows included
            "num_idle_row_steps": self.num_idle_row_steps,
            "kv_reserved_tokens": self.reserved_tokens,
            "kv_used_tokens": used,
            "kv_waste": waste_fraction(self.reserved_tokens, used),
            "kv_reserved_bytes": self.cache.nbytes if self.cache is not None else 0,
            "attention_fallbacks": self.num_fallbacks,
        }

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch) -> torch.Tensor:
        """q (B, H, T, D), new k, v (B, Hkv, T, D) -> o (B, H, T, D)."""
        k_all, v_all = self.cache.append(layer_idx, k, v, batch.start)  # (B, Hkv, S, D)
        if batch.key_padding_mask is not None:
            # The flash kernel takes no padding mask: a padded batch runs the exact reference, and we count it.
            if self.kernel == "triton":
                self.num_fallbacks += 1
                record_fallback("contiguous attention", "padded batch (the flash kernel takes no padding mask)")
            return attention_ref(q, k_all, v_all, causal=True, key_padding_mask=batch.key_padding_mask)
        return causal_attention(q, k_all, v_all, self.kernel)


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
        guesses = getattr(seq, "spec_token_ids", [])  # chapter 09's; a plain sequence (notebook 05's) has none
        input_ids += (seq.token_ids + guesses)[start:end]  # the guesses come after the real tokens
        positions += range(start, end)
        slot_mapping += block_manager.slot_mapping(seq.seq_id, start, end)
        query_lens.append(n)
        context_lens.append(end)
        tables.append(block_manager.block_table(seq.seq_id))
        if out.is_last_chunk(i):  # a speculating sequence is verified at its last real token and every guess
            sample_rows += range(len(input_ids) - 1 - len(guesses), len(input_ids))
    metadata = PagedMetadata.build(slot_mapping, query_lens, context_lens, tables, block_manager.block_size, device)
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)[None]  # (1, N)
    pos = torch.tensor(positions, dtype=torch.long, device=device)[None]  # (1, N)
    return ids, pos, metadata, sample_rows


@dataclass
class StepInputs:
    """What one engine step feeds the model, and where the logits of the sampled sequences come out.

    input_ids, positions (B, T) (positions None: 0..T-1 in every row); metadata: the backend's, for every layer;
    logits_at: the columns the model computes logits for (None: all); rows, cols (K,): the sampled sequences'
    logits are ``model_output[rows, cols]`` (K, V), in the order of the scheduler's sequences that sample.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor | None
    metadata: object
    logits_at: torch.Tensor | None
    rows: torch.Tensor
    cols: torch.Tensor


class PagedAttention(AttentionBackend):
    """Attention over a ``PagedKVCache`` (or its int8 twin) for a packed batch of prefill chunks and decodes.

    ``prepare`` turns the scheduler's plan into ``StepInputs`` (``prepare_batch``, reading the block tables of
    ``block_manager``); ``forward`` stores each layer's new K/V at their slots, then
      * batches all decode sequences (one query token each) into one paged decode call, reading through the block
        tables where the blocks lie, and
      * gathers the contexts of all prefill chunks from the blocks into one packed tensor and runs variable-length
        causal attention, bottom-right aligned (a chunk's T new queries see the S - T cached tokens before them plus
        the causal part of the chunk; FlashAttention's varlen interface, arXiv:2307.08691).
    """

    keeps_kv = True
    forks_share_kv = True  # parallel-sampling children share their parent's prompt blocks (copy-on-write)

    def __init__(self, cache, block_manager=None, kernel: str = "reference"):
        self.cache, self.block_manager, self.kernel = cache, block_manager, check_kernel(kernel)

    def prepare(self, out) -> StepInputs:
        """The model's inputs and this backend's metadata for a scheduled step (``SchedulerOutput``).

        First the step's copy-on-write: blocks the scheduler un-shared get their contents before anyone writes.
        """
        self.cache.copy_blocks(out.copies)
        input_ids, positions, metadata, sample_rows = prepare_batch(out, self.block_manager, self.cache.device)
        logits_at = torch.tensor(sample_rows, dtype=torch.long, device=self.cache.device)
        # One packed row: logits come out as (1, K, V), sequence j's at column j.
        return StepInputs(input_ids, positions, metadata, logits_at, torch.zeros_like(logits_at),
                          torch.arange(len(sample_rows), device=self.cache.device))

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
