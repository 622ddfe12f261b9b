"""The engine loop: one step = schedule -> prepare -> run the model -> commit -> sample -> free.

That is the whole engine of vLLM (arXiv:2309.06180) in miniature, and the one place in minillm that writes it:

  1. the scheduler decides which sequences run this step and how many tokens each computes (preempting when KV
     blocks run out);
  2. the attention backend turns that plan into the model's inputs and its own metadata (``prepare``: packed input
     ids, positions, slots, block tables; copy-on-write of shared blocks first);
  3. one forward pass of the model over the packed batch;
  4. the scheduler commits the K/V just written (and forks parallel-sampling children whose prompt is done);
  5. every sequence whose known tokens are all computed samples its next token;
  6. finished sequences give their blocks back.

Every ``kv_cache`` mode is this loop with another attention backend and scheduler policy: "none"
(``engine/recompute.py``: no cache, every step recomputes everything), "contiguous" (``engine/contiguous.py``: a
static batch over a left-padded slab), "paged" (``engine/paged.py``: a paged pool, continuous batching). The
model-free simulator behind notebook 05's timelines (``engine/simulate.py``) is this loop with a stand-in model and
backend. ``stats()`` describes the last run, from the moment a request arrives at an idle engine.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from minillm.engine.request import Sequence, sample_and_append
from minillm.engine.scheduler import Scheduler, SchedulerOutput
from minillm.kvcache.memory import waste_fraction


class Engine:
    """A scheduler, an attention backend with ``prepare(out)``, and a model, stepped together."""

    def __init__(self, model, scheduler: Scheduler, attention, proposer=None):
        self.model, self.scheduler, self.attention = model, scheduler, attention
        self.proposer = proposer  # speculative decoding (chapter 09, ``minillm/spec/``): None = one token per step
        self.block_manager = scheduler.block_manager
        self.last_step = SchedulerOutput()  # what the latest step scheduled (the simulator draws it)
        self.last_verifications: list[tuple[int, list[int], list[int]]] = []  # notebook 09 colors them
        self._start_run()

    # ---- the engine interface (see engine/llm.py) --------------------------------------------------------------
    def add(self, seq: Sequence, parent: Sequence | None = None) -> None:
        """Queue `seq`; `parent`: another completion of the same request (n > 1), whose prompt blocks it will share."""
        if self.proposer is not None and seq.params.n > 1:
            raise ValueError(f"speculative decoding serves one completion per request; got n={seq.params.n}")
        if self.proposer is not None and seq.params.logits_processors:
            raise ValueError("speculative decoding verifies guesses without logits_processors (structured output); "
                             "use an LLM without speculative_config for them")
        if not self.has_unfinished():
            self._start_run()
        self.scheduler.add(seq, parent if self.attention.forks_share_kv else None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = self.scheduler.abort(request_id)
        self._forget_stopped()
        return aborted

    def step(self) -> list[Sequence]:
        """One iteration: returns the sequences that got a token (possibly finishing).

        If anything in it raises (a kernel error, Ctrl-C), every running sequence is preempted before the exception
        propagates: the step's half-written K/V is never trusted, and the engine stays usable.
        """
        try:
            return self._step()
        except BaseException:
            self.scheduler.preempt_all()
            self._forget_stopped()
            raise

    def _forget_stopped(self) -> None:
        """The proposer drops what it kept for sequences no longer running (a draft model's KV blocks)."""
        if self.proposer is not None:
            self.proposer.forget({s.seq_id for s in self.scheduler.running})

    def _step(self) -> list[Sequence]:
        if self.proposer is not None:  # guesses for every decoding sequence; the scheduler keeps those that fit
            self.proposer.propose([s for s in self.scheduler.running
                                   if not s.is_finished and s.num_tokens - s.num_computed_tokens == 1])
        with record_function("minillm.schedule"):  # named regions: a profile (fast/profiler.py) reads like this loop
            out = self.last_step = self.scheduler.schedule()
        self.last_verifications = []  # (seq_id, guesses, emitted tokens) of this step's speculating sequences
        assert out.seqs or not self.has_unfinished(), "scheduler made no progress with requests pending"
        if not out.seqs:
            return []
        last = [i for i in range(len(out.seqs)) if out.is_last_chunk(i)]  # before commit moves the counts
        with record_function("minillm.prepare"):
            inputs = self.attention.prepare(out)
        with torch.no_grad(), record_function("minillm.forward"):
            logits = self.model(inputs.input_ids, inputs.positions, self.attention, inputs.metadata,
                                logits_at=inputs.logits_at)  # (B, T or K, V)
        logits = logits[inputs.rows, inputs.cols]  # (rows, V): one per sampling sequence, 1 + k if it speculates
        self._record(out)  # what the model computed, guesses included
        sampled, rows, row_of, speculated, first = [], [], {}, [], 0
        for i in last:
            seq, k = out.seqs[i], len(out.seqs[i].spec_token_ids)
            if k:  # keeps the K/V of its last token and of the accepted guesses it appended
                out.num_new_tokens[i] = 1 + self._verify(seq, logits[first : first + k + 1])
                speculated.append(seq)
            else:
                sampled.append(seq)
                rows.append(first)
                row_of[seq.seq_id] = first
            first += k + 1
        for parent, child in self.scheduler.commit(out):  # n > 1: children draw from the parent's logits
            sampled.append(child)
            rows.append(row_of[parent.seq_id])
        sample_and_append(sampled, logits[rows])
        bm = self.block_manager
        for seq in speculated:  # rejected guesses: their slots are garbage, their blocks go back
            if not seq.is_finished:
                bm.trim(seq.seq_id, min(seq.num_tokens, len(bm.tables[seq.seq_id]) * bm.block_size))
        sampled += speculated
        if not self.attention.keeps_kv:  # nothing was stored: the next step computes every token again
            for seq in self.scheduler.running:
                seq.num_computed_tokens = 0
        self.scheduler.free_finished()
        self._forget_stopped()
        return sampled

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> int:
        """Keep `seq`'s guesses the target agrees with (logits (1 + k, V) at its last token and each guess), append
        the emitted tokens (stopping where the sequence finishes), and return how many appended guesses have K/V."""
        from minillm.engine.sampling import sampling_probs
        from minillm.spec.verify import greedy_accept, rejection_sample

        guesses, draft_probs = seq.spec_token_ids, seq.spec_draft_probs
        seq.spec_token_ids, seq.spec_draft_probs = [], None
        if seq.params.is_greedy:
            emitted = greedy_accept(guesses, logits.argmax(dim=-1).tolist())
        else:
            emitted = rejection_sample(guesses, sampling_probs(logits, seq.params), draft_probs, seq.generator)
        accepted = len(emitted) - 1  # the last emitted token is the target's own (a correction or a bonus)
        self.proposer.observe(seq, len(guesses), accepted)
        self.last_verifications.append((seq.seq_id, guesses, emitted))
        self.num_verified, self.num_proposed, self.num_accepted = (
            self.num_verified + 1, self.num_proposed + len(guesses), self.num_accepted + accepted)
        appended = 0
        for token in emitted:
            seq.append_token(token)
            appended += 1
            if seq.is_finished:
                break
        return min(accepted, appended)

    # ---- statistics --------------------------------------------------------------------------------------------
    def _start_run(self) -> None:
        bm = self.block_manager
        self.num_steps, self.batch_sizes, self.tokens_per_step, self.kv_blocks_used_history = 0, [], [], []
        self.kv_blocks_peak, self.kv_waste_pct = 0, 0.0
        self.num_verified = self.num_proposed = self.num_accepted = 0  # speculative decoding's counts
        self._run_base = (self.scheduler.num_preemptions, bm.prefix_cache_hits, bm.prefix_cache_queries)
        self.attention.start_run()

    def _record(self, out) -> None:
        bm = self.block_manager
        used = bm.num_used_blocks
        self.num_steps += 1
        self.batch_sizes.append(len(out.seqs))
        self.tokens_per_step.append(out.num_batched_tokens)
        self.kv_blocks_used_history.append(used)
        if used > self.kv_blocks_peak:
            # Only a sequence's last block can be partly empty; forked sequences may share it: count it once.
            unfilled: dict[int, int] = {}
            for seq in self.scheduler.running:
                table = bm.tables[seq.seq_id]
                if table:
                    empty = len(table) * bm.block_size - seq.num_computed_tokens
                    unfilled[table[-1]] = min(empty, unfilled.get(table[-1], empty))
            self.kv_blocks_peak = used
            reserved = used * bm.block_size
            self.kv_waste_pct = 100.0 * waste_fraction(reserved, reserved - sum(unfilled.values()))

    def stats(self) -> dict:
        """Steps, batch sizes and preemptions of the last run, and the attention backend's own counts."""
        return {
            "scheduler": self.scheduler.policy,
            "num_preemptions": self.scheduler.num_preemptions - self._run_base[0],
            "num_steps": self.num_steps,
            "batch_sizes": list(self.batch_sizes),
            "tokens_per_step": list(self.tokens_per_step),
            **({} if self.proposer is None else {"speculative": {
                "num_speculative_tokens": self.proposer.num_speculative_tokens, "proposed": self.num_proposed,
                "accepted": self.num_accepted, "verification_steps": self.num_verified,
                "acceptance_rate": self.num_accepted / self.num_proposed if self.num_proposed else 0.0,
                "mean_accepted_per_verification": self.num_accepted / self.num_verified if self.num_verified else 0.0,
            }}),
            # Last, so a backend may say more precisely what it computed (a contiguous batch counts its idle rows).
            **self.attention.stats(),
        }
