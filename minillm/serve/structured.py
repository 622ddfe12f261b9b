"""Structured output by token masking: the model may only pick tokens that keep its text inside a grammar.

In doing so, you will learn about:

* **Why masking works.** A model samples the next token from softmax(logits). Setting the logit of every token that
  would leave the grammar to -inf gives those tokens probability 0 and renormalises the rest, so every prefix the
  model writes can still be completed into a valid output; end-of-sequence is allowed only where the grammar may end,
  so a finished output is valid. The price: the distribution changes (greedy picks the best *allowed* token at each
  step, not the most likely valid string), and a model that was not asked for JSON may write odd but valid JSON.
* **What a state is.** Everything an automaton must remember about the text so far to know which characters may
  come next: "inside a string, right after a backslash", or "after a value in an array inside an object". The text
  itself would do, but there are infinitely many texts and only a few states, and that is what makes caching work.
* **Why masks are cached per state.** A mask walks the whole vocabulary (49k token texts) through the automaton; the
  states recur all the time (inside a string every ordinary character leaves the state unchanged), across steps and
  across requests. Computing each state's mask once turns a per-step cost into a lookup: outlines' index
  (Willard & Louf) precomputes it for every state of a regex.
* **Why JSON with bounded nesting is a finite automaton.** JSON is context-free: matching brackets needs a stack.
  Bound the nesting depth by d and the stack is one of fewer than 2^d words over {object, array}, so (stack, what
  comes next) takes finitely many values: a finite automaton, and the mask cache stays bounded. Grammar engines
  (XGrammar, llguidance) handle the unbounded case with a pushdown automaton and smarter precomputation.
* **Regex to automaton**: Thompson's construction turns a regex into an NFA with epsilon moves; simulating it on a
  set of states is a DFA built lazily, one transition at a time (as RE2 does).

The engine calls a ``GrammarLogitsProcessor`` on each sequence's row of logits before sampling (``SamplingParams(
logits_processors=[...])``); ``logits_processor_for`` maps an OpenAI ``response_format`` or vLLM's ``guided_regex``
to one. Notebook 12 (serving) builds this step by step; exercise 12.2 rebuilds ``allowed_tokens``.

References: 1) Willard & Louf, "Efficient Guided Generation for Large Language Models", arXiv:2307.09702
2) Thompson, "Regular Expression Search Algorithm", CACM 11(6), 1968; Cox, "Regular Expression Matching Can Be Simple
And Fast", swtch.com/~rsc/regexp/regexp1.html (2007) 3) Dong et al., "XGrammar", arXiv:2411.15100 4) RFC 8259 (JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from minillm.serve.json_grammar import JsonObjectGrammar
from minillm.serve.regex_grammar import RegexGrammar

State = Hashable
Step = Callable[[State, str], State | None]  # (state, next character) -> next state, or None if it is not allowed


def walk(step: Step, state: State, text: str) -> State | None:
    """The state after reading `text` from `state`, or None as soon as a character is refused."""
    for char in text:
        state = step(state, char)
        if state is None:
            return None
    return state


def allowed_tokens(step: Step, state: State, token_strings: list[str]) -> list[bool]:
    """One mask step: token i is allowed iff its whole text can be read from `state`. An empty string (a special
    token) is never allowed here: end-of-sequence is allowed separately, only where the grammar may end."""
    return [bool(text) and walk(step, state, text) is not None for text in token_strings]


class TokenMasker:
    """The allowed-token mask of each grammar state, over a tokenizer's vocabulary, computed once per state.

    ``token_strings[i]`` is what token i adds to the text. Byte-level BPE decodes one token on its own correctly,
    leading space included; special tokens and tokens that are part of a UTF-8 character (their decode holds U+FFFD)
    get "" and are never allowed, so a character the vocabulary lacks as a whole token cannot be written.
    """

    def __init__(self, grammar, tokenizer, eos_token_ids: list[int], vocab_size: int | None = None):
        special = set(tokenizer.all_special_ids)
        self.grammar = grammar
        self.token_strings = [_token_text(tokenizer, i, special) for i in range(len(tokenizer))]
        self.vocab_size = len(self.token_strings) if vocab_size is None else vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        if not self.eos_token_ids or not all(0 <= i < self.vocab_size for i in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be a non-empty list in [0, {self.vocab_size}), got {eos_token_ids}")
        # Most first characters are refused in most states: bucketing skips their tokens with one step each.
        self._tokens_by_first_char: dict[str, list[tuple[int, str]]] = {}
        for i, text in enumerate(self.token_strings[: self.vocab_size]):
            if text:
                self._tokens_by_first_char.setdefault(text[0], []).append((i, text[1:]))
        self.masks: dict[State, torch.Tensor] = {}

    def mask(self, state: State) -> torch.Tensor:
        """The allowed tokens of `state` as a bool tensor (V,) on the CPU, built on first use and then read-only.

        End-of-sequence is allowed where the grammar is complete, and also at a dead end (a state no token can
        continue, e.g. a regex char no token spells): ending there gives invalid text, but sampling among
        all-forbidden logits would give garbage and never stop.
        """
        if state not in self.masks:
            step, allowed = self.grammar.step, []
            for first_char, tokens in self._tokens_by_first_char.items():
                after_first = step(state, first_char)
                if after_first is not None:
                    allowed += [i for i, rest in tokens if walk(step, after_first, rest) is not None]
            if not allowed or self.grammar.is_complete(state):
                allowed += self.eos_token_ids
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # (V,)
            mask[allowed] = True
            self.masks[state] = mask
        return self.masks[state]

    def advance(self, state: State, token_id: int) -> State | None:
        """The state after token `token_id`; None for a token the grammar refuses (end-of-sequence included)."""
        text = self.token_strings[token_id] if token_id < len(self.token_strings) else ""
        return walk(self.grammar.step, state, text) if text else None


def _token_text(tokenizer, token_id: int, special_ids: set[int]) -> str:
    if token_id in special_ids:
        return ""
    text = tokenizer.decode([token_id])
    return "" if "\ufffd" in text else text


class GrammarLogitsProcessor:
    """``fn(output_token_ids, logits (V,)) -> logits`` with every token the grammar forbids at -inf.

    A sequence grows by one token between calls, so its state is one `advance` from the state of its previous
    call. It is looked up from the longest known prefix rather than kept as "the" state, because one processor
    serves every completion of a request (n > 1) and a preempted sequence may be recomputed from the start.
    """

    def __init__(self, masker: TokenMasker):
        self.masker = masker
        self._states: dict[tuple[int, ...], State | None] = {(): masker.grammar.start()}
        self._only_eos = torch.zeros(masker.vocab_size, dtype=torch.bool)  # (V,)
        self._only_eos[masker.eos_token_ids] = True

    def state_for(self, output_token_ids: list[int]) -> State | None:
        ids = tuple(output_token_ids)
        known = len(ids)
        while ids[:known] not in self._states:
            known -= 1
        state = self._states[ids[:known]]
        if known < len(ids):
            for token_id in ids[known:]:
                state = None if state is None else self.masker.advance(state, token_id)
            self._states[ids] = state
            if known > 0:  # this line will not ask for the shorter prefix again: keep memory linear in its length
                del self._states[ids[:known]]
        return state

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.masker.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries but the masker covers {self.masker.vocab_size} "
                             "tokens; build the TokenMasker with vocab_size=<the model config's vocab_size>")
        state = self.state_for(output_token_ids)
        # None: the text already left the grammar (another processor or ignore_eos chose the token); end it.
        mask = self._only_eos if state is None else self.masker.mask(state)  # (V,)
        return logits.masked_fill(~mask.to(logits.device), float("-inf"))  # (V,)


# Maskers shared across requests: a server sees the same response_format again and again, and a new state's mask
# costs up to ~0.2 s on a CPU (a 49k vocabulary inside a JSON string). Masks are read-only once built and building
# one is idempotent, so sharing is safe under the engine lock (the engine calls processors from one thread at a
# time). Beyond the limit the oldest entries go first.
MASKER_CACHE_SIZE = 16
_maskers: dict[tuple, tuple[object, TokenMasker]] = {}
RESPONSE_FORMAT_TYPES = ("text", "json_object")


def logits_processor_for(
    response_format: dict | None, regex: str | None, tokenizer, eos_token_ids: list[int], vocab_size: int
) -> GrammarLogitsProcessor | None:
    """A fresh processor (its state cache is per request) for an OpenAI ``response_format`` or a vLLM-style
    ``guided_regex``, or None when the output is unconstrained (``{"type": "text"}`` with a regex means the regex).
    `vocab_size` is the model config's: logits rows are (V,) with V = vocab_size, which may exceed len(tokenizer).
    """
    if response_format is not None and not isinstance(response_format, dict):
        raise ValueError(f"response_format must be a dict such as {{'type': 'json_object'}}, got {response_format!r}")
    kind = "text" if response_format is None else response_format.get("type")
    if kind == "json_schema":
        raise ValueError("response_format type 'json_schema' needs a full JSON Schema compiler (a grammar library "
                         "such as xgrammar or llguidance), which minillm does not ship; use {'type': 'json_object'} "
                         "or a regex")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise ValueError(f"unknown response_format type {kind!r}; choose one of {RESPONSE_FORMAT_TYPES}")
    if kind != "text" and regex is not None:
        raise ValueError(f"give either response_format {response_format} or a regex ({regex!r}), not both")
    if kind == "text" and regex is None:
        return None
    key = ("json_object", None) if kind == "json_object" else ("regex", regex)
    key += (id(tokenizer), tuple(sorted(eos_token_ids)), vocab_size)
    if key not in _maskers:
        grammar = JsonObjectGrammar() if kind == "json_object" else RegexGrammar(regex)
        # The entry holds the tokenizer too: while it is cached, its id cannot be reused by another object.
        _maskers[key] = (tokenizer, TokenMasker(grammar, tokenizer, eos_token_ids, vocab_size))
        while len(_maskers) > MASKER_CACHE_SIZE:
            del _maskers[next(iter(_maskers))]
    return GrammarLogitsProcessor(_maskers[key][1])
