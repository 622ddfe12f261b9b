"""A draft model as the proposer: a smaller model with the same vocabulary guesses k tokens, one at a time.

In doing so, you will learn about:
  * why the draft needs its own KV cache: it decodes k tokens per step for every speculating sequence, and without
    a cache each of those would recompute the whole sequence. It gets a paged pool and a ``BlockManager`` of its
    own (chapters 04-05), sized like the target's;
  * rolling the draft's cache back: the draft stored K/V for its own guesses; after verification only the accepted
    ones are still part of the sequence. Before guessing again, the draft keeps the longest prefix of what it fed
    that is still the sequence (``BlockManager.trim`` gives back the rest) and feeds only the tokens after it. So
    one code path covers accepted guesses, rejected ones, the target's correction and the bonus token;
  * batching the draft: the first pass feeds every sequence's missing tokens as one packed varlen step (like a
    prefill chunk), each later pass feeds every sequence's latest guess (a batched decode): k passes per step;
  * a draft for sampling: each guess is drawn from the draft's distribution q under the request's own sampling
    parameters and generator; ``verify.rejection_sample`` needs q to keep the output distributed as the target's;
  * ``self_draft``: until a trained small model exists (chapter 08's distilled student), the target's first layers
    with its final norm and head make a draft that shares every weight and costs no memory.

Notebook 09 (``09_speculative_decoding``) measures its acceptance rate against prompt lookup's.

Shapes: N packed tokens, V vocab.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from minillm.attention.backends import PagedAttention, PagedMetadata
from minillm.engine.request import Sequence
from minillm.engine.sampling import sampling_probs
from minillm.kvcache.blocks import BlockManager
from minillm.kvcache.paged import PagedKVCache
from minillm.model import Transformer
from minillm.spec.proposers import Proposer


def self_draft(model: Transformer, num_layers: int) -> Transformer:
    """The first `num_layers` layers of `model` with its embedding, final norm and head: a draft sharing every
    weight (nothing is copied)."""
    if not isinstance(num_layers, int) or not 1 <= num_layers < model.config.num_layers:
        raise ValueError(f"a self-draft keeps 1 to {model.config.num_layers - 1} of the target's "
                         f"{model.config.num_layers} layers, got num_layers={num_layers!r}")
    config = dataclasses.replace(model.config, num_layers=num_layers)
    with torch.device("meta"):  # no weights allocated: every module is the target's own
        draft = Transformer(config)
    draft.embed_tokens, draft.norm, draft.lm_head = model.embed_tokens, model.norm, model.lm_head
    draft.layers = nn.ModuleList(model.layers[:num_layers])
    draft.inv_freq = model.inv_freq
    return draft


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class DraftModelProposer(Proposer):
    """Guesses from a draft model with its own paged KV cache (see the module docstring)."""

    def __init__(self, draft: Transformer, target_config, num_speculative_tokens: int, num_kv_blocks: int,
                 block_size: int = 16, kernel: str = "reference", min_expected_tokens: float = 1.5):
        super().__init__(num_speculative_tokens, min_expected_tokens)
        if draft.config.vocab_size != target_config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                             f"target's ({target_config.vocab_size}): its guesses would be other tokens; use a "
                             "draft from the same model family (same tokenizer)")
        param = next(draft.parameters())
        cfg = draft.config
        self.draft = draft
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching=False)
        self.cache = PagedKVCache(cfg.num_layers, num_kv_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  param.dtype, param.device)
        self.attention = PagedAttention(self.cache, self.block_manager, kernel)
        self.fed: dict[int, list[int]] = {}  # seq_id -> the tokens whose K/V the draft's cache holds, in order

    def forget(self, live: set[int]) -> None:
        super().forget(live)
        for seq_id in [i for i in self.fed if i not in live]:
            self.block_manager.free(seq_id)
            del self.fed[seq_id]

    def guess(self, seqs: list[Sequence], budgets: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        bm = self.block_manager
        feed, room = [], []  # per sequence: the tokens to feed first; whether its cache has room for all k
        for seq, k in zip(seqs, budgets):
            if seq.seq_id not in self.fed:
                bm.allocate_prompt(seq.seq_id, [])
                self.fed[seq.seq_id] = []
            fed = self.fed[seq.seq_id]
            # Rollback: what is still the sequence stays cached, but the last token is always fed again for its
            # logits (the draft may hold it already, when its guess came true in a step that could not verify).
            keep = min(common_prefix_length(fed, seq.token_ids), seq.num_tokens - 1)
            del fed[keep:]
            bm.trim(seq.seq_id, keep)
            feed.append(seq.token_ids[keep:])
            needed = bm.num_blocks_needed(seq.seq_id, seq.num_tokens + k - 1)
            room.append(bm.can_allocate(needed))
            if room[-1]:
                bm.ensure_capacity(seq.seq_id, seq.num_tokens + k - 1)
        active = [i for i in range(len(seqs)) if room[i]]  # a full draft pool only means no guesses this step
        guesses, probs = [[] for _ in seqs], [[] for _ in seqs]
        for j in range(max(budgets)):
            active = [i for i in active if budgets[i] > j]
            if not active:
                break
            logits = self._forward([(seqs[i].seq_id, feed[i] if j == 0 else guesses[i][-1:]) for i in active])
            for i, row in zip(active, logits):  # row (V,)
                seq = seqs[i]
                if seq.params.is_greedy:
                    guesses[i].append(int(row.argmax()))
                else:
                    q = sampling_probs(row[None], seq.params)[0].cpu()  # (V,) what plain sampling would draw from
                    guesses[i].append(int(torch.multinomial(q, 1, generator=seq.generator)))
                    probs[i].append(q)
        return [(g, torch.stack(p) if p else None) for g, p in zip(guesses, probs)]

    @torch.no_grad()
    def _forward(self, items: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Feed each (seq_id, tokens) after what that sequence's draft cache holds, as one packed step; returns the
        logits after each sequence's last fed token (len(items), V)."""
        bm, device = self.block_manager, self.cache.device
        input_ids, positions, slots, query_lens, context_lens, tables, last_rows = [], [], [], [], [], [], []
        for seq_id, tokens in items:
            fed = self.fed[seq_id]
            start, end = len(fed), len(fed) + len(tokens)
            input_ids += tokens
            positions += range(start, end)
            slots += bm.slot_mapping(seq_id, start, end)
            query_lens.append(len(tokens))
            context_lens.append(end)
            tables.append(bm.block_table(seq_id))
            last_rows.append(len(input_ids) - 1)
            fed += tokens
        metadata = PagedMetadata.build(slots, query_lens, context_lens, tables, bm.block_size, device)
        ids = torch.tensor(input_ids, device=device)[None]  # (1, N)
        pos = torch.tensor(positions, device=device)[None]  # (1, N)
        logits_at = torch.tensor(last_rows, device=device)
        return self.draft(ids, pos, self.attention, metadata, logits_at=logits_at)[0]  # (len(items), V)
