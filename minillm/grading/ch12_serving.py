"""Chapter 12 checks (serving), used by solutions/12_serving.ipynb.

Each check compares the learner's code with minillm's own on fixed cases and on fresh random ones (``ex.rng``, a new
seed every run) and tests the properties whose failure names the likely mistake: server-sent events that the real
``openai`` client parses back into the chunks that were sent, and that end at ``data: [DONE]`` (12.1); a token mask
that reads each token's whole text through the automaton, threading its state (12.2); arrival times whose gaps are
exponential with mean 1 / rate, and percentiles as ``np.percentile`` computes them (12.3); an admission controller
that never exceeds its bounds, admits whatever fits and says why it refuses (12.4). The references are
``minillm.serve.protocol.sse_encode``, ``minillm.serve.structured.allowed_tokens``,
``minillm.serve.loadgen.poisson_arrivals`` and ``percentile``, and ``minillm.serve.admission.AdmissionController``.
Every check has plausible wrong answers in tests/answers/ch12_serving.py that it must reject.

The statistical sub-checks of 12.3 draw 20,000 gaps and allow 6 standard errors for the mean and the spread, and a
Kolmogorov-Smirnov distance of 5 / sqrt(n) (the DKW bound: chance exceeds it with probability 2 exp(-50)): a right
answer fails one of them about once in a billion runs, a wrong one (mean = rate, evenly spaced or uniform gaps)
every time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from minillm.grading.framework import assert_equal, exercise

__all__ = [  # the checks, re-exported by minillm.grading  # noqa: RUF022 - in exercise order
    "check_sse_encode",
    "check_allowed_tokens",
    "check_load_generator",
    "check_admission_controller",
]


def _description(x: Any) -> str:
    return f"{type(x).__name__} {str(x)[:120]}"


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 12.1: server-sent events, read back by the openai client.
# ---------------------------------------------------------------------------------------------------------------------

# Pieces of streamed text that break a careless encoder: newlines (an SSE event ends at a blank line), a carriage
# return (also a line end for SSE), quotes and backslashes (JSON escapes), "data:" and "[DONE]" inside the text,
# non-ASCII text and an emoji (UTF-8, 4 bytes), U+2028 (a line separator for JavaScript, not for SSE), empty text.
TRICKY_TEXTS = ["Hello", " world", "\n", "\n\n", "\r\n", '"quoted"', "back\\slash", "data: [DONE]\n\n", "[DONE]",
                ": a comment?", "café", "日本語", "🙂", "\u2028", "tab\there", "", " ", '{"json": [1, 2]}',
                "é\n\ndata:"]


def chat_chunk(i: int, delta: dict, finish_reason: str | None = None) -> dict:
    """One ``chat.completion.chunk`` as an OpenAI-compatible server streams it."""
    return {"id": "chatcmpl-12", "object": "chat.completion.chunk", "created": 1700000000 + i, "model": "smollm2",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def text_chunk(i: int, text: str, finish_reason: str | None = None) -> dict:
    """One streamed ``text_completion`` chunk (/v1/completions)."""
    return {"id": "cmpl-12", "object": "text_completion", "created": 1700000000 + i, "model": "smollm2",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_stream(texts: list[str]) -> list[dict]:
    """A whole chat stream: the role first (with empty content), one delta per text, an empty delta that finishes."""
    return ([chat_chunk(0, {"role": "assistant", "content": ""})]
            + [chat_chunk(i + 1, {"content": t}) for i, t in enumerate(texts)]
            + [chat_chunk(len(texts) + 1, {}, "stop")])


def text_stream(texts: list[str]) -> list[dict]:
    return [text_chunk(i, t) for i, t in enumerate(texts)] + [text_chunk(len(texts), "", "length")]


def sse_events(body: bytes) -> list[str]:
    """The data of every event in `body`, as the openai client's own SSE decoder reads it."""
    from openai._streaming import SSEDecoder

    return [sse.data for sse in SSEDecoder().iter_bytes(iter([body]))]


