"""Serving, drawn: latency against load, the stalls chunked prefill removes, the prefix cache warming up, a dashboard.

In doing so, you will see:
  * TTFT and TPOT percentiles and goodput against the offered request rate (``plot_load_curves``), the SLO dashed
    and each system's knee starred: latency stays flat, then queueing takes over;
  * the gaps between the tokens of running answers while a long prompt is prefilled (``plot_itl_timeline``): one
    tall spike without chunked prefill, a few short ones with it;
  * the prefix cache's hit rate over requests that share a system prompt (``plot_prefix_hits``);
  * ``/metrics`` polled live while a load runs (``MetricsDashboard``): an ipywidgets readout in a notebook with a
    kernel, and a static figure of the same samples for one without.

Used by notebooks/12_serving.ipynb and ``python -m minillm.bench serve``. Matplotlib only; each function returns its
figure.
"""

from __future__ import annotations

import math
import threading
import time

import httpx
import matplotlib.pyplot as plt

from minillm.serve.metrics import parse_metrics


def plot_load_curves(by_system: dict[str, list[dict]], knees: dict, slo_ttft: float, slo_tpot: float, title: str):
    """TTFT p90, TPOT p90 and goodput against the offered rate, one line per system (rows of bench serve's JSON)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("ttft_s", 1e3, "TTFT p90, ms", slo_ttft * 1e3), ("tpot_s", 1e3, "TPOT p90, ms", slo_tpot * 1e3),
              ("goodput", 1, "goodput, req/s meeting both SLOs", None)]
    rates = sorted({r["rate"] for rows in by_system.values() for r in rows})
    for ax, (key, scale, label, slo) in zip(axes, panels):
        for i, (name, rows) in enumerate(by_system.items()):
            color = f"C{i}"
            x = [r["rate"] for r in rows]
            y = [(r[key]["p90"] if isinstance(r[key], dict) else r[key]) for r in rows]
            y = [v * scale if v is not None else math.nan for v in y]
            ax.plot(x, y, "o-", color=color, label=name)
            if knees.get(name) is not None:
                k = x.index(knees[name])
                ax.plot([x[k]], [y[k]], "*", color=color, markersize=15, markeredgecolor="black",
                        label=f"{name} knee ({x[k]:g} req/s)" if key == "goodput" else None)
        if slo is not None:
            ax.axhline(slo, color="gray", linestyle="--", label=f"SLO {slo:g} ms")
        else:
            ax.plot(rates, rates, color="gray", linestyle="--", label="goodput = offered rate")
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_xlabel("offered rate, req/s")
        ax.set_title(label, fontsize=10)
        if key != "goodput":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_stored_load(record: dict):
    """``plot_load_curves`` for a stored ``bench serve`` JSON file's record."""
    results, env = record["results"], record["environment"]
    systems = results["systems"]
    return plot_load_curves({name: s["rows"] for name, s in systems.items()},
                            {name: s["knee_rate"] for name, s in systems.items()}, results["slo"]["ttft_s"],
                            results["slo"]["tpot_s"], f"stored run on {env['device']}, commit "
                            f"{(env.get('commit') or '?')[:10]}: star = knee")


def describe_load(record: dict) -> str:
    """One paragraph, generated from a stored ``bench serve`` file's record: each system's best goodput and knee."""
    results, env = record["results"], record["environment"]
    slo = results["slo"]
    parts = []
    for name, s in results["systems"].items():
        knee = (f"knee at {s['knee_rate']:g} req/s" if s["knee_rate"] is not None
                else "no knee: at no rate did 90% of its requests meet the SLO")
        parts.append(f"**{name}** {s['max_goodput']:.2f} req/s at best ({knee})")
    ratio = results.get("max_goodput_ratio")
    verdict = f"; continuous batching's best goodput is **{ratio:.1f}x** {results['peer']}'s" if ratio else ""
    return (f"On {env['device']}, with an SLO of TTFT ≤ {slo['ttft_s']:g} s and TPOT ≤ "
            f"{slo['tpot_s'] * 1e3:g} ms, {results['workload']['num_requests']} requests per rate: "
            + "; ".join(parts) + verdict + ".")


