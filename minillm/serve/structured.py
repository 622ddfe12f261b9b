"""Structured output by token masking: the model may only pick tokens that keep its text inside a grammar.

Exercise 12.2 rebuilds ``allowed_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

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