def read_stream(body_pieces: list[bytes], kind: str) -> list[Any]:
    """What ``openai.OpenAI().chat.completions.create(..., stream=True)`` (kind "chat") or ``completions.create``
    (kind "text") yields when the server's response body arrives in these pieces: a fake transport answers the
    client's request, everything else is the client's real code (its HTTP layer, SSE decoder and chunk models)."""
    import openai

    try:
        import httpx2 as httpx  # openai 3.x vendors its HTTP client as httpx2
    except ImportError:
        import httpx

    def answer(request):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(body_pieces))

    client = openai.OpenAI(api_key="sk-grading", base_url="http://minillm.test/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(answer)))
    if kind == "chat":
        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                                stream=True)
    else:
        stream = client.completions.create(model="smollm2", prompt="hi", stream=True)
    return [item.to_dict() if hasattr(item, "to_dict") else item for item in stream]


def check_sse_encode(fn: Callable) -> None:
    """Exercise 12.1. `fn(payload: dict | str) -> bytes`: one server-sent event, ``data: <JSON>`` then a blank line;
    a str (the DONE sentinel) goes as it is. Same as ``minillm.serve.protocol.sse_encode``, up to the JSON's
    whitespace and escapes, which the client does not see: the check reads your bytes with the openai client.
    """
    from minillm.serve.protocol import DONE, sse_encode

    def encode(payload):
        got = fn(payload)
        if not isinstance(got, bytes):
            raise AssertionError(f"sse_encode({_description(payload)}): expected bytes (a response body is bytes: "
                                 f"encode the text as UTF-8), got {_description(got)}")
        return got

    def hint(payload, got) -> str:
        return f"\nyour bytes for {str(payload)[:60]}...: {got[:160]!r}\nexpected (the reference): " \
               f"{sse_encode(payload)[:160]!r}"

    def one_event(payload):
        got = encode(payload)
        try:
            events = sse_events(got)
        except UnicodeDecodeError as e:
            raise AssertionError(f"the openai client cannot read your bytes: it decodes UTF-8 ({e}){hint(payload, got)}"
                                 ) from None
        if len(events) != 1:
            raise AssertionError(
                f"the openai client reads {len(events)} events from one sse_encode call, expected 1: an event is "
                f"'data: ...' lines ended by a blank line, so the bytes end with two newlines{hint(payload, got)}")
        data = events[0]
        if isinstance(payload, str):
            if data != payload:
                raise AssertionError(f"the client reads the event's data as {data!r}, expected {payload!r}: a str "
                                     f"goes as it is, not as JSON{hint(payload, got)}")
            return
        try:
            import json

            parsed = json.loads(data)
        except ValueError as e:
            raise AssertionError(f"the client reads the event's data as {data[:120]!r}, which is not JSON ({e}): "
                                 f"a chunk goes as JSON on one line{hint(payload, got)}") from None
        assert_equal(parsed, payload, what="the event's data, parsed as JSON")

    def stream(payloads, kind, pieces=None):
        body = b"".join(encode(p) for p in payloads) + encode(DONE)
        if pieces is None:  # one network read per event, as a server flushes them
            split = [encode(p) for p in payloads] + [encode(DONE)]
        else:
            split = [body[a:b] for a, b in zip([0] + pieces, pieces + [len(body)])]
        try:
            got = read_stream(split, kind)
        except Exception as e:  # noqa: BLE001 - whatever the client raised on these bytes fails the sub-check
            raise AssertionError(f"the openai client failed to read the stream: {type(e).__name__}: {e}"
                                 f"{hint(payloads[-1], encode(payloads[-1]))}") from None
        if got and got[-1] == DONE or DONE in got:
            raise AssertionError(f"the client yielded {DONE!r} as a chunk: it stops at an event whose data is "
                                 f"exactly {DONE}, so the sentinel goes as it is, not as JSON"
                                 f"{hint(DONE, encode(DONE))}")
        if len(got) != len(payloads):
            raise AssertionError(f"the client yielded {len(got)} chunks for a stream of {len(payloads)}"
                                 f"{hint(payloads[0], encode(payloads[0]))}")
        for i, (g, want) in enumerate(zip(got, payloads)):
            assert_equal(g, want, what=f"chunk {i} as the openai client parsed it")

    def after_done():
        payloads = chat_stream(["one", "two"])
        late = chat_chunk(99, {"content": "after [DONE]"})
        body = [encode(p) for p in payloads] + [encode(DONE), sse_encode(late)]
        got = read_stream(body, "chat")
        if len(got) != len(payloads):
            raise AssertionError(f"with a chunk sent after {DONE}, the client yielded {len(got)} chunks, expected "
                                 f"{len(payloads)}: the DONE event must end the stream{hint(DONE, encode(DONE))}")

    def fresh(kind):
        for _ in range(6):
            texts = [ex.rng.choice(TRICKY_TEXTS) + ex.rng.choice(TRICKY_TEXTS) for _ in range(ex.rng.randint(1, 8))]
            payloads = chat_stream(texts) if kind == "chat" else text_stream(texts)
            length = sum(len(encode(p)) for p in payloads) + len(encode(DONE))
            pieces = sorted(ex.rng.sample(range(1, length), min(length - 1, ex.rng.randint(1, 12))))
            stream(payloads, kind, pieces)  # the network cuts anywhere, even inside a UTF-8 character

    with exercise("12.1", "server-sent events for a streamed response") as ex:
        ex.check("the example above: one chunk, and the DONE sentinel, are one event each",
                 lambda: (one_event(text_chunk(0, "Hi")), one_event(DONE)))
        ex.check("each tricky text (newlines, quotes, 'data: [DONE]', unicode, empty) in one event",
                 lambda: [one_event(chat_chunk(0, {"content": t})) for t in TRICKY_TEXTS])
        ex.check("a chat stream (role, tricky deltas, an empty finishing delta) through the openai client's "
                 "chat.completions.create(stream=True): the same chunks", lambda: stream(chat_stream(TRICKY_TEXTS),
                                                                                           "chat"))
        ex.check("a text_completion stream through completions.create(stream=True): the same chunks",
                 lambda: stream(text_stream(TRICKY_TEXTS), "text"))
        ex.check("the stream ends at the DONE event: nothing after it is read", after_done)
        ex.check("fresh chat streams, the body cut into random network reads: the same chunks",
                 lambda: fresh("chat"))
        ex.check("fresh text_completion streams, cut into random reads: the same chunks", lambda: fresh("text"))


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 12.2: one step of structured output's token mask.
# ---------------------------------------------------------------------------------------------------------------------


