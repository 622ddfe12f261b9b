"""Quantization error against memory: a bits x group-size explorer for one real weight matrix.

In doing so, you will see:
  * the memory side, counted honestly: every weight costs its `bits`, and every group of G weights adds one fp16
    scale and, for the asymmetric (zero-point) format, one uint8 zero-point, so
        bits per weight = bits + (16 + 8) / G        (asymmetric; symmetric drops the 8)
    which is exactly what ``Int4Linear.nbytes()`` and ``Int8Linear.nbytes()`` store (one scale per row: G = K).
    GPTQ (Frantar et al., arXiv:2210.17323) and AWQ (Lin et al., arXiv:2306.00978) run at G = 128; llama.cpp's
    Q4_1 uses blocks of 32 with an fp16 minimum instead of an integer zero-point (5 bits per weight);
  * the error side: the signal-to-quantization-noise ratio of the weight (about 6 dB per extra bit, since each bit
    halves the step), and, given real activations x, of the layer's output x @ W^T, which is what the next layer sees;
  * the trade-off: a point (bits, G) is worth using only if no other point has both fewer bits per weight and less
    error (the Pareto front). Smaller groups follow local ranges (one outlier spoils only its group) but pay for
    more scales: at G = 24 a scale and a zero-point already cost one whole extra bit per weight.
Every number is computed with ``minillm.quant.numerics`` (`quantize_symmetric`, `quantize_asymmetric`, `sqnr_db`):
nothing here re-implements quantization.
Used by notebooks/06_quantization.ipynb. Matplotlib only; `explorer_widget` also needs ipywidgets.

Shapes: a weight is (N, K) = (out_features, in_features), groups run along K; activations x are (n, K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.quant.linear import SCALE_DTYPE
from minillm.quant.numerics import quantize_asymmetric, quantize_symmetric, sqnr_db

SCALE_BITS = torch.finfo(SCALE_DTYPE).bits  # 16: one fp16 scale per group
ZERO_POINT_BITS = 8  # one uint8 zero-point per group (asymmetric only)
BITS_OPTIONS = (2, 3, 4, 8)
GROUP_OPTIONS: tuple[int | None, ...] = (32, 64, 128, None)  # None: one scale per output channel (row)


def bits_per_weight(bits: int, group_size: int, symmetric: bool = False) -> float:
    """Storage per weight, scales and zero-points included: bits + (16 + 8 * (not symmetric)) / group_size.

    For one scale per output channel pass group_size = K (in_features). Codes are counted as if packed tightly
    (3-bit codes as 3 bits), as a kernel for that width would store them.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be a positive number of weights per scale, got {group_size}")
    overhead = SCALE_BITS + (0 if symmetric else ZERO_POINT_BITS)
    return bits + overhead / group_size


def group_label(group_size: int | None) -> str:
    return "channel" if group_size is None else f"g{group_size}"


@dataclass(frozen=True)
class QuantPoint:
    """One (bits, group size, format) setting measured on one weight matrix."""

    bits: int
    group_size: int | None  # None: per output channel
    symmetric: bool
    bits_per_weight: float
    weight_sqnr_db: float
    output_sqnr_db: float | None  # None when no activations were given

    @property
    def bytes_per_weight(self) -> float:
        return self.bits_per_weight / 8

    @property
    def label(self) -> str:
        return f"int{self.bits} {group_label(self.group_size)}{' sym' if self.symmetric else ''}"

    def sqnr(self, metric: str = "weight") -> float:
        if metric not in ("weight", "output"):
            raise ValueError(f"metric must be 'weight' or 'output', got {metric!r}")
        value = self.weight_sqnr_db if metric == "weight" else self.output_sqnr_db
        if value is None:
            raise ValueError("this point was measured without activations: no output SQNR")
        return value


def quantize_dequantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False) -> torch.Tensor:
    """The weight a (bits, group_size) model really multiplies by: w (N, K) -> fp32 (N, K), via minillm.quant."""
    quantize = quantize_symmetric if symmetric else quantize_asymmetric
    granularity = "channel" if group_size is None else "group"
    return quantize(w.float(), bits, granularity, group_size).dequantize()


