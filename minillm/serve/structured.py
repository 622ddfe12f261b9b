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


# ----------------------------------------------------------------------------------------------------------------
# JSON objects


DIGITS = "0123456789"
HEX_DIGITS = "0123456789abcdefABCDEF"
LITERAL_TAILS = {"t": "rue", "f": "alse", "n": "ull"}
# Number states: the JSON number grammar -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? written out as an automaton.
NUMBER_MOVES = {
    "minus": {"0": "zero", **dict.fromkeys("123456789", "int")},
    "zero": {".": "dot", "e": "e", "E": "e"},
    "int": {**dict.fromkeys(DIGITS, "int"), ".": "dot", "e": "e", "E": "e"},
    "dot": dict.fromkeys(DIGITS, "frac"),
    "frac": {**dict.fromkeys(DIGITS, "frac"), "e": "e", "E": "e"},
    "e": {"+": "sign", "-": "sign", **dict.fromkeys(DIGITS, "exp")},
    "sign": dict.fromkeys(DIGITS, "exp"),
    "exp": dict.fromkeys(DIGITS, "exp"),
}
NUMBER_ENDS = {"zero", "int", "frac", "exp"}  # a number may stop here; the next character must close or separate


class JsonObjectGrammar:
    """Character automaton for one compact JSON object: ``{"a": [1, 2.5e3], "b": {"c": null}}``.

    A state is a tuple ``(stack, mode, detail)``: ``stack`` holds the open containers (``"{"`` or ``"["``, outermost
    first), ``mode`` says what may come next, ``detail`` is the position inside a string escape, a number or a literal.
    Whitespace is allowed only as one optional space after ``:`` and ``,``: a small model asked for JSON can otherwise
    loop on newlines and indentation forever. Containers nest at most ``max_depth`` deep, the top-level object
    included, which keeps the state set finite. For example::

        >>> grammar = JsonObjectGrammar()
        >>> walk(grammar.step, grammar.start(), '{"a": [1')   # in a number, in an array, in the top-level object
        (('{', '['), 'number', 'int')
        >>> walk(grammar.step, grammar.start(), '{"a": [1]}')
        ((), 'done', '')
    """

    def __init__(self, max_depth: int = 4):
        if not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth must be an int >= 1 (the top-level object counts 1), got {max_depth!r}")
        self.max_depth = max_depth
        self._moves = {
            "begin": self._begin, "obj_open": self._obj_open, "arr_open": self._arr_open, "key": self._string,
            "string": self._string, "colon": self._colon, "after_colon": self._after_colon, "value": self._value_mode,
            "number": self._number, "literal": self._literal, "after_value": self._after_value,
            "after_comma": self._after_comma, "item": self._item, "done": self._done,
        }

    def start(self) -> State:
        return ((), "begin", "")

    def step(self, state: State, ch: str) -> State | None:
        return self._moves[state[1]](state, ch)

    def is_complete(self, state: State) -> bool:
        return state[1] == "done"

    def _value(self, stack: tuple, ch: str) -> State | None:
        """The first character of a value inside the container on top of `stack`."""
        if ch == '"':
            return (stack, "string", "")
        if ch == "-":
            return (stack, "number", "minus")
        if ch in DIGITS:
            return (stack, "number", "zero" if ch == "0" else "int")
        if ch in LITERAL_TAILS:
            return (stack, "literal", LITERAL_TAILS[ch])
        if ch in "{[" and len(stack) < self.max_depth:
            return (stack + (ch,), "obj_open" if ch == "{" else "arr_open", "")
        return None

    def _close(self, stack: tuple, ch: str) -> State | None:
        if ch != {"{": "}", "[": "]"}[stack[-1]]:
            return None
        outer = stack[:-1]
        return (outer, "after_value", "") if outer else ((), "done", "")

    def _begin(self, state, ch):
        return (("{",), "obj_open", "") if ch == "{" else None

    def _obj_open(self, state, ch):
        if ch == '"':
            return (state[0], "key", "")
        return self._close(state[0], ch) if ch == "}" else None

    def _arr_open(self, state, ch):
        return self._close(state[0], ch) if ch == "]" else self._value(state[0], ch)

    def _string(self, state, ch):
        stack, mode, escape = state
        if escape == "":
            if ch == '"':
                return (stack, "colon", "") if mode == "key" else (stack, "after_value", "")
            if ch == "\\":
                return (stack, mode, "\\")
            return state if ch >= " " else None  # control characters must be escaped
        if escape == "\\":
            if ch == "u":
                return (stack, mode, 4)
            return (stack, mode, "") if ch in '"\\/bfnrt' else None
        # escape is the number of hex digits of \uXXXX still to come
        return (stack, mode, escape - 1 or "") if ch in HEX_DIGITS else None

    def _colon(self, state, ch):
        return (state[0], "after_colon", "") if ch == ":" else None

    def _after_colon(self, state, ch):
        return (state[0], "value", "") if ch == " " else self._value(state[0], ch)

    def _value_mode(self, state, ch):
        return self._value(state[0], ch)

    def _number(self, state, ch):
        stack, _, part = state
        following = NUMBER_MOVES[part].get(ch)
        if following is not None:
            return (stack, "number", following)
        # A number has no end marker of its own: it ends at the first character that separates or closes.
        return self._after_value((stack, "after_value", ""), ch) if part in NUMBER_ENDS and ch in ",}]" else None

    def _literal(self, state, ch):
        stack, _, tail = state
        if ch != tail[0]:
            return None
        return (stack, "literal", tail[1:]) if len(tail) > 1 else (stack, "after_value", "")

    def _after_value(self, state, ch):
        if ch == ",":
            return (state[0], "after_comma", "")
        return self._close(state[0], ch) if ch in "}]" else None

    def _after_comma(self, state, ch):
        return (state[0], "item", "") if ch == " " else self._item(state, ch)

    def _item(self, state, ch):
        stack = state[0]
        if stack[-1] == "[":
            return self._value(stack, ch)
        return (stack, "key", "") if ch == '"' else None

    def _done(self, state, ch):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Regular expressions

