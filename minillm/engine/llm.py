"""`LLM`: the public front door. Text in, text out; everything in between is an engine you can swap.

The front end turns prompts (strings, token ids or chat messages) into `Sequence`s, hands them to an engine and
steps it until every sequence has finished, collecting text and timings. The engine is chosen by ``kv_cache``:

    "none"        RecomputeEngine  (engine/recompute.py)   no cache, recompute everything each step  (chapter 01)
    "contiguous"  ContiguousEngine (engine/contiguous.py)  one preallocated slab per sequence          (chapter 03)
    "paged"       PagedEngine      (engine/paged.py)       KV blocks, continuous batching, preemption (chapters 04-05)

Every engine offers the same five methods: ``add(seq)``, ``step() -> seqs that got a token``, ``abort(request_id)``,
``has_unfinished()``, ``stats()``; so `generate` and `stream` are written once, here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from minillm._triton import triton_available
from minillm.engine.recompute import RecomputeEngine
from minillm.engine.request import Detokenizer, RequestOutput, Sequence
from minillm.engine.sampling import SamplingParams
from minillm.loading import load_model, resolve_device, resolve_dtype

KV_CACHES = ("none", "contiguous", "paged")
SCHEDULERS = ("continuous", "static")
ATTENTION_BACKENDS = ("auto", "reference", "triton")

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
        max_model_len: int | None = None,
        tokenizer: Any = None,
        kv_cache_dtype: str | None = None,
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

        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("pass tokenizer=... together with a model object")
            self.model, self.tokenizer = model, tokenizer
            self.device = next(model.parameters()).device
            self.dtype = next(model.parameters()).dtype
        else:
            self.device = resolve_device(device)
            self.dtype = resolve_dtype(dtype, self.device)
            self.model, self.tokenizer = load_model(model, device=self.device, dtype=self.dtype)
        self.config = self.model.config
        if quantization is not None:
            from minillm.quant import quantize_model

            quantize_model(self.model, quantization, tokenizer=self.tokenizer)  # AWQ tokenizes its calibration text
        if attention_backend == "auto":
            attention_backend = "triton" if self.device.type == "cuda" and triton_available(self.device) else "reference"
        self.attention_backend = attention_backend
        self.model.set_attention_backend(attention_backend)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings)
        self.eos_token_ids = sorted(set(self.config.eos_token_ids) | {t for t in [self.tokenizer.eos_token_id] if t is not None})
        self.kv_cache = kv_cache
        self.engine = self._make_engine(
            kv_cache, scheduler=scheduler, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype,
        )
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()

    def _make_engine(self, kv_cache: str, **options):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if kv_cache == "none":
            return RecomputeEngine(self.model, options["max_num_seqs"], pad_token_id=pad)
        if kv_cache == "contiguous":
            from minillm.engine.contiguous import ContiguousEngine

            return ContiguousEngine(self.model, options["max_num_seqs"], pad, self.attention_backend)
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

    def _is_single_prompt(self, prompts) -> bool:
        if isinstance(prompts, str):
            return True
        return bool(prompts) and all(isinstance(p, (int, dict)) for p in prompts)

    def add_request(self, prompt: Prompt, params: SamplingParams) -> list[Sequence]:
        """Queue one prompt; returns its n sequences (their request_id is shared)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt)
        request_id = str(next(self._request_ids))
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(
                seq_id=next(self._seq_ids), request_id=request_id, prompt_token_ids=ids, params=params,
                eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                detokenizer=Detokenizer(self.tokenizer), seed=seed,
            )
            self.engine.add(seq)
            seqs.append(seq)
        return seqs

    # -- running -------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion. `params` may be one SamplingParams for all or one per prompt."""
        if self._is_single_prompt(prompts):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise TypeError("prompts must be a prompt or a non-empty list of prompts")
        params = params if params is not None else SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        encoded = [self.encode(p) for p in prompts]  # every prompt is checked before any is queued
        groups = []
        try:
            for ids, sp in zip(encoded, params_list):
                groups.append(self.add_request(ids, sp))
        except (ValueError, TypeError):
            for group in groups:  # a refused request leaves no half-submitted batch behind
                self.abort(group[0].request_id)
            raise
        all_seqs = [s for g in groups for s in g]
        if use_tqdm is None:
            use_tqdm = len(all_seqs) >= 16
        from tqdm.auto import tqdm

        with tqdm(total=len(all_seqs), desc="generating", disable=not use_tqdm, unit="seq") as bar:
            done = 0
            while self.engine.has_unfinished():
                self.engine.step()
                now_done = sum(s.is_finished for s in all_seqs)
                bar.update(now_done - done)
                done = now_done
        return [
            RequestOutput.from_sequences(p if isinstance(p, str) else None, g) for p, g in zip(prompts, groups)
        ]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one prompt piece by piece as tokens are generated (first completion only)."""
        seq = self.add_request(prompt, params or SamplingParams())[0]
        try:
            while not seq.is_finished:
                before = len(seq.text)
                self.engine.step()
                if len(seq.text) > before:
                    yield seq.text[before:]
        finally:
            if not seq.is_finished:  # the caller stopped iterating early: free the sequence's resources
                self.abort(seq.request_id)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its sequences finish with reason "aborted". False if it was not running."""
        return bool(self.engine.abort(str(request_id)))

    def stats(self) -> dict:
        return {"kv_cache": self.kv_cache, "attention_backend": self.attention_backend, **self.engine.stats()}
