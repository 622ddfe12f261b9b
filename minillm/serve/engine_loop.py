"""One engine thread, many clients: how a server drives an engine that is not async.

The engine's ``step()`` is synchronous and holds the GPU (or the CPU) for tens of milliseconds; an HTTP server's
event loop must never wait on it. So, as in vLLM and SGLang, the engine gets a thread of its own that does nothing
but step while there is work, and the server's coroutines talk to it through thread-safe queues:

    client -> route (async) -> EngineLoop.submit ----------------> LLM.add_request (the LLM's lock)
                                                                           |
                          engine thread: while work: LLM.step() -> publish each request's new text
                                                                           |
    client <- route (async) <- RequestStream.events() <- its own queue <---+   (call_soon_threadsafe)

Every request gets its own output queue, so a slow client slows down nobody else; the engine thread never blocks on
a client. A client that goes away (a dropped connection, a cancelled coroutine) aborts its request: its sequences
finish as "aborted", its KV blocks go back, and its place in the admission queue frees.

Thread safety: ``submit``, ``abort``, ``snapshot`` and ``stop`` may be called from any thread; the engine is touched
only under the LLM's lock (``LLM.add_request``, ``LLM.abort``, ``LLM.step`` take it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from minillm.engine.llm import LLM, Prompt
from minillm.engine.request import Sequence
from minillm.engine.sampling import SamplingParams
from minillm.serve.admission import AdmissionController

log = logging.getLogger("minillm.serve")


class QueueFull(RuntimeError):
    """The admission queue is full: the client should retry later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine thread has stopped (shut down, or a fatal error): no new requests (HTTP 503)."""


@dataclass
class Delta:
    """New output of one completion since the last event: text, token ids, and the finish reason once finished."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestStream:
    """What a route holds for one request: its sequences and a queue of lists of `Delta`s (None ends it)."""

    request_id: str
    seqs: list[Sequence]
    num_prompt_tokens: int
    _loop: asyncio.AbstractEventLoop | None = None
    _async_queue: asyncio.Queue | None = None
    _sync_queue: queue.Queue = field(default_factory=queue.Queue)
    admission_key: str = ""
    error: str | None = None  # why the server aborted it (an engine failure, a shutdown), if it did

    def __post_init__(self):
        self._sent_text = [0] * len(self.seqs)  # per completion: characters and tokens already queued
        self._sent_tokens = [0] * len(self.seqs)
        self._said_finish = [False] * len(self.seqs)

    def _put(self, item: list[Delta] | None) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
        else:
            self._sync_queue.put(item)

    def _publish(self) -> bool:
        """Queue what is new in every completion; returns True once every completion has finished (and said so)."""
        deltas = []
        for i, seq in enumerate(self.seqs):
            if self._said_finish[i]:
                continue
            finished = seq.is_finished  # read first: text and tokens are complete once it is set
            text, tokens = seq.text[self._sent_text[i]:], seq.output_token_ids[self._sent_tokens[i]:]
            if text or tokens or finished:
                deltas.append(Delta(i, text, list(tokens), seq.finish_reason if finished else None))
                self._sent_text[i] += len(text)
                self._sent_tokens[i] += len(tokens)
                self._said_finish[i] = finished
        if deltas:
            self._put(deltas)
        done = all(self._said_finish)
        if done:
            self._put(None)
        return done

    async def events(self) -> AsyncIterator[list[Delta]]:
        """The request's outputs as they come, in the event loop the stream was submitted from."""
        while (item := await self._async_queue.get()) is not None:
            yield item

    def sync_events(self, timeout: float | None = None) -> Iterator[list[Delta]]:
        """The same, for a thread (a stream submitted outside an event loop)."""
        while (item := self._sync_queue.get(timeout=timeout)) is not None:
            yield item


class EngineLoop:
    """Owns the engine thread of one `LLM`; see the module doc. Use as a context manager or call start()/stop()."""

    def __init__(self, llm: LLM, max_pending_requests: int = 256, max_pending_tokens: int | None = None,
                 on_finish: Callable[[RequestStream], None] | None = None):
        self.llm = llm
        self.admission = AdmissionController(max_pending_requests, max_pending_tokens)
        self.on_finish = on_finish  # called on the engine thread when a request ends (metrics)
        self._streams: dict[str, RequestStream] = {}
        self._admission_keys = itertools.count()
        self._lock = threading.Lock()  # guards _streams; never held while the LLM's lock is wanted
        self._wake = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None  # a fatal engine error: the loop stopped because of it
        self.num_steps = 0
        self._thread = threading.Thread(target=self._run, name="minillm-engine", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is still running, tell its clients, and end the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> EngineLoop:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    # ---- requests ----------------------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Queue a request. Raises ValueError/TypeError for a bad one (400), QueueFull (429), EngineStopped (503).

        With `loop`, the stream's events arrive in that event loop (``events()``); without, use ``sync_events()``.
        It may wait for the engine's lock (a step in progress), so a coroutine calls it in a worker thread.
        """
        if not self.is_running:
            raise EngineStopped(f"the engine is not running{f': {self.error!r}' if self.error else ''}")
        with self.llm._lock:  # tokenizers are not thread-safe: encode under the engine's lock
            ids = self.llm.encode(prompt)
        key = f"admission-{next(self._admission_keys)}"
        reason = self.admission.try_admit(key, len(ids) * params.n)
        if reason == "too_large":
            raise ValueError(f"the prompt has {len(ids)} tokens x n={params.n}, more than this server admits at once "
                             f"({self.admission.max_pending_tokens} prompt tokens in flight)")
        if reason == "queue_full":
            raise QueueFull(f"the server has {len(self.admission.pending)} requests in flight "
                            f"(max {self.admission.max_pending_requests}); retry later")
        try:
            seqs = self.llm.add_request(ids, params)
        except BaseException:
            self.admission.release(key)
            raise
        stream = RequestStream(seqs[0].request_id, seqs, len(ids), loop, asyncio.Queue() if loop else None,
                               admission_key=key)
        with self._lock:
            self._streams[stream.request_id] = stream
        if not self._thread.is_alive():  # it stopped since the check above: nobody else would end this stream
            self._abort_all("the server is shutting down")
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away): it finishes "aborted", and its end is published as usual."""
        self.llm.abort(request_id)
        self._wake.set()

    # ---- the thread --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self._has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    self._publish_all()  # an abort while idle still ends its stream
                    continue
                try:
                    self.llm.step()
                    self.num_steps += 1
                except Exception as error:  # the step preempted what it ran: abort those requests, keep serving
                    log.exception("engine step failed; aborting the requests in flight")
                    self._abort_all(f"the engine step failed: {error!r}")
                    if self.llm._tp is not None:  # a tensor-parallel failure is fatal (the workers are gone)
                        self.error = error
                        break
                self._publish_all()
        except BaseException as error:  # noqa: BLE001 -- the thread must say why it ended
            self.error = error
            log.exception("the engine thread stopped")
        finally:
            self._stopping = True
            self._abort_all("the server is shutting down" if self.error is None else f"engine error: {self.error!r}")

    def _has_work(self) -> bool:
        with self.llm._lock:
            return self.llm.engine.has_unfinished()

    def _publish_all(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            if stream._publish():
                with self._lock:
                    del self._streams[stream.request_id]
                self.admission.release(stream.admission_key)
                if self.on_finish is not None:
                    self.on_finish(stream)

    def _abort_all(self, why: str) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.error = why
            self.llm.abort(stream.request_id)
        self._publish_all()
