"""Admission control: a server that queues without limit is a server whose latency grows without limit.

Under overload every request still gets in, waits behind all the others, and times out anyway; the queue grows
until memory runs out. A bounded queue refuses at the door instead (HTTP 429 Too Many Requests, which OpenAI's
client retries after a pause), so the requests it admits keep their latency. Two bounds, checked together:

  * requests in flight (waiting or running): what the scheduler will have to juggle;
  * prompt tokens in flight: what prefill will have to compute, so a few huge prompts cannot fill the door alone.

A request bigger than the token bound on its own could never be admitted: that is the client's mistake (400), not
a full queue (429), and ``try_admit`` says so. Exercise 12.4 rebuilds this class.
"""

from __future__ import annotations

import threading


class AdmissionController:
    """Counts what is in flight and refuses what would exceed a bound. Thread-safe: one lock guards the counts."""

    def __init__(self, max_pending_requests: int, max_pending_tokens: int | None = None):
        if not isinstance(max_pending_requests, int) or max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be an int >= 1, got {max_pending_requests!r}")
        if max_pending_tokens is not None and (not isinstance(max_pending_tokens, int) or max_pending_tokens < 1):
            raise ValueError(f"max_pending_tokens must be None or an int >= 1, got {max_pending_tokens!r}")
        self.max_pending_requests, self.max_pending_tokens = max_pending_requests, max_pending_tokens
        self.pending: dict[str, int] = {}  # request id -> its prompt tokens
        self.pending_tokens = 0
        self.num_rejected = 0
        self._lock = threading.Lock()

    def try_admit(self, request_id: str, num_tokens: int) -> str | None:
        """Admit `request_id` (None) or say why not: "too_large" (it alone exceeds the token bound) or "queue_full"."""
        with self._lock:
            if request_id in self.pending:
                raise KeyError(f"request {request_id!r} is already admitted")
            if self.max_pending_tokens is not None and num_tokens > self.max_pending_tokens:
                self.num_rejected += 1
                return "too_large"
            over_tokens = self.max_pending_tokens is not None and (
                self.pending_tokens + num_tokens > self.max_pending_tokens)
            if len(self.pending) >= self.max_pending_requests or over_tokens:
                self.num_rejected += 1
                return "queue_full"
            self.pending[request_id] = num_tokens
            self.pending_tokens += num_tokens
            return None

    def release(self, request_id: str) -> None:
        """The request finished or was aborted: its place is free. Releasing an unknown id is a bug: KeyError."""
        with self._lock:
            self.pending_tokens -= self.pending.pop(request_id)
