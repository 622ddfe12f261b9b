"""A character automaton for one JSON object: what structured output's ``response_format={"type": "json_object"}``
masks with (``minillm/serve/structured.py``).

JSON is context-free: matching brackets needs a stack. With the nesting depth bounded, the stack is one of finitely
many words, so (stack, what may come next) is a finite set of states and every state's token mask can be cached.
The style is compact (no whitespace but one optional space after ``:`` and ``,``) so a small model cannot loop on
whitespace. States are plain tuples; ``step(state, ch)`` returns the next state or None for a character JSON refuses.
"""

from __future__ import annotations

from collections.abc import Hashable

State = Hashable



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
