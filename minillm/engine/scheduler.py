"""The scheduler: which sequences run this step, and how many tokens each computes.

Teaches iteration-level scheduling (Orca, Yu et al., OSDI 2022): the batch is re-decided at every model step, so
a sequence that finishes leaves at once and a waiting one takes its place, instead of a static batch that runs until
its longest member is done. The policy is vLLM's (Kwon et al., arXiv:2309.06180, section 4.5) with Sarathi-Serve's
chunked prefill (Agrawal et al., arXiv:2403.02310, section 4):

  1. running decodes first (one token each), oldest first;
  2. then running sequences whose prompt is half done (chunked prefill) continue;
  3. then waiting sequences, first come first served, while the token budget (`max_num_batched_tokens`) and the
     sequence cap (`max_num_seqs`) allow; a prompt longer than what is left of the budget is cut into chunks.
  4. When a decode needs a KV block and none is free, the *newest* running sequence is preempted: its blocks are
     freed, it goes back to the front of the queue, and later its tokens are recomputed (the prefix cache may
     give some back). Nothing is ever dropped.

``policy="static"`` keeps the same machinery but forms a batch only when the previous one has fully finished:
the baseline that leaves holes. Parallel sampling (n > 1): a request's extra sequences wait as *children* of the
first one and are forked from it (sharing its prompt blocks, copy-on-write) once its prompt is computed.
No tensors here: this is bookkeeping over a `BlockManager`. Notebook 05 (``05_continuous_batching``) draws it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from minillm.engine.request import Sequence, Status
from minillm.kvcache.blocks import BlockManager

POLICIES = ("continuous", "static")


@dataclass
class SchedulerOutput:
    """One step's plan: sequence ``seqs[i]`` computes ``num_new_tokens[i]`` tokens from its ``num_computed_tokens``."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) block pairs, before writing
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def is_last_chunk(self, i: int) -> bool:
        """True when sequence i's known tokens (and its guesses, if it speculates) are all computed after this step:
        its last rows give logits (one, or one per guess and one more)."""
        seq = self.seqs[i]
        guesses = len(getattr(seq, "spec_token_ids", []))  # chapter 09's; a plain sequence (notebook 05's) has none
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens + guesses


