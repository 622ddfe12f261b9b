"""`LLM`: the public front door. Text in, text out; everything in between is an engine you can swap.

The front end turns prompts (strings, token ids or chat messages) into `Sequence`s, hands them to an engine and
steps it until every sequence has finished, collecting text and timings. The engine is chosen by ``kv_cache``:

    "none"        RecomputeEngine  (engine/recompute.py)   no cache, recompute everything each step  (chapter 01)
    "contiguous"  ContiguousEngine (engine/contiguous.py)  one preallocated slab per sequence          (chapter 03)
    "paged"       PagedEngine      (engine/paged.py)       KV blocks, continuous batching, preemption (chapters 04-05)

All three are the one engine loop of ``engine/engine.py`` with another attention backend and scheduler policy, so
they offer the same five methods: ``add(seq, parent)``, ``step() -> seqs that got a token``, ``abort(request_id)``,
``has_unfinished()``, ``stats()``; `generate` and `stream` are written once, here.

``speculative_config`` (paged only, chapter 09, ``minillm/spec/``) gives the engine a proposer: each step it guesses
a few tokens per decoding sequence and the target verifies them in the same forward pass; the output is what it would
be without (greedy) or distributed as it would be (sampling).

``tensor_parallel_size`` (paged only, chapter 11, ``minillm/parallel/``) splits every layer over that many processes:
this one is rank 0 and keeps the scheduler, the block manager and the sampler; ``close()`` ends the workers.

The request lifecycle cannot leak:
  * each request's `Sequence`s collect its own tokens and text, and every consumer reads only its own requests
    (a stream keeps a cursor into its text), so `generate`, several interleaved `stream`s and other threads can
    share one engine without any of them losing text;
  * `generate` and `stream` abort their own unfinished requests when they exit early for any reason (an exception,
    Ctrl-C, a stream closed or dropped before its end, the other completions of a streamed ``n > 1`` request), and
    an engine step that raises first preempts what it was running, so the engine is left clean;
  * a request is validated completely before any of its sequences is queued.

Thread safety: an `LLM` may be used from several threads at once (a tensor-parallel one too: only rank 0's threads
ever touch the engine). One lock guards the engine: submitting, aborting and each engine step hold it, so the
threads take turns stepping the shared engine, and every step advances everyone's requests. A model object passed in
is never changed: with ``quantization`` the engine quantizes a copy.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from minillm._triton import fallback_counts
from minillm.attention.backends import KERNELS, resolve_kernel
from minillm.engine.recompute import RecomputeEngine
from minillm.engine.request import Detokenizer, RequestOutput, Sequence
from minillm.engine.sampling import SamplingParams
from minillm.fast.execution import choose_execution, wrap_with_graphs
from minillm.fast.graphs import DecodeGraphs
from minillm.loading import load_model, resolve_device, resolve_dtype

KV_CACHES = ("none", "contiguous", "paged")
SCHEDULERS = ("continuous", "static")
ATTENTION_BACKENDS = ("auto", *KERNELS)

Prompt = str | list[int] | list[dict[str, str]]


class LLM:
    def __init__(
        self,
        model: str | torch.nn.Module = "smollm2-135m",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        kv_cache: str = "paged",
        block_size: int = 16,
        attention_backend: str = "auto",
        quantization: str | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        scheduler: str = "continuous",
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
        tokenizer: Any = None,
        kv_cache_dtype: str | None = None,
        speculative_config: dict | None = None,
        enforce_eager: bool | None = None,
        compile: bool | None = None,
        tensor_parallel_size: int = 1,
        distributed_backend: str | None = None,
    ):
        if kv_cache not in KV_CACHES:
            raise ValueError(f"unknown kv_cache {kv_cache!r}; choose one of {KV_CACHES}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention_backend {attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
        if kv_cache_dtype not in (None, "int8"):
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose None (the model's dtype) or 'int8'")
        if kv_cache_dtype is not None and kv_cache != "paged":
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs kv_cache='paged', got kv_cache={kv_cache!r}")
        for name, value in [("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        self._tp, self.is_driver = None, True  # is_driver: False only on torchrun's ranks > 0
        if tensor_parallel_size != 1:  # chapter 11 (minillm/parallel/): one shard of every layer per process
            check_tensor_parallel_options(tensor_parallel_size, kv_cache, quantization, speculative_config,
                                          enforce_eager, compile)
            from minillm.parallel.executor import TensorParallelExecutor

            self.device = resolve_device(device)
            self.dtype = resolve_dtype(dtype, self.device)
            self._tp = TensorParallelExecutor(model, tensor_parallel_size, self.device, self.dtype, distributed_backend,
                                              attention_backend, block_size, kv_cache_dtype)
            if self._tp.rank != 0:  # torchrun's other ranks serve rank 0's steps until it closes
                self.is_driver = False
                self._tp.join_as_worker()
                return
            weakref.finalize(self, self._tp.shutdown)  # the workers end with this object, or at exit
            self.model, self.tokenizer = self._tp.model, self._tp.tokenizer
        elif isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("pass tokenizer=... together with a model object")
            self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
            _check_model_placement(self.device, self.dtype, device, dtype)
            # quantize_model rewrites layers in place: work on a copy so the caller's model stays what it was.
            self.model = copy.deepcopy(model) if quantization is not None else model
            self.tokenizer = tokenizer
        else:
            self.device = resolve_device(device)
            self.dtype = resolve_dtype(dtype, self.device)
            self.model, self.tokenizer = load_model(model, device=self.device, dtype=self.dtype)
        # The whole model's config (with tensor parallelism the model here is rank 0's slice, with its own head counts).
        self.config = self._tp.config if self._tp is not None else self.model.config
        if quantization is not None:
            from minillm.quant import quantize_model

            quantize_model(self.model, quantization, tokenizer=self.tokenizer)  # AWQ tokenizes its calibration text
        # Kernels that fall back to torch on a GPU are counted process-wide; stats() shows those since this point.
        self._fallbacks_base = fallback_counts()
        # Chosen once, here: every layer of every step uses this kernel, and stats() reports it.
        self.attention_backend = resolve_kernel(attention_backend, self.device, self.config.head_dim, self.dtype)
        self.max_model_len = check_max_model_len(max_model_len, self.config.max_position_embeddings)
        self.eos_token_ids = sorted(set(self.config.eos_token_ids) | {t for t in [self.tokenizer.eos_token_id] if t is not None})
        self.kv_cache = kv_cache
        try:
            self.engine = self._make_engine(
                kv_cache, scheduler=scheduler, block_size=block_size, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype,
                enable_chunked_prefill=enable_chunked_prefill,
            )
            if self._tp is not None:
                self._tp.attach(self.engine)  # workers size their pools like rank 0's; every step is broadcast
                enforce_eager = True
        except BaseException:
            if self._tp is not None:
                self._tp.shutdown()  # no worker outlives a failed construction
            raise
        # Chapter 10 (minillm/fast/): the engine calls the model eagerly, compiled, or replays decode steps as CUDA
        # graphs; chosen once, here, falling back to eager with a reason stats() reports.
        forward, self._execution = choose_execution(self.model, self.device, self.attention_backend, kv_cache,
                                                    enforce_eager, compile)
        self.engine.model = wrap_with_graphs(forward, self.engine, self._execution, kv_cache, max_num_seqs,
                                             self.max_model_len)
        if speculative_config is not None:  # chapter 09: guesses verified in the engine loop (minillm/spec/)
            from minillm.spec.config import make_proposer

            self.engine.proposer = make_proposer(
                speculative_config, self.model, kv_cache, self.max_model_len, block_size=block_size,
                num_kv_blocks=self.engine.block_manager.num_blocks if kv_cache == "paged" else 0,
                max_num_seqs=max_num_seqs, kernel=self.attention_backend)
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._lock = threading.RLock()  # one engine, many callers: see "Thread safety" above

    def close(self) -> None:
        """End the tensor-parallel workers (nothing to do on one process); the LLM refuses new work afterwards."""
        if self._tp is not None and self.is_driver:  # torchrun's other ranks end when rank 0 closes
            with self._lock:
                self._tp.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make_engine(self, kv_cache: str, **options):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if kv_cache == "none":
            return RecomputeEngine(self.model, options["max_num_seqs"], pad, self.attention_backend, self.max_model_len)
        if kv_cache == "contiguous":
            from minillm.engine.contiguous import ContiguousEngine

            return ContiguousEngine(self.model, options["max_num_seqs"], pad, self.attention_backend,
                                    self.max_model_len)
        if kv_cache == "paged":
            from minillm.engine.paged import PagedEngine

            return PagedEngine(self.model, attention_backend=self.attention_backend, max_model_len=self.max_model_len,
                               **options)
        raise ValueError(f"kv_cache={kv_cache!r} is not available in this version; use 'none'")

    # -- prompts -------------------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """A string, a list of token ids, or chat messages ([{"role": ..., "content": ...}]) -> token ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt).input_ids
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            if max(ids) >= self.config.vocab_size or min(ids) < 0:
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got min {min(ids)}, max {max(ids)}")
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            raise TypeError(
                "a prompt must be a non-empty string, a list of token ids, or a list of chat messages "
                f"({{'role': ..., 'content': ...}}); got {type(prompt).__name__} {str(prompt)[:60]!r}"
            )
        if not ids:
            raise ValueError("the prompt is empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len}; "
                "shorten it (one more token is needed for the answer)"
            )
        return ids

    def _check_driver(self) -> None:
        if not self.is_driver:
            raise RuntimeError(f"this process is rank {self._tp.rank} of a torchrun job: it served rank 0's steps "
                               "until rank 0 closed its LLM; only rank 0 takes requests (guard with llm.is_driver)")

    def _is_single_prompt(self, prompts) -> bool:
        if isinstance(prompts, str):
            return True
        return bool(prompts) and all(isinstance(p, (int, dict)) for p in prompts)

    def add_request(self, prompt: Prompt, params: SamplingParams) -> list[Sequence]:
        """Queue one prompt; returns its n sequences (their request_id is shared). All or nothing is queued."""
        self._check_driver()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        with self._lock:  # tokenizers are not safe to call from several threads at once
            ids = self.encode(prompt)
            request_id = str(next(self._request_ids))
            seqs = [
                Sequence(
                    seq_id=next(self._seq_ids), request_id=request_id, prompt_token_ids=ids, params=params,
                    eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                    detokenizer=Detokenizer(self.tokenizer), seed=None if params.seed is None else params.seed + i,
                )
                for i in range(params.n)
            ]
            try:
                for i, seq in enumerate(seqs):  # n > 1: the other completions fork from the first
                    self.engine.add(seq, parent=seqs[0] if i else None)
            except BaseException:
                self.engine.abort(request_id)
                raise
        return seqs

    def _advance(self, waiting_for: list[Sequence]) -> None:
        """One engine step for a caller waiting on `waiting_for`, holding the lock: it advances everyone's requests."""
        with self._lock:
            if all(s.is_finished for s in waiting_for):  # another thread's step (or abort) got there first
                return
            if not self.engine.has_unfinished():
                raise RuntimeError("the engine has nothing left to run but a request is unfinished; please report this")
            self.step()

    def step(self) -> list[Sequence]:
        """One engine step for every queued request (a server's engine thread calls this in a loop); returns the
        sequences that got a token. Holds the lock, so other threads may submit and abort meanwhile."""
        self._check_driver()
        with self._lock:
            if not self.engine.has_unfinished():
                return []
            if self._tp is None:
                return self.engine.step()
            with self._tp.step():  # every rank runs the step; a Ctrl-C waits for its end
                return self.engine.step()

    def _abort_unfinished(self, seqs: list[Sequence]) -> None:
        with self._lock:
            for request_id in dict.fromkeys(s.request_id for s in seqs if not s.is_finished):
                self.engine.abort(request_id)

    # -- running -------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion. `params` may be one SamplingParams for all or one per prompt."""
        self._check_driver()
        if self._is_single_prompt(prompts):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise TypeError("prompts must be a prompt or a non-empty list of prompts")
        params = params if params is not None else SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        with self._lock:
            encoded = [self.encode(p) for p in prompts]  # every prompt is checked before any is queued
        groups: list[list[Sequence]] = []
        all_seqs: list[Sequence] = []
        try:
            for ids, sp in zip(encoded, params_list):
                groups.append(self.add_request(ids, sp))
            all_seqs = [s for g in groups for s in g]
            if use_tqdm is None:
                use_tqdm = len(all_seqs) >= 16
            from tqdm.auto import tqdm

            with tqdm(total=len(all_seqs), desc="generating", disable=not use_tqdm, unit="seq") as bar:
                done = 0
                while done < len(all_seqs):
                    self._advance(all_seqs)
                    now_done = sum(s.is_finished for s in all_seqs)
                    bar.update(now_done - done)
                    done = now_done
        finally:  # an error, Ctrl-C, a refused request: nothing of this call stays queued
            self._abort_unfinished([s for g in groups for s in g])
        return [
            RequestOutput.from_sequences(p if isinstance(p, str) else None, g) for p, g in zip(prompts, groups)
        ]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one prompt piece by piece as tokens are generated (first completion only).

        Other consumers may step the engine between two pieces (another stream, `generate`, another thread): the
        stream reads its own sequence's text from where it left off, so it never misses a piece.
        """
        seqs = self.add_request(prompt, params or SamplingParams())
        seq, sent = seqs[0], 0
        try:
            while True:
                if len(seq.text) > sent:
                    piece, sent = seq.text[sent:], len(seq.text)  # before yielding: others may step meanwhile
                    yield piece
                    continue  # while we were suspended, others may have stepped the engine: look again
                if seq.is_finished:
                    break
                self._advance(seqs[:1])
        finally:  # stopped early, or n > 1: the request's other completions would run on unread
            self._abort_unfinished(seqs)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its sequences finish with reason "aborted". False if it was not running."""
        with self._lock:
            return bool(self.engine.abort(str(request_id)))

    def stats(self) -> dict:
        with self._lock:
            fallbacks = dict(fallback_counts() - self._fallbacks_base)  # "what: why" -> calls, since construction
            graphs = self.engine.model.stats() if isinstance(self.engine.model, DecodeGraphs) else {}
            parallel = {} if self._tp is None else {"tensor_parallel": self._tp.stats()}
            return {"kv_cache": self.kv_cache, "attention_backend": self.attention_backend,
                    "kernel_fallbacks": fallbacks, "execution": {**self._execution, **graphs}, **parallel,
                    **self.engine.stats()}