REPEAT_LIMIT = 1000  # {m,n} copies the fragment n times: a bound keeps a typo like \d{1,99999} from eating memory
SUPPORTED_REGEX = (r"literals, escapes (\d \w \s \D \W \S \. \\ \( ...), '.', classes [abc] [a-z0-9_] [^...], "
                   "groups ( ) and (?: ), alternation |, quantifiers * + ? {m} {m,n} {m,}")
CLASS_ESCAPES = {  # ASCII meanings (like re.ASCII): a model should not satisfy \d with an Arabic-Indic digit
    "d": lambda c: "0" <= c <= "9",
    "w": lambda c: c.isascii() and (c.isalnum() or c == "_"),
    "s": lambda c: c in " \t\n\r\f\v",
}
CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}


def _unsupported(construct: str, pattern: str) -> ValueError:
    return ValueError(f"regex {pattern!r}: {construct} is not supported (the whole output must match, so anchors are "
                      f"implicit). Supported: {SUPPORTED_REGEX}")


def _equals(want: str) -> Callable[[str], bool]:
    return lambda c: c == want


class _RegexParser:
    """Recursive descent from a pattern to a tree: ("char", predicate), ("cat", [nodes]), ("alt", [nodes]),
    ("repeat", node, min, max or None)."""

    def __init__(self, pattern: str):
        self.pattern, self.pos = pattern, 0

    def parse(self):
        node = self._alternation()
        if self.pos < len(self.pattern):  # only an unmatched ')' stops the top-level alternation early
            raise ValueError(f"regex {self.pattern!r}: unbalanced ')' at position {self.pos}")
        return node

    def _peek(self) -> str | None:
        return self.pattern[self.pos] if self.pos < len(self.pattern) else None

    def _take(self) -> str:
        if self.pos >= len(self.pattern):
            raise ValueError(f"regex {self.pattern!r}: unexpected end of pattern")
        self.pos += 1
        return self.pattern[self.pos - 1]

    def _alternation(self):
        branches = [self._sequence()]
        while self._peek() == "|":
            self._take()
            branches.append(self._sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def _sequence(self):
        items = []
        while self._peek() not in (None, "|", ")"):
            items.append(self._quantified(self._atom()))
        return ("cat", items)

    def _quantified(self, node):
        ch = self._peek()
        if ch in ("*", "+", "?"):
            self._take()
            node = ("repeat", node, 0 if ch != "+" else 1, 1 if ch == "?" else None)
        elif ch == "{":
            node = ("repeat", node, *self._braces())
        else:
            return node
        if self._peek() in ("*", "+", "?", "{"):
            raise _unsupported(f"a quantifier after a quantifier at position {self.pos} (lazy or possessive)",
                               self.pattern)
        return node

    def _braces(self) -> tuple[int, int | None]:
        end = self.pattern.find("}", self.pos)
        body = self.pattern[self.pos + 1 : end] if end != -1 else ""
        low, comma, high = body.partition(",")
        if end == -1 or not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"regex {self.pattern!r}: malformed repeat at position {self.pos}; use {{m}}, {{m,n}} or "
                             "{m,} (write \\{ for a literal brace)")
        self.pos = end + 1
        low_count, high_count = int(low), (int(high) if high else None if comma else int(low))
        if high_count is not None and high_count < low_count or max(low_count, high_count or 0) > REPEAT_LIMIT:
            raise ValueError(f"regex {self.pattern!r}: repeat {{{body}}} needs m <= n <= {REPEAT_LIMIT}")
        return low_count, high_count

    def _atom(self):
        ch = self._take()
        if ch == "(":
            if self._peek() == "?":
                if self.pattern.startswith("?:", self.pos):
                    self.pos += 2
                else:
                    raise _unsupported(f"the group syntax '(?' at position {self.pos - 1} (lookaround, named or "
                                       "flag group)", self.pattern)
            node = self._alternation()
            if self._peek() != ")":
                raise ValueError(f"regex {self.pattern!r}: missing ')' for the '(' at the end")
            self._take()
            return node
        if ch == "[":
            return ("char", self._char_class())
        if ch == ".":
            return ("char", lambda c: c != "\n")
        if ch == "\\":
            escaped = self._escape()
            return ("char", escaped if callable(escaped) else _equals(escaped))
        if ch in "^$":
            raise _unsupported(f"the anchor {ch!r}", self.pattern)
        if ch in "*+?{":
            raise ValueError(f"regex {self.pattern!r}: nothing to repeat before {ch!r} at position {self.pos - 1}")
        return ("char", _equals(ch))

    def _escape(self) -> str | Callable[[str], bool]:
        """The character after a backslash, or the predicate of a class escape such as \\d."""
        ch = self._take()
        if ch.lower() in CLASS_ESCAPES:
            test = CLASS_ESCAPES[ch.lower()]
            return test if ch.islower() else lambda c: not test(c)
        if ch in CHAR_ESCAPES:
            ch = CHAR_ESCAPES[ch]
        elif ch.isdigit():
            raise _unsupported(f"the backreference \\{ch}", self.pattern)
        elif ch.isalpha():
            raise _unsupported(f"the escape \\{ch} (anchors such as \\b \\A \\Z, or an unknown escape)", self.pattern)
        return ch

    def _char_class(self) -> Callable[[str], bool]:
        negated = self._peek() == "^"
        if negated:
            self._take()
        tests = [self._class_item()]  # a ']' right after '[' or '[^' is a literal, as in Python
        while self._peek() != "]":
            tests.append(self._class_item())
        self._take()
        return lambda c: any(test(c) for test in tests) != negated

    def _class_item(self) -> Callable[[str], bool]:
        """One member of a [...] class: a character, a class escape or a range a-z."""
        low = self._take()
        low = self._escape() if low == "\\" else low
        if callable(low):
            return low
        if self._peek() != "-" or self.pattern[self.pos + 1 : self.pos + 2] in ("]", ""):  # '-' last is a literal
            return _equals(low)
        self._take()
        high = self._take()
        high = self._escape() if high == "\\" else high
        if callable(high) or high < low:
            raise ValueError(f"regex {self.pattern!r}: bad range {low!r}-{high!r} before position {self.pos}")
        return lambda c: low <= c <= high