def _not_none(state, char):
    assert state is not None, (f"step(None, {char!r}) was called: once step refuses a character (returns None) the "
                               f"token is refused; stop reading it")


def digits_step(state: int, char: str) -> int | None:
    """An integer of at most 3 digits; the state is how many digits were read."""
    _not_none(state, char)
    return state + 1 if char.isdigit() and char.isascii() and state < 3 else None


YES_NO = ("yes", "no")


def yes_no_step(state: str, char: str) -> str | None:
    """Exactly "yes" or "no"; the state is the text read so far."""
    _not_none(state, char)
    text = state + char
    return text if any(word.startswith(text) for word in YES_NO) else None


def brackets_step(state: int, char: str) -> int | None:
    """A list of digit lists like [1,[2,3]], nested at most 3 deep; the state is the depth (a counter). Depth 0 is
    a valid state that is falsy: `if not state` is not `if state is None`."""
    _not_none(state, char)
    if char == "[":
        return state + 1 if state < 3 else None
    if char == "]":
        return state - 1 if state > 0 else None
    if char in "0123456789,":
        return state if state > 0 else None
    return None


AUTOMATA = {  # name -> (step, alphabet its tokens are drawn from, some states)
    "digits": (digits_step, "0123456789a", [0, 1, 2, 3]),
    "yes|no": (yes_no_step, "yesnoa", ["", "y", "ye", "yes", "n", "no"]),
    "brackets": (brackets_step, "[]12,x", [0, 1, 2, 3]),
}


