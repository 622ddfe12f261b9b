"""The OpenAI-compatible server, tested with the real `openai` client against a real server on 127.0.0.1.

One server (the embedded model, fp32 on the CPU) serves the whole module; every load loop is bounded in count and
time and targets only 127.0.0.1.
"""

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import minillm
from minillm.serve.app import start_server
from minillm.serve.chat import drop_oldest_exchange, fit_history
from minillm.serve.engine_loop import EngineLoop, QueueFull
from minillm.serve.metrics import parse_metrics

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def llm(smollm):
    model, tok = smollm  # the session's model: an LLM never changes the model it is given
    return minillm.LLM(model, tokenizer=tok, max_num_seqs=8, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def server(llm):
    with start_server(llm, MODEL, max_pending_requests=64) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


def metrics(server) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{server.url}/metrics", timeout=30).text)


def wait_until_idle(server, timeout_s: float = 30.0) -> dict[str, float]:
    """The metrics once nothing runs, waits or holds a KV block (aborts land on the engine thread's next pass)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        idle = (m["minillm_num_requests_running"], m["minillm_num_requests_waiting"], m["minillm_kv_blocks_used"],
                m["minillm_num_requests_in_flight"]) == (0, 0, 0, 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_greedy_completions_equal_llm_generate(llm, client):
    expected = llm.generate(PROMPTS, minillm.SamplingParams(max_tokens=12))
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.text
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    batch = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [w.text for w in expected]


def test_chat_streamed_and_whole_equal_llm_generate(llm, client):
    (want,) = llm.generate([CHAT], minillm.SamplingParams(max_tokens=16))
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == {"length": "length", "stop": "stop"}[want.finish_reason]
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_streamed_completion_and_n_completions(client):
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True)]
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
    many = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    again = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=7)
    assert [c.text for c in many.choices] == [c.text for c in again.choices], "a seed makes sampling repeatable"
    assert many.usage.completion_tokens == 24
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.9, n=2,
                                                 seed=3, stream=True))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_stop_strings_and_seeded_sampling(client):
    got = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[" 6"])
    assert " 6" not in got.choices[0].text and got.choices[0].finish_reason == "stop"
    a = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0.8, seed=11)
    b = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0.8, seed=11)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_32_concurrent_streaming_clients_all_finish(server):
    async def one(aclient, i):
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say a word about the number {i}."}],
            max_tokens=4 + i % 5, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        usage, reason = None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
        return usage.completion_tokens, reason

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)
        return await asyncio.wait_for(asyncio.gather(*(one(aclient, i) for i in range(32))), timeout=240)

    results = asyncio.run(run())
    assert results == [(4 + i % 5, "length") for i in range(32)]
    m = wait_until_idle(server)
    assert m["minillm_requests_finished_total{finish_reason=\"length\"}"] >= 32


def test_disconnected_streams_abort_and_free_their_blocks(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = metrics(server).get('minillm_requests_finished_total{finish_reason="aborted"}', 0)
    with httpx.Client(timeout=60) as http:
        for _ in range(4):
            with http.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                got = [next(lines) for _ in range(6)]  # a few events, then the client goes away
                assert any(line.startswith("data: {") for line in got)
    m = wait_until_idle(server)
    assert m["minillm_num_requests_running"] == 0 and m["minillm_kv_blocks_used"] == 0, m
    assert m["minillm_num_requests_in_flight"] == 0
    assert m['minillm_requests_finished_total{finish_reason="aborted"}'] - before == 4


BAD_REQUESTS = [
    ("unknown model", "/completions", {"model": "gpt-17", "prompt": "hi"}, "gpt-17"),
    ("temperature", "/completions", {"model": MODEL, "prompt": "hi", "temperature": 3}, "temperature"),
    ("top_p", "/chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 0}, "top_p"),
    ("max_tokens", "/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("n greedy", "/completions", {"model": MODEL, "prompt": "hi", "n": 2, "temperature": 0}, "temperature > 0"),
    ("prompt too long", "/completions", {"model": MODEL, "prompt": "hello " * 9000}, "context"),
    ("empty messages", "/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("bad role", "/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("token id", "/completions", {"model": MODEL, "prompt": [1, 2, 10**9]}, "token ids"),
    ("empty prompt", "/completions", {"model": MODEL, "prompt": ""}, "empty"),
    ("missing prompt", "/completions", {"model": MODEL}, "prompt"),
    ("penalty", "/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 1.0}, "presence_penalty"),
    ("logprobs", "/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True}, "logprobs"),
    ("json schema", "/chat/completions", {"model": MODEL, "messages": CHAT,
                                          "response_format": {"type": "json_schema", "json_schema": {}}}, "schema"),
    ("bad regex", "/completions", {"model": MODEL, "prompt": "hi", "guided_regex": "(?<=a)b"}, "regex"),
    ("stop list", "/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
]


@pytest.mark.parametrize("name,path,body,mentions", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_400_with_a_json_error_and_the_server_goes_on(server, client, name, path, body, mentions):
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and mentions.lower() in error["message"].lower(), error
    assert "Traceback" not in response.text
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_malformed_json_and_the_real_client_raises_bad_request(server, client):
    response = httpx.post(f"{server.base_url}/completions", content=b'{"model": "smollm2-135m", "prompt": ',
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=CHAT)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    m = metrics(server)
    for name in ["minillm_num_requests_running", "minillm_num_requests_waiting", "minillm_kv_blocks_used",
                 "minillm_kv_blocks_total", "minillm_num_preemptions_total", "minillm_prefix_cache_hits_total",
                 "minillm_time_to_first_token_seconds_count", "minillm_time_per_output_token_seconds_count"]:
        assert name in m, name
    assert m["minillm_time_to_first_token_seconds_count"] > 0


def test_structured_output_is_valid_json(client):
    got = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as a JSON object with keys name and "
                                                           "country."}],
        max_tokens=40, temperature=0, response_format={"type": "json_object"})
    text = got.choices[0].message.content
    assert text.startswith("{")
    if got.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    regex = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                      extra_body={"guided_regex": " ?(yes|no)"})
    assert regex.choices[0].text.strip() in ("yes", "no") and regex.choices[0].finish_reason == "stop"


def test_a_full_queue_answers_429_and_recovers(llm):
    with start_server(llm, MODEL, max_pending_requests=2) as small:
        async def run():
            aclient = openai.AsyncOpenAI(base_url=small.base_url, api_key="none", max_retries=0, timeout=120)

            async def one():
                try:
                    r = await aclient.completions.create(model=MODEL, prompt="Hello", max_tokens=24, temperature=0,
                                                         extra_body={"ignore_eos": True})
                    return r.usage.completion_tokens
                except openai.RateLimitError:
                    return "429"
            return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(8))), timeout=120)

        results = asyncio.run(run())
        assert results.count("429") >= 1 and all(r in ("429", 24) for r in results), results
        assert results.count(24) >= 2, "the admitted ones finish"
        m = wait_until_idle(small)
        assert m['minillm_requests_rejected_total{status="429"}'] == results.count("429")
        ok = openai.OpenAI(base_url=small.base_url, api_key="none", max_retries=0).completions.create(
            model=MODEL, prompt="Hi", max_tokens=2)
        assert ok.usage.completion_tokens >= 1


def test_engine_loop_from_threads_and_its_bounded_queue(llm):
    with EngineLoop(llm, max_pending_requests=3) as loop:
        params = minillm.SamplingParams(max_tokens=5, ignore_eos=True)
        streams = [loop.submit(p, params) for p in PROMPTS]
        with pytest.raises(QueueFull, match="max 3"):
            loop.submit("one too many", params)
        for stream in streams:
            deltas = [d for batch in stream.sync_events(timeout=60) for d in batch]
            assert sum(len(d.token_ids) for d in deltas) == 5 and deltas[-1].finish_reason == "length"
        assert loop.admission.pending == {} and loop.admission.num_rejected == 1
        stream = loop.submit(PROMPTS[0], minillm.SamplingParams(max_tokens=500, ignore_eos=True))
        next(stream.sync_events(timeout=60))
        loop.abort(stream.request_id)
        last = list(stream.sync_events(timeout=60))
        assert last[-1][-1].finish_reason == "aborted"
    with pytest.raises(minillm.serve.engine_loop.EngineStopped):
        loop.submit("after stop", params)


def test_fit_history_drops_whole_old_exchanges():
    def count(messages):
        return sum(len(m["content"]) for m in messages)

    history = [{"role": "system", "content": "s" * 5}]
    for i in range(3):
        history += [{"role": "user", "content": f"u{i}" * 5}, {"role": "assistant", "content": f"a{i}" * 5}]
    message = {"role": "user", "content": "new" * 3}
    assert fit_history(history, message, count, 1000) == history + [message]
    trimmed = fit_history(history, message, count, 5 + 9 + 20)  # the system prompt, the message, one exchange
    assert trimmed == [history[0], *history[5:], message]
    assert fit_history(history, message, count, 8) is None
    assert drop_oldest_exchange([message]) is None


@pytest.mark.slow  # a subprocess loads the model (~10 s)
def test_chat_survives_ctrl_c_and_a_message_longer_than_the_context(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minillm", "chat", "--max-tokens", "300", "--temperature", "0"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
        # A terminal's Ctrl-C, even where this test runs with SIGINT ignored (nohup, CI): ignored stays ignored
        # across exec, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        out = ""

        def read_more(timeout_s: float) -> None:
            nonlocal out
            readable, _, _ = select.select([proc.stdout], [], [], timeout_s)
            if readable:
                out += os.read(proc.stdout.fileno(), 4096).decode(errors="replace")

        def read_until(marker: str, timeout_s: float = 120) -> str:
            deadline = time.monotonic() + timeout_s
            while marker not in out:
                assert time.monotonic() < deadline and proc.poll() is None, f"waiting for {marker!r}:\n{out}"
                read_more(min(1.0, max(0.0, deadline - time.monotonic())))
            return out

        read_until("you> ")
        proc.stdin.write("Write a long story about a dragon.\n")
        proc.stdin.flush()
        read_until("bot> ")
        start = len(out)
        deadline = time.monotonic() + 120
        while len(out) - start < 40:  # the answer is streaming: interrupt it
            assert time.monotonic() < deadline and proc.poll() is None, out
            read_more(1.0)
        proc.send_signal(signal.SIGINT)
        read_until("[stopped]")
        read_until("you> ")
        proc.stdin.write("word " * 9000 + "\n")  # longer than the 8192-token context
        proc.stdin.flush()
        read_until("longer than the context")
        proc.stdin.write("What did I ask you for first?\n")
        proc.stdin.flush()
        read_until("bot> ")
        proc.stdin.close()
        assert proc.wait(timeout=180) == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
