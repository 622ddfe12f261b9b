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

from minillm.engine.request import Sequence, sample_and_append
from minillm.engine.scheduler import Scheduler, SchedulerOutput
from minillm.kvcache.memory import waste_fraction


class Engine:
    """A scheduler, an attention backend with ``prepare(out)``, and a model, stepped together."""

    def __init__(self, model, scheduler: Scheduler, attention):
        self.model, self.scheduler, self.attention = model, scheduler, attention
        self.block_manager = scheduler.block_manager
        self.last_step = SchedulerOutput()  # what the latest step scheduled (the simulator draws it)
        self._start_run()

    # ---- the engine interface (see engine/llm.py) --------------------------------------------------------------
    def add(self, seq: Sequence, parent: Sequence | None = None) -> None:
        """Queue `seq`; `parent`: another completion of the same request (n > 1), whose prompt blocks it will share."""
        if not self.has_unfinished():
            self._start_run()
        self.scheduler.add(seq, parent if self.attention.forks_share_kv else None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> list[Sequence]:
        return self.scheduler.abort(request_id)

    def step(self) -> list[Sequence]:
        """One iteration: returns the sequences that got a token (possibly finishing).

        If anything in it raises (a kernel error, Ctrl-C), every running sequence is preempted before the exception
        propagates: the step's half-written K/V is never trusted, and the engine stays usable.
        """
        try:
            return self._step()
        except BaseException:
            self.scheduler.preempt_all()
            raise

    def _step(self) -> list[Sequence]:
        out = self.last_step = self.scheduler.schedule()
        assert out.seqs or not self.has_unfinished(), "scheduler made no progress with requests pending"
        if not out.seqs:
            return []
        sampled = [seq for i, seq in enumerate(out.seqs) if out.is_last_chunk(i)]  # before commit moves the counts
        inputs = self.attention.prepare(out)
        with torch.no_grad():
            logits = self.model(inputs.input_ids, inputs.positions, self.attention, inputs.metadata,
                                logits_at=inputs.logits_at)  # (B, T or K, V)
        logits = logits[inputs.rows, inputs.cols]  # (len(sampled), V)
        rows, row_of = list(range(len(sampled))), {seq.seq_id: j for j, seq in enumerate(sampled)}
        for parent, child in self.scheduler.commit(out):  # n > 1: children draw from the parent's logits
            sampled.append(child)
            rows.append(row_of[parent.seq_id])
        sample_and_append(sampled, logits[rows])
        self._record(out)
        if not self.attention.keeps_kv:  # nothing was stored: the next step computes every token again
            for seq in self.scheduler.running:
                seq.num_computed_tokens = 0
        self.scheduler.free_finished()
        return sampled

    # ---- statistics --------------------------------------------------------------------------------------------
    def _start_run(self) -> None:
        bm = self.block_manager
        self.num_steps, self.batch_sizes, self.tokens_per_step, self.kv_blocks_used_history = 0, [], [], []
        self.kv_blocks_peak, self.kv_waste_pct = 0, 0.0
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
            # Last, so a backend may say more precisely what it computed (a contiguous batch counts its idle rows).
            **self.attention.stats(),
        }
