"""A load generator for an OpenAI-compatible server: Poisson arrivals, streamed responses, latency percentiles.

Exercise 12.3 rebuilds ``poisson_arrivals`` and ``percentile``. The rest (a workload, its trace, ``run_load`` and
``summarize`` with goodput) drives ``python -m minillm.bench serve`` and the serving notebook (chapter 12).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


def poisson_arrivals(rate: float, num_requests: int, rng: np.random.Generator) -> list[float]:
    """Arrival times (seconds from 0, increasing) of a Poisson process of `rate` requests/s: the gaps between
    arrivals are independent and exponential with mean 1 / rate, so requests come in random bursts, as users do."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive, finite number of requests per second, got {rate!r}")
    gaps = rng.exponential(1.0 / rate, size=num_requests)  # (num_requests,)
    return np.cumsum(gaps).tolist()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the two nearest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100  # fractional index into the sorted values
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# ---------------------------------------------------------------- the workload, its trace, and the load itself
# What `python -m minillm.bench serve` and chapter 12's notebook drive a server with: a seeded workload of chat
# requests with heavy-tailed answer lengths, a trace file that replays it exactly, an asyncio client that sends each
# request at its arrival time and times its stream, and the summary (percentiles, throughput, goodput).

QUESTIONS = [
    "Why is the sky blue?", "Give me three ideas for a rainy Sunday.", "What makes a good cup of tea?",
    "How do bees make honey?", "Write a short poem about the sea.", "What should I pack for a weekend hike?",
    "Describe the city of your dreams.", "How does a bicycle stay upright?", "What is a black hole?",
    "Explain photosynthesis simply.", "Suggest a name for a grey cat.", "Why do we dream?",
    "How do I boil an egg?", "What is the tallest mountain on Earth?", "Tell me a fun fact about octopuses.",
    "How can I sleep better?", "What is the difference between weather and climate?", "Write a haiku about autumn.",
    "How do airplanes fly?", "What is a prime number?", "Recommend a board game for four players.",
    "Why do leaves change colour in autumn?", "How do I start learning the guitar?", "What is inflation?",
]


@dataclass
class Request:
    """One request of a workload: chat `messages` (or a plain text `prompt`) and its answer length. With
    `ignore_eos` the server generates exactly `max_tokens` tokens, so the drawn lengths are the lengths served."""

    max_tokens: int
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    ignore_eos: bool = True

    def __post_init__(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a Request needs exactly one of messages (chat) or prompt (text)")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")


def make_workload(num_requests: int, seed: int, min_tokens: int, max_tokens: int,
                  shared_system_prompt: str | None = None) -> list[Request]:
    """`num_requests` chat requests: short user questions (drawn with replacement), answer lengths heavy-tailed.

    Lengths are lognormal (sigma 1) with their median a third of the way from `min_tokens` to `max_tokens` on a log
    scale, rounded and clipped to [min_tokens, max_tokens]: most answers are short and a few are long, as in chat
    traces (the median is well below the mean), which is where continuous batching earns its keep. A
    `shared_system_prompt` goes first in every request (a prefix the prefix cache can share).
    """
    if num_requests < 1 or not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need num_requests >= 1 and 1 <= min_tokens <= max_tokens, got {num_requests}, "
                         f"{min_tokens}, {max_tokens}")
    rng = np.random.default_rng(seed)
    median = min_tokens * (max_tokens / min_tokens) ** (1 / 3)
    lengths = np.clip(np.rint(rng.lognormal(math.log(median), 1.0, size=num_requests)), min_tokens, max_tokens)
    questions = rng.choice(len(QUESTIONS), size=num_requests)
    system = [{"role": "system", "content": shared_system_prompt}] if shared_system_prompt else []
    return [Request(int(n), messages=[*system, {"role": "user", "content": QUESTIONS[q]}])
            for n, q in zip(lengths, questions)]


def save_trace(path: str | Path, requests: list[Request], arrivals: list[float]) -> None:
    """Write the requests and their arrival times (seconds) as JSON, so that a run can be replayed exactly."""
    if len(requests) != len(arrivals):
        raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times")
    Path(path).write_text(json.dumps({"requests": [asdict(r) for r in requests], "arrivals": list(arrivals)}) + "\n")


def load_trace(path: str | Path) -> tuple[list[Request], list[float]]:
    trace = json.loads(Path(path).read_text())
    return [Request(**r) for r in trace["requests"]], [float(t) for t in trace["arrivals"]]


