"""A regex subset as a character automaton, for structured output's ``guided_regex`` (``minillm/serve/structured.py``).

Thompson's construction turns the pattern into an NFA with epsilon moves; simulating it on sets of states is a DFA
built lazily, one transition at a time (as RE2 does), so a state is a frozenset of NFA states. Full-match semantics:
the whole output must match, which is why anchors are implicit and refused.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

State = Hashable


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
