"""Requests and sequences: what the engine tracks for every prompt it serves.

A request is one prompt and its `SamplingParams`; with ``n > 1`` it owns n sequences that share the prompt. Each
sequence moves through explicit states, and every sequence ends in exactly one finish reason, so no request is ever
silently lost:

    WAITING --schedule--> RUNNING --append_token--> FINISHED (length | stop | aborted)
                 ^            |
                 +--preempt---+   (its KV cache is freed; it is recomputed from its tokens later)

All stopping rules live in `Sequence.append_token`, so every engine (recompute, contiguous, paged) stops the same
way. Notebook 05 (``05_continuous_batching``) draws these states over time.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from minillm.engine.sampling import SamplingParams, make_generator


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # was running, lost its KV cache under memory pressure, waits to be recomputed
    FINISHED = "finished"


class Detokenizer:
    """Incremental detokenization: text grows as tokens arrive, and half-decoded characters wait for their rest.

    Byte-level BPE can split one UTF-8 character over several tokens; decoding a prefix then ends in U+FFFD, so we
    hold that tail back until the character completes. Each step decodes only a short window, not the whole output
    (vLLM's ``detokenize_incrementally``): the tokens since the last emitted text, after the few before them as
    context (a SentencePiece tokenizer drops a leading space at the start of what it decodes, so a window decoded
    alone could lose it). Decoding everything every step would cost O(n) per token, at batch 64 a few ms a step.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix_offset = 0  # the window starts here: tokens already in the text, decoded again as context
        self.read_offset = 0  # tokens before this are in self.text

    def update(self, token_ids: list[int]) -> str:
        """The text the new tokens of ``token_ids`` (all output tokens so far) complete, "" if none yet."""
        decode = self.tokenizer.decode
        context = decode(token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        window = decode(token_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(window) <= len(context) or window.endswith("\ufffd"):
            return ""  # nothing new yet (a special token, half a character): wait for more tokens
        delta = window[len(context) :]
        self.text += delta
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return delta


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    max_model_len: int
    detokenizer: Detokenizer | None = None
    seed: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "length", "stop" or "aborted"
    text: str = ""
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (paged engine)
    spec_token_ids: list[int] = field(default_factory=list)  # this step's guesses (speculative decoding, chapter 09)
    spec_draft_probs: torch.Tensor | None = None  # (k, V): the draft distributions of the guesses, or None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self):
        self.generator: torch.Generator = make_generator(self.seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def append_token(self, token_id: int) -> str:
        """Record a sampled token, apply every stopping rule, and return the new text (for streaming)."""
        assert not self.is_finished, f"sequence {self.seq_id} got a token after finishing"
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.output_token_ids.append(token_id)
        delta = self.detokenizer.update(self.output_token_ids) if self.detokenizer else ""
        self.text += delta
        if not self.params.ignore_eos and token_id in self.eos_token_ids:
            self.finish("stop")
        elif token_id in self.params.stop_token_ids:
            self.finish("stop")
        elif self.params.stop and any(s in self.text for s in self.params.stop):
            cut = min(self.text.index(s) for s in self.params.stop if s in self.text)
            delta = delta[: max(0, len(delta) - (len(self.text) - cut))]
            self.text = self.text[:cut]
            self.finish("stop")
        elif len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish("length")
        return delta

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt. `.text`/`.token_ids` are the first completion's; see `.outputs`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion]
    metrics: dict[str, float]  # ttft, tpot, e2e (seconds), num_output_tokens

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @classmethod
    def from_sequences(cls, prompt: str | None, seqs: list[Sequence]) -> RequestOutput:
        first = seqs[0]
        finish = max(s.finish_time or time.perf_counter() for s in seqs)
        ttft = (first.first_token_time - first.arrival_time) if first.first_token_time else float("nan")
        n_out = len(first.output_token_ids)
        tpot = (first.finish_time - first.first_token_time) / (n_out - 1) if n_out > 1 and first.finish_time else 0.0
        return cls(
            request_id=first.request_id,
            prompt=prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=[Completion(s.text, list(s.output_token_ids), s.finish_reason) for s in seqs],
            metrics={"ttft": ttft, "tpot": tpot, "e2e": finish - first.arrival_time, "num_output_tokens": n_out},
        )


def sample_and_append(seqs: list[Sequence], logits: torch.Tensor) -> None:
    """Draw each sequence's next token from its row of logits (B, V) and append it (which may finish it)."""
    from minillm.engine.sampling import sample

    for i, seq in enumerate(seqs):  # structured output: a processor masks the tokens its grammar forbids
        for process in seq.params.logits_processors:
            logits[i] = process(seq.output_token_ids, logits[i])
    tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
    for seq, token in zip(seqs, tokens):
        seq.append_token(token)