@dataclass
class RequestResult:
    """How one request went, times in seconds. `send_time` counts from the start of the run; `ttft` (time to first
    token) and `e2e` (end to end) from the send. `itls` are the gaps between content chunks: a server-sent chunk
    may carry several tokens' text (or none, for half a character), so an ITL here is per chunk, not per token.
    `tpot` (time per output token) = (e2e - ttft) / (output_tokens - 1): the decode rhythm, None for 1 token.
    `rejected`: the server answered 429 (its queue was full); any other failure is an `error`."""

    index: int
    send_time: float | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int | None = None
    tpot: float | None = None
    error: str | None = None
    rejected: bool = False

    @property
    def is_finished(self) -> bool:
        return self.error is None and self.e2e is not None


async def run_load(base_url: str, model: str, requests: list[Request], arrivals: list[float],
                   timeout_s: float) -> list[RequestResult]:
    """Send `requests[i]` at `arrivals[i]` seconds after the start (open loop: no request waits for another),
    streaming, greedy, EOS ignored; time every response. After `timeout_s` in all, requests still open are cut
    (closing a stream makes the server abort the request) and recorded with the error "client timeout"."""
    import httpx
    import openai

    if len(requests) != len(arrivals):
        raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
    # One connection per request: httpx's default pool (100) would queue requests in the client, hidden from TTFT.
    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout_s,
                                http_client=openai.DefaultAsyncHttpxClient(limits=limits))
    results = [RequestResult(i) for i in range(len(requests))]
    start = time.perf_counter()

    async def one(i: int, request: Request, at: float) -> None:
        result = results[i]
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent = time.perf_counter()
        result.send_time = sent - start
        kwargs = {"model": model, "max_tokens": request.max_tokens, "stream": True, "temperature": 0,
                  "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": request.ignore_eos}}
        try:
            if request.messages is not None:
                stream = await client.chat.completions.create(messages=request.messages, **kwargs)
            else:
                stream = await client.completions.create(prompt=request.prompt, **kwargs)
            last = None
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    result.output_tokens = chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                text = choice.delta.content if request.messages is not None else choice.text
                if text:  # the role-only first chunk and the finish chunk carry no text
                    if last is None:
                        result.ttft = now - sent
                    else:
                        result.itls.append(now - last)
                    last = now
            result.e2e = time.perf_counter() - sent
        except openai.RateLimitError as e:
            result.rejected, result.error = True, f"429: {e.message}"
        except openai.APIStatusError as e:
            result.error = f"{e.status_code}: {e.message}"
        except (openai.APIError, httpx.HTTPError) as e:
            result.error = f"{type(e).__name__}: {e}"
        if result.is_finished and result.output_tokens is None:
            result.error = "no usage chunk in the stream (stream_options.include_usage was ignored)"
        if result.is_finished and result.ttft is not None and result.output_tokens > 1:
            result.tpot = (result.e2e - result.ttft) / (result.output_tokens - 1)

    tasks = [asyncio.create_task(one(i, r, t)) for i, (r, t) in enumerate(zip(requests, arrivals))]
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task, result in zip(tasks, results):
            if task in pending:
                result.error, result.e2e = "client timeout", None
    finally:
        await client.close()
    return results


def summarize(results: list[RequestResult], duration_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """Counts, latency percentiles (p50/p90/p99, seconds) over finished requests, throughput over `duration_s`,
    and goodput: requests per second that finished with TTFT <= `slo_ttft_s` AND TPOT <= `slo_tpot_s` (a
    one-token answer has no TPOT and needs only the TTFT). `slo_attainment` is the fraction of all requests that
    did. Goodput, not throughput, is what a user feels: a server can raise throughput by letting latency go
    (DistServe, arXiv:2401.09670, section 1)."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s!r}")
    done = [r for r in results if r.is_finished]
    rejected = sum(r.rejected for r in results)
    good = [r for r in done if r.ttft is not None and r.ttft <= slo_ttft_s and (r.tpot is None or r.tpot <= slo_tpot_s)]

    def pcts(values: list[float]) -> dict[str, float | None]:
        return {f"p{q}": percentile(values, q) if values else None for q in (50, 90, 99)}

    return {
        "count": len(results), "finished": len(done), "rejected": rejected,
        "errors": sum(r.error is not None and not r.rejected for r in results),
        "duration_s": duration_s,
        "ttft_s": pcts([r.ttft for r in done if r.ttft is not None]),
        "tpot_s": pcts([r.tpot for r in done if r.tpot is not None]),
        "itl_s": pcts([gap for r in done for gap in r.itls]),
        "e2e_s": pcts([r.e2e for r in done]),
        "request_throughput": len(done) / duration_s,
        "output_tokens_per_s": sum(r.output_tokens or 0 for r in done) / duration_s,
        "good": len(good), "goodput": len(good) / duration_s,
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
    }
