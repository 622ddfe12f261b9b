"""Pruning as a slider: the perplexity and the greedy text of one model at every sparsity, magnitude against Wanda.

In doing so, you will see:
  * the cliff: a model loses little while the first weights go, then perplexity climbs by orders of magnitude
    over the next few tens of percent, and the generated text turns from sentences into repetition or noise;
  * that the score decides where the cliff is: magnitude (``|W|``, Han et al., arXiv 1506.02626) falls off earlier
    than Wanda (``|W| * ||X_j||``, Sun et al., arXiv 2306.11695, table 2), which keeps the weights on the few loud
    input channels;
  * what a perplexity means in words, by reading the text each pruned model writes next to its number, and by
    asking the dense model how surprising it finds that text (``continuation_perplexity``).

One point of the grid means pruning every decoder linear (``minillm.prune.prune_model``), evaluating perplexity
(``minillm.eval.perplexity``) and generating: seconds to minutes on a CPU. So ``sweep_pruning`` runs the whole grid
once, restoring the dense weights between settings, and the widget only looks results up: a slider that recomputed
on every move would feel broken in a lecture. ``PruningSweep.figure`` is the static version that reads on GitHub.
Used by notebooks/07_pruning.ipynb. Matplotlib and pandas; ``PruningSweep.widget`` also needs ipywidgets.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from minillm.prune import PRUNE_METHODS, is_nm_sparse, parse_pattern, prunable_linears, prune_model
from minillm.prune.magnitude import check_sparsity, num_pruned_per_row

DENSE = "dense"
COLORS = {"magnitude": "C3", "wanda": "C0"}
MARKERS = {"4:8": "s", "2:4": "D"}


@dataclass(frozen=True)
class PruneSetting:
    """One point of the grid: a method ("dense", "magnitude", "wanda"), a sparsity, and a pattern (None or "N:M")."""

    method: str
    sparsity: float = 0.0
    pattern: str | None = None

    def __post_init__(self):
        if self.method not in (DENSE, *PRUNE_METHODS):
            raise ValueError(f"unknown method {self.method!r}; choose one of {(DENSE, *PRUNE_METHODS)}")
        check_sparsity(self.sparsity)
        if self.method == DENSE and (self.sparsity or self.pattern):
            raise ValueError(f"the dense setting has sparsity 0 and no pattern, got {self.sparsity}, {self.pattern!r}")
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern!r} fixes the sparsity at {1 - n / m:g}, got {self.sparsity}")

    @property
    def label(self) -> str:
        """"dense", "wanda 50%", "magnitude 2:4"."""
        if self.method == DENSE:
            return DENSE
        return f"{self.method} {self.pattern or f'{self.sparsity:.0%}'}"


def grid(methods: Sequence[str] = PRUNE_METHODS, sparsities: Sequence[float] = (0.5,),
         patterns: Sequence[str] = ()) -> list[PruneSetting]:
    """The dense model, then for each method every unstructured sparsity (ascending) and every N:M pattern.

    A sparsity of 0 is the dense model, listed once whatever the methods.
    """
    settings = [PruneSetting(DENSE)]
    for method in methods:
        settings += [PruneSetting(method, s) for s in sorted(set(sparsities)) if s > 0]
        for pattern in patterns:
            n, m = parse_pattern(pattern)
            settings.append(PruneSetting(method, 1 - n / m, pattern))
    return settings


def pattern_holds(model: nn.Module, setting: PruneSetting) -> bool:
    """Does every prunable linear satisfy `setting`: at least the requested zeros in every row (unstructured, the
    checkpoint's own zeros may add to them), or at most N non-zeros in every group of M inputs (N:M)?"""
    for linear in prunable_linears(model).values():
        weight = linear.weight.detach()
        if setting.pattern is not None:
            if not is_nm_sparse(weight, *parse_pattern(setting.pattern)):
                return False
        elif (weight == 0).sum(dim=1).min() < num_pruned_per_row(weight.shape[1], setting.sparsity):
            return False
    return True


@torch.no_grad()
def continuation_perplexity(judge: nn.Module, tokenizer, prompt: str, text: str) -> float:
    """The perplexity `judge` (say, the dense model) assigns to `text` as the continuation of `prompt`.

    Prompt and text are tokenized together; only the tokens after the prompt's are scored, each given all before it:
    exp(mean negative log-likelihood), as in ``minillm.eval.perplexity``. High means the judge finds the text
    surprising (noise, broken grammar); a model's own greedy text scores low by construction.
    """
    num_prompt = tokenizer(prompt, return_tensors="pt").input_ids.shape[1]
    device = next(judge.parameters()).device
    ids = tokenizer(prompt + text, return_tensors="pt").input_ids.to(device)  # (1, T)
    if ids.shape[1] <= num_prompt:
        raise ValueError(f"text {text!r} adds no token to the prompt's {num_prompt}")
    logits = judge(ids).float()  # (1, T, V); position t - 1 predicts token t
    nll = F.cross_entropy(logits[0, num_prompt - 1 : -1], ids[0, num_prompt:])
    return math.exp(nll.item())


@dataclass
class SweepPoint:
    """What one setting measured: achieved sparsity (over all prunable weights), perplexity, greedy text."""

    setting: PruneSetting
    achieved: float
    perplexity: float
    text: str
    pattern_holds: bool


@torch.no_grad()
def sweep_pruning(
    model: nn.Module,
    settings: list[PruneSetting],
    evaluate: Callable[[nn.Module], float],
    generate: Callable[[nn.Module], str],
    calibration: torch.Tensor | None = None,
) -> PruningSweep:
    """Prune `model` to every setting in turn, calling `evaluate(model)` (a perplexity) and `generate(model)` (text).

    The decoder linears' weights are saved first and restored before every setting and at the end, also when a
    call raises, so the model leaves as it came. calibration: (B, T) long token ids for Wanda (see ``prune_model``).
    """
    if not settings:
        raise ValueError("settings is empty; build one with grid(...)")
    linears = prunable_linears(model)
    saved = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    points, start = [], time.perf_counter()
    try:
        for setting in settings:
            for name, linear in linears.items():
                linear.weight.copy_(saved[name])
            if setting.method != DENSE:
                prune_model(model, setting.method, setting.sparsity, setting.pattern, calibration=calibration)
            weights = [linear.weight.detach() for linear in linears.values()]
            achieved = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
            points.append(SweepPoint(setting, achieved, float(evaluate(model)), generate(model),
                                     pattern_holds(model, setting)))
    finally:
        for name, linear in linears.items():
            linear.weight.copy_(saved[name])
    return PruningSweep(points, time.perf_counter() - start)


@dataclass
class PruningSweep:
    """The cached grid: look points up, tabulate, draw them, or browse them with a slider."""

    points: list[SweepPoint]
    seconds: float = 0.0

    @property
    def dense(self) -> SweepPoint:
        return next(p for p in self.points if p.setting.method == DENSE)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(p.setting.method for p in self.points if p.setting.method != DENSE))

    def point(self, method: str, sparsity: float = 0.5, pattern: str | None = None) -> SweepPoint:
        """The point measured for exactly this setting; sparsity 0 (no pattern) is the dense point for any method."""
        if sparsity == 0 and pattern is None:
            return self.dense
        for p in self.points:
            s = p.setting
            if s.method == method and s.pattern == pattern and abs(s.sparsity - sparsity) < 1e-9:
                return p
        measured = [p.setting.label for p in self.points]
        raise KeyError(f"{method} {pattern or sparsity} was not measured; measured: {measured}")

    def sparsities(self, method: str) -> list[float]:
        """The unstructured sparsities measured for `method`, 0 (dense) first."""
        return [0.0] + sorted(p.setting.sparsity for p in self.points
                              if p.setting.method == method and p.setting.pattern is None)

    def nearest(self, method: str, sparsity: float) -> SweepPoint:
        """The measured unstructured point of `method` closest to `sparsity` (what the slider shows)."""
        best = min(self.sparsities(method), key=lambda s: (abs(s - sparsity), s))
        return self.point(method, best)

    def curve(self, method: str) -> list[SweepPoint]:
        """Dense, then `method`'s unstructured points by increasing sparsity."""
        return [self.point(method, s) for s in self.sparsities(method)]

    def first_above(self, method: str, factor: float) -> float | None:
        """The lowest measured sparsity at which `method`'s perplexity exceeds `factor` x dense (None: never)."""
        limit = factor * self.dense.perplexity
        return next((p.setting.sparsity for p in self.curve(method) if p.perplexity > limit), None)

    def frame(self) -> pd.DataFrame:
        """One row per point: method, pattern, sparsity, achieved, perplexity, pattern_holds, text."""
        return pd.DataFrame([dict(method=p.setting.method, pattern=p.setting.pattern or (
            "-" if p.setting.method == DENSE else "unstructured"), sparsity=p.setting.sparsity, achieved=p.achieved,
            perplexity=p.perplexity, pattern_holds=p.pattern_holds, text=p.text) for p in self.points])

    def text_table(self, sparsities: list[float]) -> pd.DataFrame:
        """Dense, then every method at each of `sparsities` (nearest measured): setting, perplexity, text."""
        rows = [self.dense]
        for point in (self.nearest(m, s) for s in sparsities for m in self.methods):
            if all(point is not row for row in rows):  # 0% is the dense point for every method
                rows.append(point)
        return pd.DataFrame([dict(setting=p.setting.label, perplexity=p.perplexity, text=p.text) for p in rows])

    def draw(self, ax=None, highlight: SweepPoint | None = None, title: str = ""):
        """Perplexity (log scale) against sparsity: one line per method, N:M patterns as markers, dense dotted."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 4.5))
        for method in self.methods:
            color = COLORS.get(method, "C2")
            curve = self.curve(method)
            ax.plot([p.setting.sparsity for p in curve], [p.perplexity for p in curve], "o-", color=color,
                    label=f"{method}, unstructured")
            for p in self.points:
                if p.setting.method == method and p.setting.pattern is not None:
                    ax.scatter(p.setting.sparsity, p.perplexity, marker=MARKERS.get(p.setting.pattern, "^"), s=70,
                               color=color, edgecolor="k", zorder=3, label=f"{method}, {p.setting.pattern}")
        ax.axhline(self.dense.perplexity, color="gray", ls=":", label=f"dense ({self.dense.perplexity:.1f})")
        if highlight is not None:
            ax.scatter(highlight.setting.sparsity, highlight.perplexity, s=260, facecolor="none", edgecolor="k",
                       linewidth=2, zorder=4)
        ax.set(yscale="log", xlabel="sparsity (fraction of decoder weights removed)", ylabel="perplexity (log scale)")
        if title:
            ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3, which="both")
        return ax

    def figure(self, sparsities: list[float], prompt: str = "", title: str = "", wrap: int = 80):
        """The widget's static fallback: the plot, and below it the greedy text at a few `sparsities` as a table."""
        import textwrap

        import matplotlib.pyplot as plt

        table = self.text_table(sparsities)
        cells = [[row.setting, f"{row.perplexity:.1f}" if row.perplexity < 1e5 else f"{row.perplexity:.2e}",
                  "\n".join(textwrap.wrap(repr(row.text), wrap))] for row in table.itertuples()]
        num_lines = sum(cell[2].count("\n") + 1 for cell in cells)
        fig = plt.figure(figsize=(11, 4.5 + 0.26 * (num_lines + 2)))
        plot_ax, table_ax = fig.subplots(2, 1, height_ratios=[4.5, 0.26 * (num_lines + 2)])
        self.draw(plot_ax, title=title)
        table_ax.set_axis_off()
        labels = ["setting", "perplexity", f"greedy continuation of {prompt!r}"]
        drawn = table_ax.table(cellText=cells, colLabels=labels, colWidths=[0.14, 0.1, 0.76], cellLoc="left",
                               loc="upper center")
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(8)
        for (r, c), cell in drawn.get_celld().items():
            lines = cells[r - 1][2].count("\n") + 1 if r else 1
            cell.set_height(lines / (num_lines + 2))
            cell.PAD = 0.01 if c == 2 else 0.05  # of the cell's width: the default 0.1 indents the wide column an inch
        fig.tight_layout()
        return fig

    def describe(self, point: SweepPoint, prompt: str = "") -> str:
        """The widget's caption for `point` as HTML: setting, perplexity against dense, and the text."""
        ratio = point.perplexity / self.dense.perplexity
        return (f"<b>{html.escape(point.setting.label)}</b>: perplexity {point.perplexity:.1f} ({ratio:.1f}x dense), "
                f"achieved sparsity {point.achieved:.1%}<br><i>{html.escape(prompt)}</i>"
                f"<b>{html.escape(point.text)}</b>")

    def widget(self, prompt: str = "", title: str = ""):
        """A method toggle and a sparsity slider over the cached points; nothing is recomputed (needs ipywidgets).

        Each point's plot is drawn once, on its first visit, into a PNG that an Image widget shows: no pyplot state,
        and no Output widget (which nbclient cannot store when it runs the notebook without widget state).
        """
        import io

        import ipywidgets as widgets
        from matplotlib.figure import Figure

        method = widgets.ToggleButtons(options=self.methods, description="method")
        options = sorted({s for m in self.methods for s in self.sparsities(m)})
        slider = widgets.SelectionSlider(options=[(f"{s:.0%}", s) for s in options], value=options[0],
                                         description="sparsity", continuous_update=True)
        caption, image = widgets.HTML(), widgets.Image(format="png")
        pngs: dict[int, bytes] = {}  # id(point) -> its plot

        def show(change=None):
            point = self.nearest(method.value, slider.value)
            if id(point) not in pngs:
                fig = Figure(figsize=(7.5, 3.6))
                self.draw(fig.subplots(), highlight=point, title=title)
                fig.tight_layout()
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=90)
                pngs[id(point)] = buffer.getvalue()
            caption.value = self.describe(point, prompt)
            image.value = pngs[id(point)]

        method.observe(show, names="value")
        slider.observe(show, names="value")
        show()
        return widgets.VBox([method, slider, caption, image])
