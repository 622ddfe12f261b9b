"""minillm.bench.serve and its load generator: the summary's counting (percentiles, goodput under both SLOs, errors
and 429s), the workload's heavy tail and its trace file, and one quick real run (two systems, two rates, the real
openai client against a server on 127.0.0.1; about 30 s on 2 busy cores) whose JSON accounts for every request.
No timing is checked."""

import json

import numpy as np
import pytest

from minillm.bench import serve
from minillm.bench.headlines import serve_headline
from minillm.serve.loadgen import (
    Request,
    RequestResult,
    load_trace,
    make_workload,
    percentile,
    poisson_arrivals,
    save_trace,
    summarize,
)


def finished(i, ttft, tpot, tokens=5, itls=(0.1,)):
    e2e = ttft + tpot * (tokens - 1)
    return RequestResult(i, send_time=0.0, ttft=ttft, itls=list(itls), e2e=e2e, output_tokens=tokens, tpot=tpot)


def test_summarize_counts_goodput_only_for_requests_meeting_both_slos():
    results = [
        finished(0, ttft=0.2, tpot=0.05),  # good
        finished(1, ttft=0.4, tpot=0.08),  # good
        finished(2, ttft=2.0, tpot=0.05),  # TTFT too slow
        finished(3, ttft=0.3, tpot=0.5),  # TPOT too slow
        RequestResult(4, ttft=0.1, e2e=0.1, output_tokens=1),  # one token: no TPOT, only the TTFT counts: good
        RequestResult(5, send_time=0.0, error="429: queue full", rejected=True),
        RequestResult(6, send_time=0.0, error="500: internal error"),
    ]
    s = summarize(results, duration_s=2.0, slo_ttft_s=1.0, slo_tpot_s=0.1)
    assert (s["count"], s["finished"], s["rejected"], s["errors"]) == (7, 5, 1, 1)
    assert s["good"] == 3 and s["goodput"] == 1.5 and s["slo_attainment"] == pytest.approx(3 / 7)
    assert s["request_throughput"] == 2.5 and s["output_tokens_per_s"] == (4 * 5 + 1) / 2
    ttfts = [0.2, 0.4, 2.0, 0.3, 0.1]
    assert s["ttft_s"] == {f"p{q}": percentile(ttfts, q) for q in (50, 90, 99)}
    assert s["ttft_s"]["p50"] == 0.3 and s["tpot_s"]["p50"] == pytest.approx(0.065)  # of 0.05, 0.08, 0.05, 0.5
    assert s["itl_s"]["p99"] == pytest.approx(0.1)
    empty = summarize([RequestResult(0, error="client timeout")], 1.0, 1.0, 0.1)
    assert empty["finished"] == 0 and empty["errors"] == 1 and empty["ttft_s"]["p50"] is None
    with pytest.raises(ValueError, match="duration_s"):
        summarize(results, 0.0, 1.0, 0.1)


def test_workload_is_heavy_tailed_seeded_and_replayable(tmp_path):
    requests = make_workload(200, seed=1, min_tokens=8, max_tokens=64)
    lengths = [r.max_tokens for r in requests]
    assert all(8 <= n <= 64 for n in lengths) and np.median(lengths) < np.mean(lengths)
    assert max(lengths) == 64 and min(lengths) == 8  # the tail reaches the cap
    assert requests == make_workload(200, seed=1, min_tokens=8, max_tokens=64)
    assert requests != make_workload(200, seed=2, min_tokens=8, max_tokens=64)
    assert all(r.ignore_eos and r.messages[-1]["role"] == "user" for r in requests)
    shared = make_workload(3, seed=1, min_tokens=4, max_tokens=8, shared_system_prompt="Be brief.")
    assert all(r.messages[0] == {"role": "system", "content": "Be brief."} for r in shared)
    arrivals = poisson_arrivals(2.0, 200, np.random.default_rng(0))
    save_trace(tmp_path / "trace.json", requests, arrivals)
    assert load_trace(tmp_path / "trace.json") == (requests, arrivals)
    with pytest.raises(ValueError, match="exactly one"):
        Request(4)


def test_knee_is_the_highest_rate_meeting_the_slos_for_90_percent():
    rows = [{"rate": 1.0, "slo_attainment": 1.0}, {"rate": 2.0, "slo_attainment": 0.95},
            {"rate": 4.0, "slo_attainment": 0.5}, {"rate": 8.0, "slo_attainment": 0.95, "error": "lost one"}]
    assert serve.knee(rows) == 2.0
    assert serve.knee([{"rate": 1.0, "slo_attainment": 0.2}]) is None


@pytest.mark.slow
def test_quick_run_accounts_for_every_request(tmp_path):
    serve.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / "serve-cpu.png").exists()
    r = json.loads((tmp_path / "serve-cpu.json").read_text())["results"]
    assert set(r["systems"]) == {"minillm_continuous", "minillm_static"} and r["errors"] == {}
    assert r["peer"] == "minillm_static" and "architectures" in r["transformers_serve"]
    for system in r["systems"].values():
        assert [row["rate"] for row in system["rows"]] == [4.0, 16.0]
        for row in system["rows"]:
            assert "error" not in row, row["error"]
            assert row["count"] == 4 and row["finished"] + row["rejected"] == 4 and row["errors"] == 0
            assert row["server_after"] == {"num_requests_running": 0, "num_requests_waiting": 0,
                                           "num_requests_in_flight": 0, "kv_blocks_used": 0, "idle": True}
            assert row["ttft_s"]["p50"] > 0 and row["output_tokens_per_s"] > 0
    headline = serve_headline(r)
    assert "minillm_continuous: knee req/s" in headline and "minillm_static: max goodput req/s" in headline