def check_allowed_tokens(fn: Callable) -> None:
    """Exercise 12.2. `fn(step, state, token_strings) -> list[bool]`: token i is allowed iff its whole text can be
    read from `state`, each character moving the state on with ``step(state, char)`` (None: refused); an empty string
    is never allowed. Same as ``minillm.serve.structured.allowed_tokens``.
    """
    from minillm.serve.structured import allowed_tokens

    def same(name, state, tokens):
        step = AUTOMATA[name][0]
        what = f"allowed_tokens({name} automaton, state {state!r}, {tokens!r})"
        got = fn(step, state, list(tokens))
        if not isinstance(got, (list, tuple)) or len(got) != len(tokens):
            raise AssertionError(f"{what}: expected a list of {len(tokens)} bools, one per token, got "
                                 f"{_description(got)}")
        if not all(isinstance(g, (bool, np.bool_)) for g in got):
            raise AssertionError(f"{what}: expected bools (True: allowed), got {_description(got)}")
        want = allowed_tokens(step, state, list(tokens))
        if [bool(g) for g in got] != want:
            i = next(i for i, (g, w) in enumerate(zip(got, want)) if bool(g) != w)
            raise AssertionError(f"{what}: token {i}, {tokens[i]!r}, expected {'allowed' if want[i] else 'refused'}, "
                                 f"got {'allowed' if got[i] else 'refused'} (the mask: expected {want}, got "
                                 f"{[bool(g) for g in got]})")

    def fresh():
        for _ in range(30):
            name = ex.rng.choice(sorted(AUTOMATA))
            _, alphabet, states = AUTOMATA[name]
            tokens = ["".join(ex.rng.choice(alphabet) for _ in range(ex.rng.randint(0, 4)))
                      for _ in range(ex.rng.randint(1, 25))]
            same(name, ex.rng.choice(states), tokens)

    with exercise("12.2", "one step of a token mask") as ex:
        ex.check("the example above: yes|no from the start", lambda: same("yes|no", "", ["y", "yes", "no", "n", "x",
                                                                                         "ye", "yess", "es"]))
        ex.check("every character of a token is read, not only the first", lambda: (
            same("digits", 0, ["1", "1a", "12", "a1", "123", "1234"]), same("yes|no", "", ["nx", "yo", "no!"])))
        ex.check("the state moves on with each character (from 'y': 'es' is allowed, 'e' then 's' from the start is "
                 "not)", lambda: (same("yes|no", "y", ["es", "e", "s", "o", "yes"]),
                                  same("digits", 2, ["1", "12", "a"])))
        ex.check("an empty string (a special token) is never allowed", lambda: (
            same("digits", 0, ["", "1", ""]), same("yes|no", "yes", ["", "s"])))
        ex.check("a falsy state (depth 0 in a bracket counter) is a state, not a refusal",
                 lambda: same("brackets", 1, ["]", "][", "1]", "],", "]]", "1,2]["]))
        ex.check("nothing is allowed from a finished word, or past the depth limit",
                 lambda: (same("yes|no", "no", ["o", "s", "no", "yes"]), same("brackets", 3, ["[", "1", "]", "]]]"])))
        ex.check("fresh vocabularies over three automata: the reference's mask", fresh)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 12.3: Poisson arrivals and latency percentiles.
# ---------------------------------------------------------------------------------------------------------------------

NUM_GAPS = 20_000  # for the statistical sub-checks: 6 standard errors of a mean are 4 % of it
SIGMAS = 6.0


