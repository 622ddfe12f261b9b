"""The model runner: one scheduler step becomes ONE forward pass over a packed batch, with no padding.

Teaches how an engine feeds a mixed batch to the model (Orca's selective batching, OSDI 2022; vLLM's packed
``input_ids``): the new tokens of every scheduled sequence -- a prefill chunk of many tokens or a single decode
token -- are laid end to end into one row of N tokens. Everything that differs per sequence travels in a
`PagedBatch`: where each token's K/V goes (``slot_mapping``), where each sequence's tokens start
(``cu_seqlens_q``), how long its context is after this step (``context_lens``) and its ``block_tables``. Linear
layers see one (1, N, C) tensor, so no FLOP is spent on padding; only attention looks at the metadata.

Example, block size 4: sequence a prefills tokens 0..4 (a chunk of 5), sequence b decodes its token at position 9:

    input_ids    [a0 a1 a2 a3 a4 | b9]          positions  [0 1 2 3 4 | 9]
    cu_seqlens_q [0, 5, 6]                      context_lens [5, 10]
    slot_mapping [a's slots of positions 0..4 | b's slot of position 9]

Logits are read at the last row of each sequence whose known tokens are all computed after this step
(``cu_seqlens_q[i + 1] - 1``); a prompt chunk that is not the last one produces no token.
Notebook 05 (``05_continuous_batching``) builds such a batch by hand (exercise 5.3).
"""

from __future__ import annotations

import torch

from minillm.engine.scheduler import SchedulerOutput
from minillm.kvcache.blocks import BlockManager
from minillm.kvcache.paged import PagedBatch, PagedKVCache


def prepare_batch(
    out: SchedulerOutput, block_manager: BlockManager, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, PagedBatch, list[int]]:
    """Pack a step: -> input_ids (1, N), positions (1, N), its PagedBatch, and the rows to read logits from."""
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
    batch = PagedBatch.build(slot_mapping, query_lens, context_lens, tables, device=device)
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)[None]  # (1, N)
    pos = torch.tensor(positions, dtype=torch.long, device=device)[None]  # (1, N)
    return ids, pos, batch, sample_rows


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, block_manager: BlockManager):
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Copy-on-write the step's shared blocks, run the packed forward pass; logits (B, V) of the sampling rows.

        Row j belongs to the j-th sequence of ``out`` whose ``is_last_chunk`` holds (call before committing).
        """
        self.kv_cache.copy_blocks(out.copies)
        input_ids, positions, batch, rows = prepare_batch(out, self.block_manager, self.device)
        rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.model(input_ids, positions, self.kv_cache, batch, logits_at=rows)[0]  # (B, V)