def whole_sequence_scheduler(max_num_seqs: int, max_model_len: int, policy: str) -> Scheduler:
    """A scheduler for backends without a paged pool (no cache, a contiguous slab): a sequence always runs whole in one
    step (no chunked prefill, a token budget that fits every sequence at full length). Its block manager only counts,
    sized so it never runs out: those backends keep their own memory (or none)."""
    block_size = 16
    bm = BlockManager(max_num_seqs * -(-max_model_len // block_size), block_size, enable_prefix_caching=False)
    return Scheduler(bm, max_num_seqs, max_num_seqs * max_model_len, policy, enable_chunked_prefill=False)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        policy: str = "continuous",
        enable_chunked_prefill: bool = True,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduler policy {policy!r}; choose one of {POLICIES}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs} and {max_num_batched_tokens}"
            )
        self.block_manager = block_manager
        # Every running sequence must be able to decode each step, so the token budget also caps the sequences.
        self.max_num_seqs, self.max_num_batched_tokens = min(max_num_seqs, max_num_batched_tokens), max_num_batched_tokens
        self.policy, self.enable_chunked_prefill = policy, enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first: the end of the list is what gets preempted
        self.children: dict[int, list[Sequence]] = {}  # seq_id -> sequences to fork from it once its prompt is done
        self.static_batch: set[int] = set()  # seq_ids of the current static batch
        self.num_preemptions = 0

    # ---- requests ----------------------------------------------------------------------------------------------
    def add(self, seq: Sequence, parent: Sequence | None = None) -> None:
        """Queue a sequence; one that can never fit the KV pool or the token budget is refused with a ValueError.

        ``parent``: parallel sampling (n > 1) -- ``seq`` is another completion of ``parent``'s prompt, forked from it
        (sharing its prompt blocks) once that prompt is computed, instead of computing the prompt again.
        """
        bm = self.block_manager
        max_len = min(len(seq.prompt_token_ids) + seq.params.max_tokens, seq.max_model_len)
        if -(-max_len // bm.block_size) > bm.num_blocks:
            raise ValueError(
                f"request {seq.request_id} may need {max_len} tokens = {-(-max_len // bm.block_size)} KV blocks of "
                f"{bm.block_size}, but the pool has only {bm.num_blocks} blocks: it could never run. Use more "
                "num_kv_blocks, a shorter prompt or a smaller max_tokens"
            )
        if not self.enable_chunked_prefill and max_len > self.max_num_batched_tokens:
            raise ValueError(
                f"without chunked prefill a sequence must fit one step: request {seq.request_id} may need {max_len} "
                f"tokens but max_num_batched_tokens={self.max_num_batched_tokens}"
            )
        if seq.params.n > self.max_num_seqs:
            raise ValueError(f"n={seq.params.n} completions exceed max_num_seqs={self.max_num_seqs}")
        if parent is None:
            self.waiting.append(seq)
            return
        if parent not in self.waiting or parent.num_computed_tokens or parent.prompt_token_ids != seq.prompt_token_ids:
            raise ValueError(f"sequence {seq.seq_id} can only be forked from a waiting sequence with the same prompt")
        self.children.setdefault(parent.seq_id, []).append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request as "aborted" and free its blocks."""
        aborted = []
        for seq in [*self.waiting, *self.running]:
            if seq.request_id == request_id:
                aborted += [seq, *self.children.pop(seq.seq_id, [])]
                if seq.seq_id in self.block_manager.tables:
                    self.block_manager.free(seq.seq_id)
        for seq in aborted:
            seq.finish("aborted")
        self.waiting = deque(s for s in self.waiting if not s.is_finished)
        self.running = [s for s in self.running if not s.is_finished]
        return aborted

    # ---- one step ----------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out, bm = SchedulerOutput(), self.block_manager
        budget = self.max_num_batched_tokens
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes:  # 1. decodes: each needs one slot, maybe a fresh block; make room by preempting
            guesses = len(seq.spec_token_ids)  # speculative decoding: guesses ride along only if they fit as they are
            if guesses and (1 + guesses > budget or not bm.can_allocate(
                    bm.num_blocks_needed(seq.seq_id, seq.num_tokens + guesses))):
                seq.spec_token_ids, seq.spec_draft_probs = [], None
            while seq.status == Status.RUNNING and not bm.can_allocate(bm.num_blocks_needed(seq.seq_id, seq.num_tokens)):
                scheduled = {s.seq_id for s in out.seqs}
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)  # newest; maybe seq
                self._preempt(victim, out)
            if seq.status == Status.RUNNING:
                self._schedule(seq, 1 + len(seq.spec_token_ids), out)
                budget -= 1 + len(seq.spec_token_ids)
        memory_short = bool(out.preempted)
        for seq in prefills:  # 2. unfinished prompts continue (a chunk never preempts anyone: it waits)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.status != Status.RUNNING or n == 0:
                continue
            if bm.can_allocate(bm.num_blocks_needed(seq.seq_id, seq.num_computed_tokens + n)):
                self._schedule(seq, n, out)
                budget -= n
            else:
                memory_short = True
        if memory_short:  # admitting new prompts now would take the blocks the running ones wait for
            return out
        if self.policy == "static" and not any(s.seq_id in self.static_batch for s in [*self.running, *self.waiting]):
            self.static_batch = {s.seq_id for s in list(self.waiting)[: self.max_num_seqs]}
        # Children to be forked from running sequences will run too: they count against max_num_seqs already.
        num_seqs = sum(1 + len(self.children.get(s.seq_id, [])) for s in self.running)
        while self.waiting and budget > 0:  # 3. admit waiting sequences, FCFS
            seq = self.waiting[0]
            if self.policy == "static" and seq.seq_id not in self.static_batch:
                break
            num_seqs += 1 + len(self.children.get(seq.seq_id, []))
            if num_seqs > self.max_num_seqs:
                break
            n = self._admit(seq, budget)
            if n == 0:
                break  # head-of-line blocking keeps FCFS fair: nobody overtakes the oldest waiting request
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._schedule(seq, n, out)
            budget -= n
        return out

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Allocate a waiting sequence's blocks (reusing cached prefix blocks); tokens to compute now, or 0."""
        bm = self.block_manager
        num_cached = bm.allocate_prompt(seq.seq_id, seq.token_ids)
        n = min(seq.num_tokens - num_cached, budget)
        fits = self.enable_chunked_prefill or n == seq.num_tokens - num_cached
        if fits and bm.can_allocate(bm.num_blocks_needed(seq.seq_id, num_cached + n)):
            seq.num_computed_tokens = num_cached
            return n
        bm.undo_allocate_prompt(seq.seq_id, seq.num_tokens)  # not this step: retry later
        return 0

    def _schedule(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        out.copies += self.block_manager.ensure_capacity(seq.seq_id, seq.num_computed_tokens + n)
        out.seqs.append(seq)
        out.num_new_tokens.append(n)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free all of seq's blocks and send it to the front of the queue; it will be recomputed from its tokens."""
        self.block_manager.free(seq.seq_id)
        self.running.remove(seq)
        seq.status, seq.num_computed_tokens = Status.PREEMPTED, 0
        seq.spec_token_ids, seq.spec_draft_probs = [], None  # guesses are remade when it decodes again
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def preempt_all(self) -> None:
        """After a step that raised (an error, Ctrl-C): nobody knows which K/V it wrote, so recompute everyone.

        Every running sequence that has not finished is preempted (blocks freed, back to the front of the queue, in
        its order); finished ones are freed. The engine is then as if those sequences had just arrived with their
        tokens so far, so no request is lost and no block leaks.
        """
        for seq in reversed(list(self.running)):
            if seq.is_finished:
                self.running.remove(seq)
                self.block_manager.free(seq.seq_id)
            else:
                self._preempt(seq, SchedulerOutput())
        for seq in self.waiting:  # a step interrupted inside _admit may have left a waiting sequence allocated
            if seq.seq_id in self.block_manager.tables:
                self.block_manager.free(seq.seq_id)
            seq.num_computed_tokens = 0

    # ---- after the model ran -------------------------------------------------------------------------------------
    def commit(self, out: SchedulerOutput) -> list[tuple[Sequence, Sequence]]:
        """Record the K/V just written; fork the children of sequences whose prompt is now complete.

        Returns (parent, child) pairs: a child samples its first token from its parent's logits.
        """
        forked = []
        for seq, n in zip(out.seqs, out.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            for child in self.children.pop(seq.seq_id, []) if seq.num_computed_tokens == seq.num_tokens else []:
                self.block_manager.fork(seq.seq_id, child.seq_id)
                child.status, child.num_computed_tokens = Status.RUNNING, seq.num_computed_tokens
                self.running.append(child)
                self.static_batch.add(child.seq_id)
                forked.append((seq, child))
        return forked

    def free_finished(self) -> None:
        for seq in self.running:
            if seq.is_finished:
                self.block_manager.free(seq.seq_id)
        self.running = [s for s in self.running if not s.is_finished]