def measure(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False, x: torch.Tensor | None = None
) -> tuple[QuantPoint, torch.Tensor]:
    """Quantize w (N, K) and return its QuantPoint and the dequantized weight (N, K) fp32.

    With activations x (n, K), the output SQNR compares x @ w^T with x @ w_hat^T, both in fp32.
    """
    w = w.detach().float()
    w_hat = quantize_dequantize(w, bits, group_size, symmetric)
    output_db = None
    if x is not None:
        x = x.detach().float().reshape(-1, w.shape[1])  # (n, K)
        output_db = sqnr_db(x @ w.t(), x @ w_hat.t())
    per_scale = w.shape[1] if group_size is None else group_size
    point = QuantPoint(bits, group_size, symmetric, bits_per_weight(bits, per_scale, symmetric),
                       sqnr_db(w, w_hat), output_db)
    return point, w_hat


def error_grid(
    w: torch.Tensor,
    bits_options: tuple[int, ...] = BITS_OPTIONS,
    group_options: tuple[int | None, ...] = GROUP_OPTIONS,
    symmetric_options: tuple[bool, ...] = (False,),
    x: torch.Tensor | None = None,
) -> list[QuantPoint]:
    """`measure` every combination of bits, group size and format; returns the points (weights not kept)."""
    return [measure(w, b, g, s, x)[0] for s in symmetric_options for g in group_options for b in bits_options]


def pareto_front(points: list[QuantPoint], metric: str = "weight") -> list[QuantPoint]:
    """The points no other point beats on both axes (fewer bits per weight and higher SQNR), by bits per weight."""
    front = []
    for p in points:
        dominated = any(
            q.bits_per_weight <= p.bits_per_weight and q.sqnr(metric) >= p.sqnr(metric)
            and (q.bits_per_weight < p.bits_per_weight or q.sqnr(metric) > p.sqnr(metric))
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.bits_per_weight)


# ---- figures --------------------------------------------------------------------------------------------------------
def group_colors(group_options: tuple[int | None, ...] = GROUP_OPTIONS) -> dict[int | None, tuple]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    n = max(len(group_options) - 1, 1)
    return {g: cmap(0.85 * i / n) for i, g in enumerate(group_options)}