def check_tensor_parallel_options(size, kv_cache, quantization, speculative_config, enforce_eager, compile) -> None:
    """What tensor parallelism (chapter 11) combines with, refused before any process starts."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {size!r}")
    refused = [(kv_cache != "paged", f"kv_cache={kv_cache!r} (the workers mirror a paged pool; use 'paged')"),
               (quantization is not None, f"quantization={quantization!r}"),
               (speculative_config is not None, "speculative_config"),
               (enforce_eager is False or compile is True, "torch.compile or CUDA graphs (enforce_eager=False)")]
    for wrong, what in refused:
        if wrong:
            raise ValueError(f"tensor_parallel_size={size} does not combine with {what} in minillm")


def check_max_model_len(max_model_len: int | None, model_max: int) -> int:
    """None -> the model's context; else a positive int no longer than what the model was trained for."""
    if max_model_len is None:
        return model_max
    if not isinstance(max_model_len, int) or not 1 <= max_model_len <= model_max:
        raise ValueError(
            f"max_model_len must be None or an int in [1, {model_max}] (the model's max_position_embeddings), "
            f"got {max_model_len!r}"
        )
    return max_model_len


def _check_model_placement(model_device: torch.device, model_dtype: torch.dtype, device, dtype) -> None:
    """With a model object, `device`/`dtype` may only confirm where it is: moving it would change the caller's model."""
    if device is not None:
        wanted = resolve_device(device)
        if wanted.type != model_device.type or (wanted.index is not None and wanted.index != model_device.index):
            raise ValueError(
                f"device={str(device)!r} but the model object is on {model_device}; move it first (model.to(...)) "
                "or leave device=None"
            )
    if dtype is not None and resolve_dtype(dtype, model_device) != model_dtype:
        raise ValueError(
            f"dtype={dtype!r} but the model object holds {model_dtype}; convert it first (model.to(dtype)) or leave "
            "dtype=None"
        )
