"""Pictures of the decode roofline: where a batch of B sequences lands, and a batch-size slider to move it.

In doing so, you will see:
  * batching as a move to the right on the roofline (Williams, Waterman & Patterson, CACM 2009): B sequences
    decoded in one step share one read of the weights, so the arithmetic intensity grows about B-fold and the
    point climbs the memory slope, until it reaches the compute roof at the ridge point;
  * the bound on tokens/s that follows, growing with B and then flat: at the compute roof (peak_flops /
    flops_per_token), or earlier at bandwidth / KV bytes per token, because each sequence reads its own KV cache
    (the reason long contexts make serving memory bound at any batch size, chapters 03-05).
Every number is ``minillm.bench.roofline.decode_roofline`` of the measured peak and bandwidth; nothing is redrawn
by hand. Used by notebooks/00_setup_and_roofline.ipynb. Matplotlib only; ``roofline_widget`` also needs ipywidgets.
"""

from __future__ import annotations

import torch

from minillm.bench.roofline import decode_roofline, plot_roofline
from minillm.config import ModelConfig

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTEXT_LENS = (0, 128, 512, 2048, 8192)


def decode_points(
    config: ModelConfig,
    dtype: torch.dtype,
    peak_flops: float,
    bandwidth: float,
    batch_sizes: tuple[int, ...] | list[int],
    context_len: int,
) -> list[dict]:
    """One roofline point per batch size: dict(label, intensity, flops, batch_size, tokens_per_s, bound).

    flops is the attainable FLOP/s at that intensity, min(peak_flops, bandwidth * intensity): on the roof.
    """
    points = []
    for batch_size in batch_sizes:
        roof = decode_roofline(config, dtype, bandwidth, context_len, batch_size, peak_flops=peak_flops)
        points.append(dict(
            label=f"batch {batch_size}: at most {roof['tokens_per_s']:,.0f} tok/s ({roof['bound']} bound)",
            intensity=roof["intensity"], flops=min(peak_flops, bandwidth * roof["intensity"]),
            batch_size=batch_size, tokens_per_s=roof["tokens_per_s"], bound=roof["bound"],
        ))
    return points


def draw_decode_roofline(
    config: ModelConfig,
    dtype: torch.dtype,
    peak_flops: float,
    bandwidth: float,
    batch_sizes: tuple[int, ...] | list[int],
    context_len: int,
    measured: list[dict] = (),
    title: str = "",
):
    """Two panels: the roofline with one point per batch size (plus `measured` points, hollow), and the bound on
    tokens/s against batch size with its limits. `measured`: dicts(label, intensity, flops[, marker])."""
    import matplotlib.pyplot as plt
    import numpy as np

    points = decode_points(config, dtype, peak_flops, bandwidth, batch_sizes, context_len)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(points)))
    for p, color in zip(points, colors):
        p["color"] = color
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.25, 1]})
    plot_roofline(peak_flops, bandwidth, points + [dict(m, hollow=True, color=m.get("color", "tab:red"))
                                                   for m in measured], title, ax=ax1)
    # The path a growing batch takes: small gray dots at every batch size the slider offers.
    path = decode_points(config, dtype, peak_flops, bandwidth, BATCH_SIZES, context_len)
    ax1.plot([p["intensity"] for p in path], [p["flops"] for p in path], ".", color="gray", ms=5, zorder=3)

    # Right: the bound on tokens/s for every batch size from 1 to past the largest one drawn.
    sweep = np.unique(np.logspace(0, np.log10(max(BATCH_SIZES[-1], max(batch_sizes))), 60).round().astype(int))
    bound = [decode_roofline(config, dtype, bandwidth, context_len, int(b), peak_flops)["tokens_per_s"] for b in sweep]
    ax2.loglog(sweep, bound, "k-", lw=2, label="best possible tokens/s")
    roof = decode_roofline(config, dtype, bandwidth, context_len, 1, peak_flops)
    limits = [peak_flops / roof["flops_per_token"]]
    ax2.axhline(limits[0], color="tab:gray", ls="--", lw=1, label="compute roof")
    if roof["kv_bytes"]:
        limits.append(bandwidth / roof["kv_bytes"])
        ax2.axhline(limits[1], color="tab:orange", ls="--", lw=1,
                    label="KV-cache limit (bandwidth / KV bytes per token)")
    for p in points:
        ax2.plot(p["batch_size"], p["tokens_per_s"], "o", ms=8, color=p["color"])
    _plain_log_ticks(ax2, min(bound), max(bound + [x for x in limits if x < 10 * max(bound)]))
    ax2.set_xlabel("batch size (sequences decoded per step)")
    ax2.set_ylabel("tokens/s, summed over the batch")
    ax2.set_title(f"the bound on decode speed, {context_len} tokens of context")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def _plain_log_ticks(ax, lo: float, hi: float) -> None:
    # Log axes label 4 x 10^2; tokens/s read better as 400. Ticks at 1, 2, 5 x 10^k inside [lo, hi].
    import math

    from matplotlib.ticker import NullFormatter

    ticks = [m * 10**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo / 1.5 <= t <= hi * 1.5]
    ax.set_yticks(ticks, [f"{t:,.0f}" if t >= 1 else f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())


def roofline_widget(
    config: ModelConfig,
    dtype: torch.dtype,
    peak_flops: float,
    bandwidth: float,
    measured: list[dict] = (),
    title: str = "",
    batch_size: int = 8,
    context_len: int = 128,
):
    """Sliders for batch size and context length over ``draw_decode_roofline``; raises ImportError without
    ipywidgets (the notebook then shows the static figure only)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    def show(batch_size: int, context_len: int) -> None:
        draw_decode_roofline(config, dtype, peak_flops, bandwidth, [batch_size], context_len, measured, title)
        plt.show()

    return widgets.interact(
        show,
        batch_size=widgets.SelectionSlider(options=list(BATCH_SIZES), value=batch_size, description="batch"),
        context_len=widgets.SelectionSlider(options=list(CONTEXT_LENS), value=context_len, description="context"),
    )