def check_load_generator(poisson_arrivals: Callable, percentile: Callable) -> None:
    """Exercise 12.3. `poisson_arrivals(rate, num_requests, rng) -> list[float]`: arrival times of a Poisson process,
    the cumulative sum of independent exponential gaps of mean 1 / rate drawn from the numpy Generator `rng`;
    ValueError for a rate that is not positive and finite. `percentile(values, q) -> float`: the q-th percentile
    (0..100) with linear interpolation, as ``np.percentile``; ValueError for no values or q outside [0, 100].
    Same as ``minillm.serve.loadgen.poisson_arrivals`` and ``percentile``.
    """

    def arrivals(rate, n, seed):
        what = f"poisson_arrivals(rate={rate}, num_requests={n}, rng=np.random.default_rng({seed}))"
        got = poisson_arrivals(rate, n, np.random.default_rng(seed))
        try:
            times = np.asarray(got, dtype=np.float64)
        except (TypeError, ValueError):
            raise AssertionError(f"{what}: expected a list of {n} floats, got {_description(got)}") from None
        if times.shape != (n,):
            raise AssertionError(f"{what}: expected {n} arrival times, got {_description(got)}")
        if n and (not np.isfinite(times).all() or times[0] < 0 or (np.diff(times) < 0).any()):
            raise AssertionError(f"{what}: arrival times must be finite, from 0 on and increasing: the running sum "
                                 f"of the gaps, not the gaps; got {times[:6].tolist()}...")
        return what, times

    def shapes():
        for rate, n in ((2.0, 1), (0.5, 7), (100.0, 50)):
            arrivals(rate, n, 0)
        arrivals(3.0, 0, 0)

    def same_rng_same_times():
        what, a = arrivals(4.0, 100, 1203)
        _, b = arrivals(4.0, 100, 1203)
        _, c = arrivals(4.0, 100, 1204)
        if not np.array_equal(a, b):
            raise AssertionError(f"{what}: two calls with generators seeded alike gave different times: draw every "
                                 f"random number from `rng`, so a benchmark can be replayed")
        if np.array_equal(a, c):
            raise AssertionError(f"{what}: generators seeded 1203 and 1204 gave the same times: arrivals are random, "
                                 f"drawn from `rng`")

    def gaps_of(rate, seed):
        what, times = arrivals(rate, NUM_GAPS, seed)
        return what, np.diff(np.concatenate([[0.0], times]))

    def mean_gap(rate, seed):
        what, gaps = gaps_of(rate, seed)
        mean, want = gaps.mean(), 1 / rate
        if abs(mean - want) > SIGMAS * want / math.sqrt(NUM_GAPS):
            scale = " (numpy's exponential takes the mean, its scale, not the rate)" if abs(mean - rate) < 0.1 * rate \
                else ""
            raise AssertionError(f"{what}: the mean gap of {NUM_GAPS} arrivals is {mean:.4g} s, expected about "
                                 f"1 / rate = {want:.4g} s{scale}")

    def exponential_gaps(rate, seed):
        what, gaps = gaps_of(rate, seed)
        cv = gaps.std() / gaps.mean()  # an exponential's standard deviation equals its mean
        if abs(cv - 1) > SIGMAS * math.sqrt(2 / NUM_GAPS):
            raise AssertionError(f"{what}: the gaps' standard deviation / mean is {cv:.3f}, expected about 1 for "
                                 f"exponential gaps (evenly spaced arrivals give 0, uniform gaps 0.58)")
        # Kolmogorov-Smirnov distance to the exponential distribution of mean 1 / rate.
        ordered = np.sort(gaps)
        cdf = 1 - np.exp(-rate * ordered)
        ranks = np.arange(1, NUM_GAPS + 1) / NUM_GAPS
        distance = max(np.abs(ranks - cdf).max(), np.abs(ranks - 1 / NUM_GAPS - cdf).max())
        if distance > 5 / math.sqrt(NUM_GAPS):  # chance exceeds it with probability <= 2 exp(-50) (the DKW bound)
            raise AssertionError(f"{what}: the gaps' distribution is {distance:.3f} away (largest gap between CDFs) "
                                 f"from the exponential distribution of mean 1 / rate")

    def bad_rates():
        for rate in (0.0, -1.0, float("nan"), float("inf")):
            try:
                got = poisson_arrivals(rate, 3, np.random.default_rng(0))
            except ValueError:
                continue
            raise AssertionError(f"poisson_arrivals(rate={rate}, ...): expected ValueError, got {_description(got)}")

    def pct(values, q):
        what = f"percentile({values if len(values) < 8 else str(values[:6])[:-1] + ', ...]'}, q={q})"
        given = list(values)
        got = percentile(values, q)
        if values != given:
            raise AssertionError(f"{what}: your function changed the caller's list to {values[:8]}: sort a copy "
                                 f"(the caller may still need the latencies in arrival order)")
        want = float(np.percentile(np.asarray(values, dtype=np.float64), q))
        if not isinstance(got, (int, float, np.floating, np.integer)):
            raise AssertionError(f"{what}: expected a float, got {_description(got)}")
        if not math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12):
            raise AssertionError(f"{what}: expected {want!r} (np.percentile: linear interpolation between the two "
                                 f"nearest ranks of the sorted values), got {got!r}")

    def fixed_percentiles():
        for q in (0, 25, 50, 90, 99, 100):
            pct([1.0, 2.0, 3.0, 4.0], q)
        pct([0.5], 99)
        pct([10.0, 20.0], 50)

    def unsorted_percentiles():
        for q in (0, 10, 50, 95, 100):
            pct([0.3, 0.1, 0.9, 0.2, 0.2, 5.0, 0.4], q)

    def fresh_percentiles():
        for _ in range(40):
            n = ex.rng.randint(1, 60)
            values = [ex.rng.expovariate(1.0) if ex.rng.random() < 0.8 else ex.rng.choice([0.0, 1.0, -2.5])
                      for _ in range(n)]
            pct(values, ex.rng.choice([0, 50, 90, 99, 100, ex.rng.uniform(0, 100)]))

    def bad_percentiles():
        for values, q in (([], 50), ([1.0, 2.0], -1), ([1.0, 2.0], 101)):
            try:
                got = percentile(values, q)
            except ValueError:
                continue
            raise AssertionError(f"percentile({values}, {q}): expected ValueError, got {_description(got)}")

    def fresh_arrivals():
        rate = ex.rng.choice([0.25, 3.0, 40.0]) * ex.rng.uniform(0.8, 1.25)
        seed = ex.rng.randrange(2**31)
        mean_gap(rate, seed)
        exponential_gaps(rate, seed)

    with exercise("12.3", "Poisson arrivals and latency percentiles") as ex:
        ex.check("num_requests arrival times (0, 1, 7, 50), from 0 on and increasing", shapes)
        ex.check("every random number from rng: seeded alike, the same times", same_rng_same_times)
        ex.check(f"{NUM_GAPS} arrivals at 4 and at 0.5 requests/s: the mean gap is 1 / rate",
                 lambda: (mean_gap(4.0, 1201), mean_gap(0.5, 1202)))
        ex.check("the gaps are exponential: standard deviation = mean, and the exponential's distribution",
                 lambda: exponential_gaps(4.0, 1201))
        ex.check("fresh rates and generators: mean gap 1 / rate, exponential gaps", fresh_arrivals)
        ex.check("ValueError for a rate of 0, below 0, nan or inf", bad_rates)
        ex.check("percentile: the example above, np.percentile's linear interpolation", fixed_percentiles)
        ex.check("percentile of unsorted values, the caller's list left as it was", unsorted_percentiles)
        ex.check("percentile of fresh values and q: np.percentile", fresh_percentiles)
        ex.check("percentile: ValueError for no values and q outside [0, 100]", bad_percentiles)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 12.4: admission control, a bounded queue.
