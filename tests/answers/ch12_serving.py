"""Chapter 12's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
last tests recompute the worked example above each exercise in the solution notebook with minillm's reference.
Check 12.3 grades two functions at once; ``check_arrivals`` and ``check_percentile`` below pair each answer with the
other function's right answer.
"""

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from answers.worked_examples import check_worked_examples
from minillm import grading
from minillm.serve.admission import AdmissionController
from minillm.serve.loadgen import percentile, poisson_arrivals
from minillm.serve.protocol import DONE, sse_encode
from minillm.serve.structured import allowed_tokens, walk

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


# ---------------------------------------------------------------------------------------------------------------------
# 12.1 server-sent events.
# ---------------------------------------------------------------------------------------------------------------------


def sse_encode_right(payload):  # the solution notebook's answer
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()  # UTF-8


def sse_encode_default_json(payload):
    # Right too: json.dumps's default spaces and \uXXXX escapes; the client parses the same objects.
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def sse_encode_crlf_no_space(payload):
    # Right too: "data:" without the space and CRLF line ends, both allowed by the SSE spec.
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data:{data}\r\n\r\n".encode()


def sse_encode_one_newline(payload):
    # Wrong: one newline ends the line but not the event: consecutive chunks join into one event's data.
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n".encode()


def sse_encode_pretty(payload):
    # Wrong: pretty-printed JSON on several lines; SSE reads only the first as data (the others have no "data:").
    data = payload if isinstance(payload, str) else json.dumps(payload, indent=2, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def sse_encode_repr(payload):
    # Wrong: str(dict) is Python's repr (single quotes, None, True), not JSON.
    return f"data: {payload}\n\n".encode()


def sse_encode_done_as_json(payload):
    # Wrong: every payload through json.dumps, the sentinel too: data: "[DONE]" is not data: [DONE].
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def sse_encode_no_prefix(payload):
    # Wrong: the JSON alone, without the "data: " field name: the client ignores the line.
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"{data}\n\n".encode()


def sse_encode_str(payload):
    # Wrong: returns str; a response body is bytes.
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_encode_latin1(payload):
    # Wrong: encodes as Latin-1 (with replacement): the client decodes UTF-8, so "日本語" and "é" come back wrong.
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("latin-1", errors="replace")


RIGHT_ANSWERS += [
    pytest.param(grading.check_sse_encode, sse_encode_right, id="12.1-notebook"),
    pytest.param(grading.check_sse_encode, sse_encode, id="12.1-reference"),
    pytest.param(grading.check_sse_encode, sse_encode_default_json, id="12.1-ascii-json-with-spaces"),
    pytest.param(grading.check_sse_encode, sse_encode_crlf_no_space, id="12.1-crlf-no-space"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_sse_encode, sse_encode_one_newline, id="12.1-one-newline"),
    pytest.param(grading.check_sse_encode, sse_encode_pretty, id="12.1-multi-line-json"),
    pytest.param(grading.check_sse_encode, sse_encode_repr, id="12.1-python-repr"),
    pytest.param(grading.check_sse_encode, sse_encode_done_as_json, id="12.1-done-as-json"),
    pytest.param(grading.check_sse_encode, sse_encode_no_prefix, id="12.1-no-data-field"),
    pytest.param(grading.check_sse_encode, sse_encode_str, id="12.1-str-not-bytes"),
    pytest.param(grading.check_sse_encode, sse_encode_latin1, id="12.1-latin-1"),
]


# ---------------------------------------------------------------------------------------------------------------------
# 12.2 one step of a token mask.
# ---------------------------------------------------------------------------------------------------------------------


def allowed_tokens_right(step, state, token_strings):  # the solution notebook's answer
    mask = []
    for text in token_strings:
        s = state
        for char in text:
            s = step(s, char)
            if s is None:
                break
        mask.append(bool(text) and s is not None)
    return mask


def allowed_tokens_with_walk(step, state, token_strings):
    # Right too: a helper that walks, numpy bools.
    return list(np.array([text != "" and walk(step, state, text) is not None for text in token_strings]))


def allowed_tokens_first_char(step, state, token_strings):
    # Wrong: reads only the first character of each token.
    return [bool(text) and step(state, text[0]) is not None for text in token_strings]


def allowed_tokens_empty_allowed(step, state, token_strings):
    # Wrong: an empty string reads nothing and so "cannot fail": allowed.
    return [walk(step, state, text) is not None for text in token_strings]


def allowed_tokens_no_threading(step, state, token_strings):
    # Wrong: every character read from the start state, not from the state the previous character left.
    return [bool(text) and all(step(state, char) is not None for char in text) for text in token_strings]


def allowed_tokens_falsy_state(step, state, token_strings):
    # Wrong: `if not s` takes a falsy state (0, "") for a refusal.
    mask = []
    for text in token_strings:
        s, ok = state, bool(text)
        for char in text:
            s = step(s, char)
            if not s:
                ok = False
                break
        mask.append(ok)
    return mask


def allowed_tokens_indices(step, state, token_strings):
    # Wrong: the ids of the allowed tokens instead of a mask over the vocabulary.
    return [i for i, ok in enumerate(allowed_tokens(step, state, token_strings)) if ok]


def allowed_tokens_keeps_stepping(step, state, token_strings):
    # Wrong: does not stop at a refusal, and calls step(None, char) for the rest of the token.
    mask = []
    for text in token_strings:
        s, refused = state, False
        for char in text:
            s = step(s, char)
            refused = refused or s is None
        mask.append(bool(text) and not refused)
    return mask


RIGHT_ANSWERS += [
    pytest.param(grading.check_allowed_tokens, allowed_tokens_right, id="12.2-notebook"),
    pytest.param(grading.check_allowed_tokens, allowed_tokens, id="12.2-reference"),
    pytest.param(grading.check_allowed_tokens, allowed_tokens_with_walk, id="12.2-numpy-bools"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_allowed_tokens, allowed_tokens_first_char, id="12.2-first-character-only"),
    pytest.param(grading.check_allowed_tokens, allowed_tokens_empty_allowed, id="12.2-empty-string-allowed"),
    pytest.param(grading.check_allowed_tokens, allowed_tokens_no_threading, id="12.2-state-not-threaded"),
    pytest.param(grading.check_allowed_tokens, allowed_tokens_falsy_state, id="12.2-falsy-state-refused"),
    pytest.param(grading.check_allowed_tokens, allowed_tokens_indices, id="12.2-indices-not-mask"),
    pytest.param(grading.check_allowed_tokens, allowed_tokens_keeps_stepping, id="12.2-steps-past-a-refusal"),
]


# ---------------------------------------------------------------------------------------------------------------------
# 12.3 Poisson arrivals and percentiles: one check for two functions.
# ---------------------------------------------------------------------------------------------------------------------


def poisson_arrivals_right(rate, num_requests, rng):  # the solution notebook's answer
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive, finite number of requests per second, got {rate!r}")
    gaps = rng.exponential(1.0 / rate, size=num_requests)  # numpy's exponential takes the mean (scale), not the rate
    return np.cumsum(gaps).tolist()


def poisson_arrivals_inverse_cdf(rate, num_requests, rng):
    # Right too: exponential gaps by inverting the CDF, -log(1 - u) / rate, one at a time.
    if not (0 < rate < math.inf):
        raise ValueError(f"bad rate {rate!r}")
    times, t = [], 0.0
    for _ in range(num_requests):
        t += -math.log(1.0 - rng.random()) / rate
        times.append(t)
    return times


def percentile_right(values, q):  # the solution notebook's answer
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentile_numpy(values, q):
    # Right too: numpy itself, with the checks.
    if len(values) == 0 or not 0 <= q <= 100:
        raise ValueError(f"bad input: {len(values)} values, q={q!r}")
    return float(np.percentile(values, q))


def _check_rate(rate):
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"bad rate {rate!r}")


