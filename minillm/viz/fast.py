"""Fast decoding, drawn: where a step's time goes, what a bucket pads, and how close decode gets to the roofline.

In doing so, you will see:
  * one engine step as a timeline (``plot_step_timeline``): the Python regions of the loop (schedule, prepare the
    batch, sample) and, inside the forward, every kernel colored by family with the gaps between them left white;
    the same step before and after a change, one row each;
  * the step as a budget (``plot_step_breakdown``): milliseconds per part, from ``StepProfile.summary()``;
  * CUDA-graph buckets (``plot_buckets``): each batch size padded up to its captured bucket, the padded rows that
    compute for nothing hatched;
  * decode speed against the bandwidth bound (``plot_decode_roofline``) and, with ``RooflineExplorer``, a batch size
    and precision picked with widgets (``table()`` is its static twin).

Used by notebooks/10_fast_decoding.ipynb. Matplotlib and pandas; the explorer also needs ipywidgets.
"""

from __future__ import annotations

import pandas as pd

from minillm.fast.buckets import pick_bucket

REGION_COLORS = {"minillm.schedule": "#f2c6a0", "minillm.prepare": "#f7dc9c", "minillm.forward": "#e8e8e8"}
FAMILY_COLORS = {"matmul": "tab:blue", "attention": "tab:purple", "fused (Triton)": "tab:green",
                 "fused (compiled)": "tab:cyan", "KV store / gather": "tab:olive", "elementwise / other": "tab:orange"}


def plot_step_timeline(profiles: dict, step: int = 0, ax=None):
    """One row per labelled ``StepProfile``: step ``step`` of each, its regions as a pale band, its kernels on top."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(11, 0.9 + 0.8 * len(profiles)))
    for row, (label, prof) in enumerate(profiles.items()):
        regions = prof.regions[prof.regions["step"] == step]
        t0 = float(regions.loc[regions["region"] == "step", "start_us"].iloc[0])
        for _, r in regions[regions["region"] != "step"].iterrows():
            ax.broken_barh([((r["start_us"] - t0) / 1e3, r["dur_us"] / 1e3)], (row - 0.42, 0.84),
                           color=REGION_COLORS[r["region"]])
        k = prof.kernels[(prof.kernels["step"] == step) & prof.kernels["in_forward"]]
        for fam, group in k.groupby("family"):
            spans = [((s - t0) / 1e3, d / 1e3) for s, d in zip(group["start_us"], group["dur_us"])]
            ax.broken_barh(spans, (row - 0.3, 0.6), color=FAMILY_COLORS.get(fam, "gray"))
    ax.set_yticks(range(len(profiles)), list(profiles))
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step started")
    handles = [Patch(color=c, label=n.removeprefix("minillm.")) for n, c in REGION_COLORS.items()]
    handles += [Patch(color=c, label=n) for n, c in FAMILY_COLORS.items()]
    ax.legend(handles=handles, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.1 * (
        len(profiles) < 2)))
    ax.set_title("one decode step: Python regions (pale), kernels (colored), gaps (white)")
    return ax.figure


def plot_step_breakdown(profiles: dict, ax=None):
    """Stacked bars of milliseconds per step by part (``StepProfile.summary()``), one bar per labelled profile."""
    import matplotlib.pyplot as plt

    tables = {label: prof.summary().set_index("part")["ms_per_step"].clip(lower=0) for label, prof in profiles.items()}
    frame = pd.DataFrame(tables).fillna(0.0).T  # (profiles, parts)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.8 + 0.6 * len(frame)))
    frame.plot.barh(stacked=True, ax=ax, colormap="tab20", width=0.7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    return ax.figure


def plot_buckets(buckets: list[int], batch_sizes: list[int], ax=None):
    """Each batch size padded to its bucket: real rows filled, padded rows hatched."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(batch_sizes)))
    for row, n in enumerate(batch_sizes):
        bucket = pick_bucket(n, buckets)
        ax.broken_barh([(0, n)], (row - 0.35, 0.7), color="tab:blue")
        if bucket > n:
            ax.broken_barh([(n, bucket - n)], (row - 0.35, 0.7), facecolor="white", edgecolor="tab:gray",
                           hatch="///")
        ax.text(bucket + 0.3, row, f"bucket {bucket}: {bucket - n} padded ({(bucket - n) / bucket:.0%})",
                va="center", fontsize=8)
    ax.set_yticks(range(len(batch_sizes)), [f"batch {n}" for n in batch_sizes])
    ax.invert_yaxis()
    ax.set_xlim(0, max(buckets) * 1.45)
    ax.set_xlabel(f"rows of the replayed graph (captured buckets: {buckets})")
    return ax.figure


def plot_decode_roofline(rows: pd.DataFrame, ax=None):
    """Tokens/s against batch size per ``system``, with the ``roofline_tokens_per_s`` bound and each point's share."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for system, group in rows.groupby("system", sort=False):
        ax.plot(group["batch_size"], group["tokens_per_s"], "o-", label=system)
        for b, t, f in zip(group["batch_size"], group["tokens_per_s"], group["fraction_of_roofline"]):
            ax.annotate(f"{f:.0%}", (b, t), textcoords="offset points", xytext=(4, -10), fontsize=7)
    bound = rows.drop_duplicates("batch_size")
    ax.plot(bound["batch_size"], bound["roofline_tokens_per_s"], "k--", label="roofline: bandwidth / bytes per step")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s")
    ax.legend(fontsize=8)
    return ax.figure


class RooflineExplorer:
    """Pick a batch size and a precision from measured ``rows`` (batch_size, precision, tokens_per_s,
    roofline_tokens_per_s): the measurement and its bound, as a widget or a static table."""

    def __init__(self, rows: pd.DataFrame):
        self.rows = rows

    def table(self) -> pd.DataFrame:
        t = self.rows.copy()
        t["fraction_of_roofline"] = t["tokens_per_s"] / t["roofline_tokens_per_s"]
        return t.pivot_table(index="batch_size", columns="precision",
                             values=["tokens_per_s", "fraction_of_roofline"]).round(3)

    def widget(self):
        import ipywidgets as widgets
        import matplotlib.pyplot as plt

        batch = widgets.SelectionSlider(options=sorted(self.rows["batch_size"].unique()), description="batch")
        precision = widgets.Dropdown(options=list(self.rows["precision"].unique()), description="precision")
        out = widgets.Output()

        def draw(_=None):
            with out:
                out.clear_output(wait=True)
                fig, ax = plt.subplots(figsize=(6.5, 3.6))
                for p, group in self.rows.groupby("precision"):
                    ax.plot(group["batch_size"], group["tokens_per_s"], "o-", alpha=0.35, label=f"{p} measured")
                    ax.plot(group["batch_size"], group["roofline_tokens_per_s"], ":", alpha=0.35, label=f"{p} bound")
                r = self.rows[(self.rows["batch_size"] == batch.value) & (self.rows["precision"] == precision.value)]
                t, bound = float(r["tokens_per_s"].iloc[0]), float(r["roofline_tokens_per_s"].iloc[0])
                ax.plot([batch.value], [t], "r*", markersize=14)
                ax.plot([batch.value], [bound], "k^", markersize=9)
                ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens/s",
                       title=f"{precision.value}, batch {batch.value}: {t:.1f} tokens/s = {t / bound:.0%} of the bound")
                ax.legend(fontsize=7)
                plt.show()

        batch.observe(draw, "value")
        precision.observe(draw, "value")
        draw()
        return widgets.VBox([widgets.HBox([batch, precision]), out])