# ---------------------------------------------------------------------------------------------------------------------


class _Model:
    """What an admission controller must do, in the fewest lines: the check's oracle."""

    def __init__(self, max_requests, max_tokens):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.pending: dict[str, int] = {}
        self.num_rejected = 0

    def try_admit(self, request_id, num_tokens):
        if self.max_tokens is not None and num_tokens > self.max_tokens:
            verdict = "too_large"
        elif len(self.pending) + 1 > self.max_requests or (
                self.max_tokens is not None and sum(self.pending.values()) + num_tokens > self.max_tokens):
            verdict = "queue_full"
        else:
            self.pending[request_id] = num_tokens
            return None
        self.num_rejected += 1
        return verdict


def check_admission_controller(cls: Callable) -> None:
    """Exercise 12.4. `cls(max_pending_requests, max_pending_tokens=None)` with ``try_admit(request_id, num_tokens)
    -> None | "too_large" | "queue_full"``, ``release(request_id)`` (KeyError for an id not admitted), and attributes
    ``pending`` ({request_id: num_tokens} of the admitted), ``pending_tokens`` and ``num_rejected``. Same as
    ``minillm.serve.admission.AdmissionController``.
    """

    def state_matches(ctrl, model, what):
        pending = getattr(ctrl, "pending", None)
        if not isinstance(pending, dict):
            raise AssertionError(f"{what}: expected `pending` to be a dict {{request_id: num_tokens}}, got "
                                 f"{_description(pending)}")
        assert_equal(dict(pending), model.pending, what=f"{what}: pending")
        assert_equal(getattr(ctrl, "pending_tokens", None), sum(model.pending.values()), what=f"{what}: pending_tokens")
        assert_equal(getattr(ctrl, "num_rejected", None), model.num_rejected, what=f"{what}: num_rejected")
        over_tokens = model.max_tokens is not None and ctrl.pending_tokens > model.max_tokens
        if len(pending) > model.max_requests or over_tokens:
            raise AssertionError(f"{what}: over a bound: {len(pending)} requests, {ctrl.pending_tokens} tokens")

    def run(max_requests, max_tokens, ops, name="ctrl"):
        """Apply ops ("admit", id, tokens) / ("release", id) to the learner's controller and the model together."""
        ctrl, model = cls(max_requests, max_tokens), _Model(max_requests, max_tokens)
        done = [f"{name} = AdmissionController({max_requests}, {max_tokens})"]
        for op in ops:
            if op[0] == "admit":
                _, rid, tokens = op
                done.append(f"{name}.try_admit({rid!r}, {tokens})")
                before = _Model(max_requests, max_tokens)
                before.pending = dict(model.pending)
                got, want = ctrl.try_admit(rid, tokens), model.try_admit(rid, tokens)
                if got != want:
                    raise AssertionError("after\n    " + "\n    ".join(done[-8:]) + f"\nexpected {want!r}, got {got!r}"
                                         + _why(want, got, before, tokens))
            else:
                _, rid = op
                done.append(f"{name}.release({rid!r})")
                ctrl.release(rid)
                del model.pending[rid]
            state_matches(ctrl, model, "after\n    " + "\n    ".join(done[-8:]) + "\n")
        return ctrl, model

    def worked_example():
        run(3, 100, [("admit", "a", 40), ("admit", "b", 50), ("admit", "c", 20), ("admit", "c", 10), ("admit", "d", 1),
                     ("admit", "e", 101), ("release", "a"), ("admit", "e", 41), ("admit", "e", 40)])

    def request_bound():
        for n in (1, 3):
            ops = [("admit", f"r{i}", 10) for i in range(n + 2)] + [("release", "r0"), ("admit", "late", 10),
                                                                    ("admit", "later", 10)]
            run(n, None, ops)

    def token_bound():
        run(10, 100, [("admit", "a", 60), ("admit", "b", 41), ("admit", "c", 40), ("admit", "d", 1),
                      ("release", "c"), ("admit", "e", 40)])
        run(10, 100, [("admit", "whole", 100), ("admit", "one", 1), ("release", "whole"), ("admit", "one", 1)])

    def too_large_first():
        run(1, 50, [("admit", "huge", 51), ("admit", "a", 50), ("admit", "huge", 51), ("admit", "b", 1)])

    def key_errors():
        ctrl = cls(2, None)
        for op, what in ((lambda: ctrl.release("never"), "release('never') of an id never admitted"),
                         (lambda: (ctrl.try_admit("a", 5), ctrl.release("a"), ctrl.release("a")),
                          "release('a') twice")):
            try:
                op()
            except KeyError:
                continue
            raise AssertionError(f"{what}: expected KeyError: releasing what is not admitted is a bug in the "
                                 f"server, and the counts would go wrong silently")
        ctrl.try_admit("b", 5)
        try:
            ctrl.try_admit("b", 5)
        except KeyError:
            return
        raise AssertionError("try_admit('b', 5) while 'b' is admitted: expected KeyError (one id, one place)")

    def bad_bounds():
        for args in ((0,), (-1,), (2, 0)):
            try:
                cls(*args)
            except ValueError:
                continue
            raise AssertionError(f"AdmissionController{args}: expected ValueError (a bound is an int >= 1, or None "
                                 f"for no token bound)")

    def fresh():
        for _ in range(20):
            max_requests = ex.rng.randint(1, 6)
            max_tokens = ex.rng.choice([None, ex.rng.randint(1, 200)])
            live, ops, next_id = [], [], 0
            for _ in range(60):
                if live and ex.rng.random() < 0.4:
                    ops.append(("release", live.pop(ex.rng.randrange(len(live)))))
                    continue
                tokens = ex.rng.randint(1, (max_tokens or 100) + 10)
                rid = f"req-{next_id}"
                next_id += 1
                ops.append(("admit", rid, tokens))
                model = _Model(max_requests, max_tokens)  # replay to know whether it is admitted
                for op in ops:
                    if op[0] == "admit":
                        model.try_admit(*op[1:])
                    else:
                        del model.pending[op[1]]
                if rid in model.pending:
                    live.append(rid)
            run(max_requests, max_tokens, ops)

    with exercise("12.4", "admission control: a bounded queue") as ex:
        ex.check("the example above: 3 requests, 100 tokens", worked_example)
        ex.check("a request bound only: exactly max_pending_requests in flight, a release frees a place",
                 request_bound)
        ex.check("a token bound: admitted while the tokens fit, exactly up to the bound", token_bound)
        ex.check("a request alone over the token bound is 'too_large', whatever the queue holds", too_large_first)
        ex.check("KeyError for releasing an id not admitted (twice, or never) and admitting one already in",
                 key_errors)
        ex.check("ValueError for a bound below 1", bad_bounds)
        ex.check("fresh sequences of admits and releases: the same verdicts and counts as a model, never over a "
                 "bound", fresh)


def _why(want, got, model, tokens) -> str:
    n = len(model.pending)
    in_tokens = sum(model.pending.values())
    in_flight = f" ({n} request{'s' if n != 1 else ''} and {in_tokens} tokens in flight before it)"
    if want is None:
        return f": it fits{in_flight}, so it is admitted"
    if want == "too_large":
        return f": {tokens} tokens alone exceed max_pending_tokens = {model.max_tokens}, whatever is in flight"
    if got == "too_large":
        return f": {tokens} tokens fit alone; it waits for room{in_flight}"
    return f": no room{in_flight}, max_pending_requests = {model.max_requests}, max_pending_tokens = " \
           f"{model.max_tokens}"