def plot_itl_timeline(runs: dict[str, dict], prompt_tokens: int):
    """Each run's gaps between consecutive tokens of the running answers, over time; the long prompt's arrival."""
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.6), sharey=True)
    for ax, (name, run) in zip(axes, runs.items()):
        times, gaps = zip(*run["gaps"])
        ax.scatter(times, [1e3 * g for g in gaps], s=12, color="tab:blue", label="gap before a token, ms")
        ax.axvline(run["arrived"], color="tab:red", linestyle="--", label=f"a {prompt_tokens}-token prompt arrives")
        ax.set_title(f"{name}: worst gap {1e3 * max(gaps):.0f} ms", fontsize=10)
        ax.set_xlabel("time, s")
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("inter-token gap, ms")
    fig.tight_layout()
    return fig


def plot_prefix_hits(hit_rates: list[float]):
    """The share of all prompt tokens so far found in the prefix cache, after each request."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(1, len(hit_rates) + 1)
    ax.plot(x, [100 * h for h in hit_rates], "o-", color="tab:green")
    ax.set_xticks(list(x))
    ax.set_ylim(0, 100)
    ax.set_xlabel("requests sharing the system prompt")
    ax.set_ylabel("prompt tokens found in cache, %")
    ax.set_title("prefix cache hit rate, cumulative", fontsize=10)
    fig.tight_layout()
    return fig


DASHBOARD_SERIES = {"running": "minillm_num_requests_running", "waiting": "minillm_num_requests_waiting",
                    "KV blocks used": "minillm_kv_blocks_used"}


class MetricsDashboard:
    """Polls ``/metrics`` every `interval_s` on a thread; shows a live readout (ipywidgets) and keeps the samples."""

    def __init__(self, url: str, interval_s: float = 0.2):
        self.url, self.interval_s = url, interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._widget = None

    def start(self) -> MetricsDashboard:
        try:
            import ipywidgets
            from IPython.display import display

            self._widget = ipywidgets.HTML()
            display(self._widget)
        except ImportError:  # no widgets here: the samples still make the static figure
            self._widget = None
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _poll(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                values = parse_metrics(http.get(f"{self.url}/metrics").text)
                self.samples.append((time.perf_counter() - self._t0, values))
                if self._widget is not None:
                    self._widget.value = self._html(values)
                self._stop.wait(self.interval_s)

    @staticmethod
    def _html(values: dict[str, float]) -> str:
        count = values.get("minillm_time_to_first_token_seconds_count", 0)
        ttft = values.get("minillm_time_to_first_token_seconds_sum", 0) / count if count else 0.0
        cells = [(label, f"{values.get(name, 0):.0f}") for label, name in DASHBOARD_SERIES.items()]
        cells.append(("mean TTFT", f"{ttft:.2f} s"))
        return "<table><tr>" + "".join(f"<td style='padding:0 12px'><b>{label}</b><br>{v}</td>"
                                       for label, v in cells) + "</tr></table>"

    def plot(self):
        """The samples as a static figure: requests running and waiting, KV blocks used."""
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.2))
        t = [s[0] for s in self.samples]
        for label in ("running", "waiting"):
            left.plot(t, [s[1].get(DASHBOARD_SERIES[label], 0) for s in self.samples], label=label)
        right.plot(t, [s[1].get(DASHBOARD_SERIES["KV blocks used"], 0) for s in self.samples], color="tab:purple")
        left.set_title("requests (sequences) in the engine", fontsize=10)
        right.set_title("KV blocks in use", fontsize=10)
        for ax in (left, right):
            ax.set_xlabel("time, s")
        left.legend(fontsize=8)
        fig.tight_layout()
        return fig
