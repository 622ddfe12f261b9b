"""The HTTP server: OpenAI's API over one `EngineLoop`, with FastAPI (routes, validation) and uvicorn (sockets).

    POST /v1/completions        text in, text out; ``stream: true`` sends server-sent events (protocol.py)
    POST /v1/chat/completions   chat messages through the model's chat template
    GET  /v1/models             the one model this server holds
    GET  /health                200 while the engine thread runs, 503 after it stopped
    GET  /metrics               Prometheus text (metrics.py)

Any client that speaks OpenAI's API works unchanged: ``openai.OpenAI(base_url="http://127.0.0.1:8000/v1",
api_key="none")``. A bad request gets OpenAI's JSON error with status 400 (a full queue 429, a stopped engine 503)
and never touches the engine; the server goes on serving. A client that disconnects mid-stream aborts its request.

Every route is a coroutine on uvicorn's event loop, which must never wait for an engine step: whatever takes the
engine's lock (submitting, aborting, reading the metrics) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from minillm.engine.llm import LLM
from minillm.engine.sampling import SamplingParams
from minillm.serve.engine_loop import Delta, EngineLoop, EngineStopped, QueueFull, RequestStream
from minillm.serve.metrics import ServerMetrics
from minillm.serve.protocol import (
    DONE,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    completion_chunk,
    error_body,
    sse_encode,
    usage,
    usage_chunk,
)
from minillm.serve.structured import logits_processor_for

log = logging.getLogger("minillm.serve")
FINISH_REASONS = {"stop": "stop", "length": "length", "aborted": "abort"}  # engine -> OpenAI (vLLM's "abort")


class APIError(Exception):
    """An error the client caused or should hear about, sent as OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def build_app(llm: LLM, model_name: str, max_pending_requests: int = 256, max_pending_tokens: int | None = None,
              default_max_tokens: int = 512) -> FastAPI:
    """A FastAPI app serving `llm` as `model_name`; its engine thread starts and stops with the app.

    `default_max_tokens`: a chat request's answer length when it names none (OpenAI's default is the whole context,
    minutes of CPU time for a chatty small model).
    """
    engine = EngineLoop(llm, max_pending_requests, max_pending_tokens)
    metrics = ServerMetrics(engine)
    engine.on_finish = metrics.observe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="minillm", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        if error.status in (429, 503):
            metrics.rejected.labels(str(error.status)).inc()
        return JSONResponse(error_body(error.message, error.kind, error.param), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        errors = error.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            return JSONResponse(error_body(f"malformed JSON in the request body: {errors[0].get('ctx', {})}"),
                                status_code=400)
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors]
        param = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else None
        return JSONResponse(error_body("invalid request: " + "; ".join(problems), param=param or None),
                            status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(error).__name__}", "internal_server_error"),
                            status_code=500)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(400, f"the model {name!r} does not exist; this server serves {model_name!r}", param="model")

    def sampling_params(body, max_tokens: int | None) -> SamplingParams:
        problem = body.unsupported()
        if problem:
            raise APIError(400, problem)
        try:
            processor = logits_processor_for(body.response_format, body.guided_regex, llm.tokenizer,
                                             llm.eos_token_ids, llm.config.vocab_size)
            return SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                seed=body.seed, n=body.n, stop=body.stop, ignore_eos=body.ignore_eos,
                logits_processors=[processor] if processor is not None else None)
        except ValueError as error:
            raise APIError(400, str(error)) from None

    async def submit(prompts: list, params: SamplingParams) -> list[RequestStream]:
        """Queue every prompt of a request, or none of them."""
        loop, streams = asyncio.get_running_loop(), []
        try:
            for prompt in prompts:
                streams.append(await asyncio.to_thread(engine.submit, prompt, params, loop))
        except (ValueError, TypeError) as error:
            await asyncio.to_thread(abort_unfinished, streams)
            raise APIError(400, str(error), param="prompt") from None
        except QueueFull as error:
            await asyncio.to_thread(abort_unfinished, streams)
            raise APIError(429, str(error), kind="rate_limit_error") from None
        except EngineStopped as error:
            raise APIError(503, str(error), kind="service_unavailable") from None
        return streams

    def abort_unfinished(streams: list[RequestStream]) -> None:
        for stream in streams:
            if not all(s.is_finished for s in stream.seqs):
                engine.abort(stream.request_id)

    def finish_in_background(streams: list[RequestStream]) -> None:
        """A stream that ended early (its client left): abort in a thread, never waiting on the event loop."""
        if any(not s.is_finished for stream in streams for s in stream.seqs):
            threading.Thread(target=abort_unfinished, args=(streams,), daemon=True).start()

    async def respond(body, prompts: list, params: SamplingParams, chat: bool):
        streams = await submit(prompts, params)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{streams[0].request_id}"
        created = int(time.time())
        if body.stream:
            events = stream_events(streams, body, request_id, created, chat)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            choices = await collect(streams, body.n, chat)
        finally:
            finish_in_background(streams)
        counts = usage(sum(s.num_prompt_tokens for s in streams),
                       sum(len(seq.output_token_ids) for s in streams for seq in s.seqs))
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices, "usage": counts}

    async def collect(streams: list[RequestStream], n: int, chat: bool) -> list[dict]:
        texts: dict[int, str] = {}
        reasons: dict[int, str | None] = {}
        async for k, deltas in merged(streams):
            for d in deltas:
                index = k * n + d.index
                texts[index] = texts.get(index, "") + d.text
                if d.finish_reason is not None:
                    reasons[index] = FINISH_REASONS.get(d.finish_reason, d.finish_reason)
        if chat:
            return [{"index": i, "message": {"role": "assistant", "content": texts.get(i, "")},
                     "logprobs": None, "finish_reason": reasons.get(i)} for i in sorted(texts)]
        return [{"index": i, "text": texts.get(i, ""), "logprobs": None, "finish_reason": reasons.get(i)}
                for i in sorted(texts)]

    async def stream_events(streams: list[RequestStream], body, request_id: str, created: int,
                            chat: bool) -> AsyncIterator[bytes]:
        n = body.n
        try:
            if chat:  # OpenAI's first chunk of each choice carries the role
                for index in range(len(streams) * n):
                    yield sse_encode(chat_chunk(request_id, model_name, created, index,
                                                {"role": "assistant", "content": ""}, None))
            async for k, deltas in merged(streams):
                for d in deltas:
                    if not d.text and d.finish_reason is None:
                        continue  # tokens that are not text yet (half a character): nothing to show
                    yield sse_encode(chunk_for(d, k * n + d.index, request_id, created, chat))
            if (body.stream_options or {}).get("include_usage"):
                counts = usage(sum(s.num_prompt_tokens for s in streams),
                               sum(len(seq.output_token_ids) for s in streams for seq in s.seqs))
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield sse_encode(usage_chunk(request_id, model_name, created, obj, counts))
            yield sse_encode(DONE)
        finally:  # the client went away (the response was cancelled) or we are done
            finish_in_background(streams)

    def chunk_for(d: Delta, index: int, request_id: str, created: int, chat: bool) -> dict:
        reason = FINISH_REASONS.get(d.finish_reason, d.finish_reason) if d.finish_reason else None
        if chat:
            return chat_chunk(request_id, model_name, created, index, {"content": d.text} if d.text else {}, reason)
        return completion_chunk(request_id, model_name, created, index, d.text, reason)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        try:
            prompts = body.prompts()
        except ValueError as error:
            raise APIError(400, str(error), param="prompt") from None
        return await respond(body, prompts, sampling_params(body, body.max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
        return await respond(body, [messages], sampling_params(body, max_tokens), chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "minillm", "max_model_len": llm.max_model_len}]}

    @app.get("/health")
    async def health():
        if engine.is_running:
            return {"status": "ok"}
        return JSONResponse({"status": "stopped", "error": repr(engine.error) if engine.error else None},
                            status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE_LATEST)

    return app


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, list[Delta]]]:
    """The events of several requests (a batch of prompts) as they come: (which request, its deltas)."""
    if len(streams) == 1:  # the usual case, without the tasks
        async for deltas in streams[0].events():
            yield 0, deltas
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: RequestStream) -> None:
        async for deltas in stream.events():
            await queue.put((k, deltas))
        await queue.put((k, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            k, deltas = await queue.get()
            if deltas is None:
                remaining -= 1
            else:
                yield k, deltas
    finally:
        for task in tasks:
            task.cancel()


class RunningServer:
    """A server on a background thread (tests, notebooks): ``.base_url`` for the OpenAI client, ``.close()``."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="minillm-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port} (is the port free?)")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.base_url = f"{self.url}/v1"

    @property
    def engine(self) -> EngineLoop:
        return self.app.state.engine

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(60)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_server(llm: LLM, model_name: str = "smollm2-135m", host: str = "127.0.0.1", port: int = 0,
                 **options) -> RunningServer:
    """Serve `llm` on a background thread; port 0 picks a free port. Options: see `build_app`."""
    return RunningServer(build_app(llm, model_name, **options), host, port)


def serve(llm: LLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve in the foreground until Ctrl-C: uvicorn gives open responses 5 s to finish, then cancels them (their
    requests are aborted), and the engine thread stops."""
    import uvicorn

    uvicorn.run(build_app(llm, model_name, **options), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=5)