def poisson_arrivals_evenly_spaced(rate, num_requests, rng):
    # Wrong: one request every 1 / rate seconds: the right mean, none of the bursts.
    _check_rate(rate)
    return [(i + 1) / rate for i in range(num_requests)]


def poisson_arrivals_scale_is_rate(rate, num_requests, rng):
    # Wrong: numpy's exponential takes the scale (the mean), so rng.exponential(rate) has mean rate, not 1 / rate.
    _check_rate(rate)
    return np.cumsum(rng.exponential(rate, size=num_requests)).tolist()


def poisson_arrivals_uniform_gaps(rate, num_requests, rng):
    # Wrong: random gaps of the right mean, but uniform on [0, 2 / rate]: too regular.
    _check_rate(rate)
    return np.cumsum(rng.uniform(0, 2 / rate, size=num_requests)).tolist()


def poisson_arrivals_gaps_not_times(rate, num_requests, rng):
    # Wrong: returns the gaps, not their running sum.
    _check_rate(rate)
    return rng.exponential(1.0 / rate, size=num_requests).tolist()


def poisson_arrivals_own_rng(rate, num_requests, rng):
    # Wrong: ignores rng and draws from a fresh generator: a benchmark cannot be replayed.
    _check_rate(rate)
    return np.cumsum(np.random.default_rng().exponential(1.0 / rate, size=num_requests)).tolist()


