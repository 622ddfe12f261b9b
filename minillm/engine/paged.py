"""PagedEngine: the scheduler, the block manager, the paged KV cache and its attention backend in one step loop.

Every `step()` is: schedule (which sequences, how many tokens each; preempt if blocks run out) -> the attention
backend prepares the step (``PagedAttention.prepare``: packed input ids, positions, slots, block tables) -> run one
packed forward pass (copy-on-write first) -> commit the written K/V to the block manager (fork parallel-sampling children
whose shared prompt is done) -> sample one token for every sequence whose known tokens are all computed -> free
the blocks of finished sequences. That is the whole engine of vLLM (arXiv:2309.06180) in miniature; notebook 05
(``05_continuous_batching``) runs it step by step.

Sizing the pool (``num_kv_blocks=None``): on a GPU, ``GPU_MEMORY_FRACTION`` of the memory still free once the
weights are loaded (the rest is left for activations: the (N, V) logits of a 2048-token step alone are ~200 MB);
on a CPU, ``CPU_KV_CACHE_BYTES``. Either way no more than every sequence at full length would need
(``max_num_seqs * max_model_len`` tokens), since more could never be used.

`stats()` describes the last run (from the moment a request arrives at an idle engine): the waste percentage is
taken at the step where the most blocks were in use, as reserved-but-unfilled slots over reserved slots.
"""

from __future__ import annotations

import torch

from minillm.attention.backends import PagedAttention
from minillm.engine.request import Sequence, sample_and_append
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


class PagedEngine:
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
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.kv_cache = cache_cls(
            cfg.num_layers, num_kv_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=param.dtype,
            device=param.device,
        )
        self.attention = PagedAttention(self.kv_cache, self.block_manager, attention_backend)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, scheduler,
                                   enable_chunked_prefill)
        self.model = model
        self._start_run()

    # ---- the engine interface (see engine/llm.py) --------------------------------------------------------------
    def add(self, seq: Sequence, parent: Sequence | None = None) -> None:
        """Queue `seq`; `parent`: another completion of the same request (n > 1), whose prompt blocks it will share."""
        if not self.has_unfinished():
            self._start_run()
        self.scheduler.add(seq, parent)

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
        out = self.scheduler.schedule()
        assert out.seqs or not self.has_unfinished(), "scheduler made no progress with requests pending"
        if not out.seqs:
            return []
        sampled = [seq for i, seq in enumerate(out.seqs) if out.is_last_chunk(i)]  # before commit moves the counts
        self.kv_cache.copy_blocks(out.copies)  # copy-on-write before this step writes into the copies
        inputs = self.attention.prepare(out)
        with torch.no_grad():
            logits = self.model(inputs.input_ids, inputs.positions, self.attention, inputs.metadata,
                                logits_at=inputs.sample_rows)[0]  # (len(sampled), V)
        rows, row_of = list(range(len(sampled))), {seq.seq_id: j for j, seq in enumerate(sampled)}
        for parent, child in self.scheduler.commit(out):  # n > 1: children draw from the parent's logits
            sampled.append(child)
            rows.append(row_of[parent.seq_id])
        sample_and_append(sampled, logits[rows])
        self._record(out)
        self.scheduler.free_finished()
        return sampled

    # ---- statistics --------------------------------------------------------------------------------------------
    def _start_run(self) -> None:
        bm = self.block_manager
        self.num_steps, self.batch_sizes, self.tokens_per_step, self.kv_blocks_used_history = 0, [], [], []
        self.kv_blocks_peak, self.kv_waste_pct = 0, 0.0
        self._run_base = (self.scheduler.num_preemptions, bm.prefix_cache_hits, bm.prefix_cache_queries)

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
            self.kv_waste_pct = 100.0 * sum(unfilled.values()) / (used * bm.block_size)

    def stats(self) -> dict:
        bm = self.block_manager
        preemptions, hits, queries = (a - b for a, b in zip(
            (self.scheduler.num_preemptions, bm.prefix_cache_hits, bm.prefix_cache_queries), self._run_base))
        return {
            "scheduler": self.scheduler.policy,
            "block_size": bm.block_size,
            "kv_cache_bytes": self.kv_cache.nbytes,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_peak": self.kv_blocks_peak,
            "kv_waste_pct": self.kv_waste_pct,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "num_preemptions": preemptions,
            "num_steps": self.num_steps,
            "batch_sizes": list(self.batch_sizes),
            "tokens_per_step": list(self.tokens_per_step),
            "kv_blocks_used_history": list(self.kv_blocks_used_history),
        }
