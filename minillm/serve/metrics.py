"""``/metrics``: what the engine is doing, in Prometheus' text format, for dashboards and load tests.

Two kinds of numbers: gauges read from the engine when someone asks (requests running and waiting, KV blocks in
use, preemptions and prefix-cache hits so far), and histograms of per-request latencies recorded as requests
finish: time to first token (TTFT: queueing + prefill) and time per output token (TPOT: the decode rhythm a reader
sees). The names follow vLLM's (``vllm:num_requests_running`` is ``minillm_num_requests_running`` here), so the
same dashboard queries work. prometheus_client writes the format; we only say what to count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from minillm.serve.engine_loop import EngineLoop, RequestStream

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class EngineCollector:
    """Gauges read from the engine at scrape time (under its lock, so they describe one moment)."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def collect(self):
        llm = self.loop.llm
        with llm._lock:
            scheduler = llm.engine.scheduler
            bm = llm.engine.block_manager
            running, waiting = len(scheduler.running), len(scheduler.waiting)
            used, total = bm.num_used_blocks, bm.num_blocks
            preemptions, hits, queries = scheduler.num_preemptions, bm.prefix_cache_hits, bm.prefix_cache_queries
        yield GaugeMetricFamily("minillm_num_requests_running", "Sequences in the running batch", value=running)
        yield GaugeMetricFamily("minillm_num_requests_waiting", "Sequences waiting to be scheduled", value=waiting)
        yield GaugeMetricFamily("minillm_num_requests_in_flight", "Requests admitted and not yet finished",
                                value=len(self.loop.admission.pending))
        yield GaugeMetricFamily("minillm_kv_blocks_used", "KV-cache blocks held by sequences", value=used)
        yield GaugeMetricFamily("minillm_kv_blocks_total", "KV-cache blocks in the pool", value=total)
        yield GaugeMetricFamily("minillm_kv_cache_usage_ratio", "Fraction of the KV pool in use",
                                value=used / total if total else 0.0)
        yield CounterMetricFamily("minillm_num_preemptions", "Sequences preempted for KV memory", value=preemptions)
        yield CounterMetricFamily("minillm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=queries)
        yield CounterMetricFamily("minillm_prefix_cache_hits", "Prompt tokens found in the prefix cache", value=hits)
        yield CounterMetricFamily("minillm_engine_steps", "Engine steps since the server started",
                                value=self.loop.num_steps)


class ServerMetrics:
    """The server's registry: the engine's gauges plus per-request histograms and counters."""

    def __init__(self, loop: EngineLoop):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(loop))
        self.ttft = Histogram("minillm_time_to_first_token_seconds", "Arrival to first token", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram("minillm_time_per_output_token_seconds", "Mean gap between output tokens",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.finished = Counter("minillm_requests_finished", "Requests that ended, by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.rejected = Counter("minillm_requests_rejected", "Requests refused, by HTTP status", ["status"],
                                registry=self.registry)
        self.generation_tokens = Counter("minillm_generation_tokens", "Output tokens sent", registry=self.registry)

    def observe(self, stream: RequestStream) -> None:
        """A request ended (called on the engine thread): record its latencies and how it ended."""
        for seq in stream.seqs:
            self.finished.labels(seq.finish_reason or "unknown").inc()
            self.generation_tokens.inc(len(seq.output_token_ids))
        first = stream.seqs[0]
        if first.first_token_time is not None:
            self.ttft.observe(first.first_token_time - first.arrival_time)
            n = len(first.output_token_ids)
            if n > 1 and first.finish_time is not None:
                self.tpot.observe((first.finish_time - first.first_token_time) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value}, for tests, the notebook's dashboard and the load generator."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