def poisson_arrivals_poisson_counts(rate, num_requests, rng):
    # Wrong: Poisson-distributed counts used as gaps (integers, mean rate).
    _check_rate(rate)
    return np.cumsum(rng.poisson(rate, size=num_requests)).astype(float).tolist()


def poisson_arrivals_no_check(rate, num_requests, rng):
    # Wrong: no ValueError for a rate of 0 (1 / 0 raises ZeroDivisionError) or below.
    return np.cumsum(rng.exponential(1.0 / rate if rate else math.inf, size=num_requests)).tolist()


def percentile_nearest_rank(values, q):
    # Wrong: the nearest rank, no interpolation.
    if not values or not 0 <= q <= 100:
        raise ValueError("bad input")
    ordered = sorted(values)
    return ordered[round((len(ordered) - 1) * q / 100)]


def percentile_unsorted(values, q):
    # Wrong: interpolates between ranks of the values in arrival order.
    if not values or not 0 <= q <= 100:
        raise ValueError("bad input")
    rank = (len(values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def percentile_n_not_n_minus_1(values, q):
    # Wrong: rank n * q / 100 (clamped), off by one from numpy's (n - 1) * q / 100.
    if not values or not 0 <= q <= 100:
        raise ValueError("bad input")
    ordered = sorted(values)
    rank = min(len(ordered) * q / 100, len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentile_sorts_in_place(values, q):
    # Wrong: values.sort() reorders the caller's list.
    if not values or not 0 <= q <= 100:
        raise ValueError("bad input")
    values.sort()
    return percentile_right(values, q)


def percentile_no_check(values, q):
    # Wrong: no ValueError for q outside [0, 100]: q=101 extrapolates silently.
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = min(max(math.floor(rank), 0), len(ordered) - 1)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def check_arrivals(poisson_arrivals_answer):
    """Check 12.3 with this answer for poisson_arrivals and the right percentile."""
    grading.check_load_generator(poisson_arrivals_answer, percentile_right)


def check_percentile(percentile_answer):
    """Check 12.3 with the right poisson_arrivals and this answer for percentile."""
    grading.check_load_generator(poisson_arrivals_right, percentile_answer)


RIGHT_ANSWERS += [
    pytest.param(check_arrivals, poisson_arrivals_right, id="12.3-arrivals-notebook"),
    pytest.param(check_arrivals, poisson_arrivals, id="12.3-arrivals-reference"),
    pytest.param(check_arrivals, poisson_arrivals_inverse_cdf, id="12.3-arrivals-inverse-cdf"),
    pytest.param(check_percentile, percentile_right, id="12.3-percentile-notebook"),
    pytest.param(check_percentile, percentile, id="12.3-percentile-reference"),
    pytest.param(check_percentile, percentile_numpy, id="12.3-percentile-numpy"),
]
WRONG_ANSWERS += [
    pytest.param(check_arrivals, poisson_arrivals_evenly_spaced, id="12.3-evenly-spaced"),
    pytest.param(check_arrivals, poisson_arrivals_scale_is_rate, id="12.3-exponential-of-rate"),
    pytest.param(check_arrivals, poisson_arrivals_uniform_gaps, id="12.3-uniform-gaps"),
    pytest.param(check_arrivals, poisson_arrivals_gaps_not_times, id="12.3-gaps-not-times"),
    pytest.param(check_arrivals, poisson_arrivals_own_rng, id="12.3-ignores-rng"),
    pytest.param(check_arrivals, poisson_arrivals_poisson_counts, id="12.3-poisson-counts"),
    pytest.param(check_arrivals, poisson_arrivals_no_check, id="12.3-no-rate-error"),
    pytest.param(check_percentile, percentile_nearest_rank, id="12.3-nearest-rank"),
    pytest.param(check_percentile, percentile_unsorted, id="12.3-unsorted"),
    pytest.param(check_percentile, percentile_n_not_n_minus_1, id="12.3-rank-n-not-n-minus-1"),
    pytest.param(check_percentile, percentile_sorts_in_place, id="12.3-sorts-callers-list"),
    pytest.param(check_percentile, percentile_no_check, id="12.3-no-q-error"),
]


# ---------------------------------------------------------------------------------------------------------------------
# 12.4 admission control.
# ---------------------------------------------------------------------------------------------------------------------


class AdmissionRight:  # the solution notebook's answer
    def __init__(self, max_pending_requests, max_pending_tokens=None):
        if not isinstance(max_pending_requests, int) or max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be an int >= 1, got {max_pending_requests!r}")
        if max_pending_tokens is not None and (not isinstance(max_pending_tokens, int) or max_pending_tokens < 1):
            raise ValueError(f"max_pending_tokens must be None or an int >= 1, got {max_pending_tokens!r}")
        self.max_pending_requests, self.max_pending_tokens = max_pending_requests, max_pending_tokens
        self.pending = {}
        self.pending_tokens = 0
        self.num_rejected = 0
        self._lock = threading.Lock()

    def try_admit(self, request_id, num_tokens):
        with self._lock:
            if request_id in self.pending:
                raise KeyError(f"request {request_id!r} is already admitted")
            verdict = self._verdict(num_tokens)
            if verdict is not None:
                self.num_rejected += 1
                return verdict
            self.pending[request_id] = num_tokens
            self.pending_tokens += num_tokens
            return None

    def _verdict(self, num_tokens):
        limit = self.max_pending_tokens
        if limit is not None and num_tokens > limit:
            return "too_large"
        if len(self.pending) >= self.max_pending_requests or (
                limit is not None and self.pending_tokens + num_tokens > limit):
            return "queue_full"
        return None

    def release(self, request_id):
        with self._lock:
            self.pending_tokens -= self.pending.pop(request_id)


class AdmissionOffByOne(AdmissionRight):
    # Wrong: `>` instead of `>=` on the request count: admits one request too many.
    def _verdict(self, num_tokens):
        limit = self.max_pending_tokens
        if limit is not None and num_tokens > limit:
            return "too_large"
        if len(self.pending) > self.max_pending_requests or (
                limit is not None and self.pending_tokens + num_tokens > limit):
            return "queue_full"
        return None


class AdmissionTokensNotCounted(AdmissionRight):
    # Wrong: the token bound checked per request only, not the tokens already in flight.
    def _verdict(self, num_tokens):
        if self.max_pending_tokens is not None and num_tokens > self.max_pending_tokens:
            return "too_large"
        return "queue_full" if len(self.pending) >= self.max_pending_requests else None


class AdmissionTokensNotFreed(AdmissionRight):
    # Wrong: release frees the place but not its tokens.
    def release(self, request_id):
        del self.pending[request_id]


class AdmissionTooLargeIsFull(AdmissionRight):
    # Wrong: a request that can never fit is reported as a full queue (429: the client would retry it forever).
    def _verdict(self, num_tokens):
        return "queue_full" if super()._verdict(num_tokens) else None


class AdmissionFullBeforeTooLarge(AdmissionRight):
    # Wrong: checks the queue first, so a request too large for any queue gets "queue_full" when the queue is full.
    def _verdict(self, num_tokens):
        if len(self.pending) >= self.max_pending_requests:
            return "queue_full"
        return super()._verdict(num_tokens)


class AdmissionExactFitRefused(AdmissionRight):
    # Wrong: `>=` on the tokens: refuses a request that fills the token bound exactly.
    def _verdict(self, num_tokens):
        limit = self.max_pending_tokens
        if limit is not None and num_tokens > limit:
            return "too_large"
        if len(self.pending) >= self.max_pending_requests or (
                limit is not None and self.pending_tokens + num_tokens >= limit):
            return "queue_full"
        return None


class AdmissionLenientRelease(AdmissionRight):
    # Wrong: releasing an unknown id is silently ignored, hiding a double release in the server.
    def release(self, request_id):
        self.pending_tokens -= self.pending.pop(request_id, 0)


class AdmissionRejectionsNotCounted(AdmissionRight):
    # Wrong: counts only full-queue rejections, not too-large ones.
    def try_admit(self, request_id, num_tokens):
        before = self.num_rejected
        verdict = super().try_admit(request_id, num_tokens)
        if verdict == "too_large":
            self.num_rejected = before
        return verdict


RIGHT_ANSWERS += [
    pytest.param(grading.check_admission_controller, AdmissionRight, id="12.4-notebook"),
    pytest.param(grading.check_admission_controller, AdmissionController, id="12.4-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_admission_controller, AdmissionOffByOne, id="12.4-one-request-too-many"),
    pytest.param(grading.check_admission_controller, AdmissionTokensNotCounted, id="12.4-tokens-in-flight-ignored"),
    pytest.param(grading.check_admission_controller, AdmissionTokensNotFreed, id="12.4-release-keeps-tokens"),
    pytest.param(grading.check_admission_controller, AdmissionTooLargeIsFull, id="12.4-too-large-as-queue-full"),
    pytest.param(grading.check_admission_controller, AdmissionFullBeforeTooLarge, id="12.4-queue-checked-first"),
    pytest.param(grading.check_admission_controller, AdmissionExactFitRefused, id="12.4-exact-fit-refused"),
    pytest.param(grading.check_admission_controller, AdmissionLenientRelease, id="12.4-unknown-release-ignored"),
    pytest.param(grading.check_admission_controller, AdmissionRejectionsNotCounted, id="12.4-too-large-not-counted"),
]


# ---------------------------------------------------------------------------------------------------------------------
# The worked examples above each exercise, recomputed with minillm's reference.
# ---------------------------------------------------------------------------------------------------------------------

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "12_serving.ipynb"

REFERENCE = {
    "np": np,
    "json": json,
    "DONE": DONE,
    "sse_encode": sse_encode,
    "allowed_tokens": allowed_tokens,
    "poisson_arrivals": poisson_arrivals,
    "percentile": percentile,
    "AdmissionController": AdmissionController,
}


def test_worked_examples_are_the_references_output():
    from minillm.grading.ch12_serving import yes_no_step

    check_worked_examples(SOLUTION, 12, ["12.1", "12.2", "12.3", "12.4"], dict(REFERENCE, yes_no_step=yes_no_step))