class RegexGrammar:
    """A regex (full match) as an automaton: Thompson's NFA, simulated on sets of NFA states.

    A state is the frozenset of NFA states the text so far can be in, closed under epsilon moves; the empty set (no
    way to match) is reported as None. Each transition computed is remembered, so the DFA is built lazily, only for
    the states generation actually visits.
    """

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._char_moves: list[tuple[Callable[[str], bool], int] | None] = []  # NFA state -> (predicate, next) or None
        self._epsilon_moves: list[list[int]] = []
        begin, self._accept = self._build(_RegexParser(pattern).parse())
        self._start = self._closure({begin})
        self._transitions: dict[tuple[frozenset, str], frozenset | None] = {}

    def start(self) -> State:
        return self._start

    def step(self, state: State, ch: str) -> State | None:
        key = (state, ch)
        if key not in self._transitions:
            following = set()
            for nfa_state in state:
                move = self._char_moves[nfa_state]
                if move is not None and move[0](ch):
                    following.add(move[1])
            self._transitions[key] = self._closure(following) if following else None
        return self._transitions[key]

    def is_complete(self, state: State) -> bool:
        return self._accept in state

    def _new_state(self) -> int:
        self._char_moves.append(None)
        self._epsilon_moves.append([])
        return len(self._char_moves) - 1

    def _build(self, node) -> tuple[int, int]:
        """Thompson's construction: every fragment has one entry and one exit state, joined by epsilon moves."""
        begin, end = self._new_state(), self._new_state()
        kind = node[0]
        if kind == "char":
            self._char_moves[begin] = (node[1], end)
        elif kind == "cat":
            last = begin
            for item in node[1]:
                item_begin, item_end = self._build(item)
                self._epsilon_moves[last].append(item_begin)
                last = item_end
            self._epsilon_moves[last].append(end)
        elif kind == "alt":
            for branch in node[1]:
                branch_begin, branch_end = self._build(branch)
                self._epsilon_moves[begin].append(branch_begin)
                self._epsilon_moves[branch_end].append(end)
        else:  # repeat: `low` required copies, then either a loop or (high - low) optional copies
            _, item, low, high = node
            last = begin
            for _ in range(low):
                item_begin, item_end = self._build(item)
                self._epsilon_moves[last].append(item_begin)
                last = item_end
            if high is None:
                item_begin, item_end = self._build(item)
                self._epsilon_moves[last] += [item_begin, end]
                self._epsilon_moves[item_end] += [item_begin, end]
            else:
                for _ in range(high - low):
                    item_begin, item_end = self._build(item)
                    self._epsilon_moves[last] += [item_begin, end]
                    last = item_end
            self._epsilon_moves[last].append(end)
        return begin, end

    def _closure(self, states: set[int]) -> frozenset:
        stack, seen = list(states), set(states)
        while stack:
            for target in self._epsilon_moves[stack.pop()]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)


# ----------------------------------------------------------------------------------------------------------------
# From a grammar to masks over the vocabulary


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