def draw_tradeoff(points: list[QuantPoint], ax=None, metric: str = "weight", highlight: QuantPoint | None = None,
                  title: str | None = None):
    """SQNR against bits per weight: one line per group size across bits, the Pareto front dashed; -> the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    groups = tuple(dict.fromkeys(p.group_size for p in points))
    colors = group_colors(groups)
    for symmetric in sorted({p.symmetric for p in points}):
        for g in groups:
            line = sorted((p for p in points if p.group_size == g and p.symmetric == symmetric),
                          key=lambda p: p.bits_per_weight)
            if not line:
                continue
            name = group_label(g) + (" (symmetric)" if symmetric else "")
            ax.plot([p.bits_per_weight for p in line], [p.sqnr(metric) for p in line], "s--" if symmetric else "o-",
                    color=colors[g], label=name, markerfacecolor="none" if symmetric else colors[g], markersize=5)
    # The front as a staircase: the best SQNR reachable with at most x bits per weight.
    front = pareto_front(points, metric)
    ax.step([p.bits_per_weight for p in front], [p.sqnr(metric) for p in front], where="post", color="tab:red",
            linewidth=1.2, alpha=0.7, label="Pareto front", zorder=1)
    for b in sorted({p.bits for p in points}):
        ax.axvline(b, color="gray", linewidth=0.5, linestyle=":")
        ax.text(b, 0.99, f" {b}-bit codes", transform=ax.get_xaxis_transform(), fontsize=7, color="gray", rotation=90,
                va="top")
    if highlight is not None:
        hx, hy = highlight.bits_per_weight, highlight.sqnr(metric)
        ax.scatter([hx], [hy], s=220, facecolor="none", edgecolor="tab:red", linewidth=2, zorder=4)
        right = hx > 6  # keep the label inside the axes
        ax.annotate(f"{highlight.label}: {hx:.3f} bits/weight, {hy:.1f} dB", (hx, hy),
                    xytext=(-10 if right else 10, -4 if right else 6), textcoords="offset points",
                    ha="right" if right else "left", fontsize=8, color="tab:red")
    # Log scale: the 2-, 3- and 4-bit clusters get room of their own next to the far 8-bit one.
    ax.set_xscale("log", base=2)
    ticks = [t for t in (2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9)
             if min(p.bits_per_weight for p in points) - 0.3 <= t <= max(p.bits_per_weight for p in points) + 0.3]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("bits per weight, scales and zero-points included (log)")
    ax.set_ylabel(f"{metric} SQNR (dB), higher is better")
    ax.set_title(title or f"{metric} error vs memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return ax


def draw_explorer(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False,
                  x: torch.Tensor | None = None, points: list[QuantPoint] | None = None, row: int = 0,
                  num_shown: int = 96, name: str = "weight", fig=None):
    """Three panels for one setting: a row's weights and their quantized values, the value histograms, and where the
    setting sits on the error-vs-memory chart (``points``, default: the whole grid). Returns (figure, QuantPoint)."""
    import matplotlib.pyplot as plt

    point, w_hat = measure(w, bits, group_size, symmetric, x)
    points = points if points is not None else error_grid(w, symmetric_options=(symmetric,), x=x)
    metric = "output" if x is not None else "weight"
    fig = fig or plt.figure(figsize=(15, 4))
    ax_row, ax_hist, ax_trade = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1, 1.2]})

    w = w.detach().float().cpu()
    w_hat = w_hat.cpu()
    k = torch.arange(num_shown)
    ax_row.plot(k, w[row, :num_shown], ".", color="gray", markersize=4, label="original")
    ax_row.step(k, w_hat[row, :num_shown], where="mid", color="tab:blue", linewidth=1, label="dequantized")
    if group_size is not None:
        for b in range(group_size, num_shown, group_size):
            ax_row.axvline(b - 0.5, color="tab:red", linewidth=0.8, linestyle="--")
    ax_row.set_xlabel(f"input column k of row {row}" + ("" if group_size is None else " (red: group boundaries)"))
    levels = 2**bits - 1 if symmetric else 2**bits  # symmetric codes use [-qmax, qmax]: one level unused
    ax_row.set_title(f"{point.label}: {levels} levels per "
                     f"{'row' if group_size is None else f'group of {group_size}'}", fontsize=9)
    ax_row.legend(fontsize=7)

    # The central 99.9% of the weights: over the full range a few outliers would squeeze the bulk into one bin.
    lo, hi = torch.quantile(w.flatten()[:: max(1, w.numel() // 1_000_000)], torch.tensor([0.0005, 0.9995])).tolist()
    bins = torch.linspace(lo, hi, 121).numpy()
    ax_hist.hist(w.flatten().numpy(), bins=bins, log=True, color="gray", alpha=0.6, label="original")
    ax_hist.hist(w_hat.flatten().numpy(), bins=bins, log=True, histtype="step", color="tab:blue", label="dequantized")
    err = (w_hat - w).abs()
    ax_hist.set_title(f"{w.numel():,} weights: mean |error| {err.mean():.2e}, max {err.max():.2e}", fontsize=9)
    ax_hist.set_xlabel(f"{name} (central 99.9%)")
    ax_hist.legend(fontsize=7)

    draw_tradeoff(points, ax=ax_trade, metric=metric, highlight=point,
                  title=f"{metric} SQNR {point.sqnr(metric):.1f} dB at {point.bytes_per_weight:.3f} bytes/weight")
    fig.tight_layout()
    return fig, point


def explorer_widget(w: torch.Tensor, x: torch.Tensor | None = None, name: str = "weight",
                    bits_options: tuple[int, ...] = BITS_OPTIONS,
                    group_options: tuple[int | None, ...] = GROUP_OPTIONS,
                    grids: dict[bool, list[QuantPoint]] | None = None):
    """Toggle buttons for bits, group size and format, redrawing `draw_explorer` (needs ipywidgets).

    grids: {symmetric: error_grid(...)} already measured over the same options (computed here when None).
    The figure is shown as a PNG in an Image widget rather than in an Output widget: same look, and notebook
    runners that do not keep widget state (nbclient with store_widget_state=False) cannot handle Output widgets.
    """
    import io

    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    if grids is None:  # measured once, reused by every redraw
        grids = {s: error_grid(w, bits_options, group_options, (s,), x) for s in (False, True)}
    bits = widgets.ToggleButtons(options=list(bits_options), value=4 if 4 in bits_options else bits_options[0],
                                 description="bits")
    group = widgets.ToggleButtons(options=[(group_label(g), g) for g in group_options],
                                  value=128 if 128 in group_options else group_options[0], description="group")
    fmt = widgets.ToggleButtons(options=[("zero-point", False), ("symmetric", True)], value=False,
                                description="format")
    image = widgets.Image(format="png")

    def show(change=None):
        fig = plt.figure(figsize=(15, 4))
        draw_explorer(w, bits.value, group.value, fmt.value, x=x, points=grids[fmt.value], name=name, fig=fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        image.value = buffer.getvalue()

    for control in (bits, group, fmt):
        control.observe(show, names="value")
    show()
    return widgets.VBox([bits, group, fmt, image])
