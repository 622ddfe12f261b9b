"""Distillation, drawn: soft targets, the temperature's effect on the loss, layer influence, live training curves,
and a widget that sizes a student before any training.

In doing so, you will see:
  * what the teacher gives that a label does not: its whole next-token distribution, which a temperature T > 1
    flattens so that the runners-up (Hinton et al., arXiv 1503.02531, section 2) become visible;
  * why the KD loss is multiplied by T²: without it the gradient fades like 1/T² as T grows
    (``temperature_sweep`` measures both on real logits);
  * which layers a depth cut removes (``plot_block_influence``, ShortGPT's score, arXiv 2403.03853);
  * training as it happens: ``TrainingCurves`` redraws loss and held-out perplexity from ``distill``'s callback;
  * the cost of a cut before making it: ``cut_table`` / ``cut_explorer`` turn a width/depth choice into a parameter
    count and a predicted decode speed. Decoding one token reads every weight once (``bench.roofline``), so at a
    small batch the speed follows the bytes: predicted tokens/s = the teacher's measured tokens/s x the ratio of
    bytes read per token.

Used by notebooks/08_distillation.ipynb. Matplotlib and pandas; ``cut_explorer`` also needs ipywidgets, and
``cut_table`` is its static twin.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.patches import Patch

from minillm.bench.roofline import decode_roofline
from minillm.config import ModelConfig
from minillm.distill.losses import kd_loss
from minillm.distill.students import student_config
from minillm.distill.train import DistillHistory

RUN_COLORS = ("C0", "C3", "C2", "C1")


def token_label(tokenizer, token_id: int) -> str:
    """A token as it reads in a plot: its text with visible spaces and newlines."""
    return repr(tokenizer.decode([token_id]))[1:-1].replace(" ", "␣") or "∅"


def plot_soft_targets(logits: torch.Tensor, tokenizer, temperatures: Sequence[float], top_k: int = 8,
                      title: str = ""):
    """Bars of softmax(logits / T) over the teacher's `top_k` tokens at each temperature, next to the one-hot label
    a next-token loss would use (the argmax here). logits: (V,) one position."""
    logits = logits.float().cpu()
    top = logits.topk(top_k).indices  # (k,) the same tokens in every panel
    labels = [token_label(tokenizer, int(i)) for i in top]
    panels = [("one-hot label", F.one_hot(top[:1], logits.numel())[0].float())]
    panels += [(f"T = {t:g}", F.softmax(logits / t, dim=-1)) for t in temperatures]
    # Each panel has its own scale: at T = 4 the top tokens hold little of the mass, but their shape is the point.
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.2))
    for ax, (name, probs) in zip(axes, panels):
        p = probs[top]
        ax.bar(range(top_k), p.tolist(), color="C7" if name == "one-hot label" else "C0")
        ax.set_xticks(range(top_k), labels, rotation=60, fontsize=8)
        rest = 1 - p.sum().item()
        ax.set_title(f"{name}\n(other {logits.numel() - top_k} tokens: {rest:.0%})", fontsize=9)
    axes[0].set_ylabel("probability")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def temperature_sweep(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperatures: Sequence[float]) -> pd.DataFrame:
    """The KD loss and the size of its gradient at each temperature, with and without the T² factor.

    logits: (N, V). Columns: T, KL (the softened KL), T² KL (``kd_loss``), and the norms of their gradients with
    respect to the student logits. The gradient of KL fades like 1/T² for large T; that of T² KL settles to a
    constant (matching logits, Hinton section 2.1).
    """
    rows = []
    for t in temperatures:
        z = student_logits.detach().float().clone().requires_grad_(True)
        loss = kd_loss(z, teacher_logits, t)  # T² KL
        (grad,) = torch.autograd.grad(loss, z)
        kl = loss.item() / t**2
        rows.append({"T": t, "KL": kl, "T² KL": loss.item(), "|grad KL|": grad.norm().item() / t**2,
                     "|grad T² KL|": grad.norm().item()})
    return pd.DataFrame(rows)


def plot_temperature_sweep(sweep: pd.DataFrame, title: str = ""):
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (plain, scaled), what in [(ax_loss, ("KL", "T² KL"), "loss"),
                                      (ax_grad, ("|grad KL|", "|grad T² KL|"), "gradient norm (student logits)")]:
        ax.loglog(sweep["T"], sweep[plain], "o-", color="C3", label=plain)
        ax.loglog(sweep["T"], sweep[scaled], "o-", color="C0", label=scaled)
        ax.set(xlabel="temperature T", ylabel=what)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_block_influence(influence: torch.Tensor, dropped: Sequence[int], title: str = ""):
    """Bars of each layer's block influence (1 - cos(input, output)), the dropped layers in red, log scale (layer 0
    changes its input ~30x more than a middle layer)."""
    colors = ["C3" if i in set(dropped) else "C0" for i in range(influence.numel())]
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.bar(range(influence.numel()), influence.tolist(), color=colors)
    ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="block influence  1 - cos(in, out)", title=title)
    ax.set_xticks(range(influence.numel()))
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(handles=[Patch(color="C3", label=f"dropped ({len(dropped)})"),
                       Patch(color="C0", label=f"kept ({influence.numel() - len(dropped)})")])
    fig.tight_layout()
    return fig


class TrainingCurves:
    """Loss and held-out perplexity of one or more ``distill`` runs, redrawn while they train.

    ``curves.update(name)`` returns a callback for ``distill(..., callback=...)``; each call redraws the figure in
    place (an IPython display handle), so a notebook shows the curves growing. ``figure()`` draws the same from
    the stored histories (the static version). Reference lines: the teacher's and the untrained student's
    perplexity.
    """

    def __init__(self, teacher_ppl: float, pruned_ppl: float, title: str = "", redraw_every: int = 1):
        self.teacher_ppl, self.pruned_ppl, self.title = teacher_ppl, pruned_ppl, title
        self.histories: dict[str, DistillHistory] = {}
        self.redraw_every = redraw_every
        self._handle = None

    def figure(self):
        fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 3.6))
        for color, (name, h) in zip(RUN_COLORS, self.histories.items()):
            ax_loss.plot(h.steps, h.losses, color=color, label=name)
            ax_ppl.plot(h.eval_steps, h.perplexities, "o-", color=color, label=name)
        ax_loss.set(xlabel="step", ylabel="training loss (each run its own)", yscale="log")
        ax_ppl.axhline(self.pruned_ppl, color="gray", linestyle=":", label="pruned, before training")
        ax_ppl.axhline(self.teacher_ppl, color="black", linestyle="--", label="teacher")
        ax_ppl.set(xlabel="step", ylabel="held-out perplexity", ylim=(0, self.pruned_ppl * 1.1))
        for ax in (ax_loss, ax_ppl):
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(self.title)
        fig.tight_layout()
        return fig

    def update(self, name: str):
        def callback(history: DistillHistory) -> None:
            self.histories[name] = history
            if history.steps[-1] % self.redraw_every and history.eval_steps[-1] != history.steps[-1]:
                return
            from IPython.display import display

            fig = self.figure()
            if self._handle is None:
                self._handle = display(fig, display_id=True)
            else:
                self._handle.update(fig)
            plt.close(fig)

        return callback


def cut_row(teacher: ModelConfig, num_drop: int, head_fraction: float, mlp_fraction: float, dtype: torch.dtype,
            context_len: int, teacher_tokens_per_s: float | None = None) -> dict:
    """One student shape: its parameters and the bytes one decode step reads, against the teacher's; with the
    teacher's measured decode speed, the student's predicted one (bandwidth-bound: speed ~ 1 / bytes)."""
    student = student_config(teacher, num_drop, head_fraction, mlp_fraction)
    roof = {name: decode_roofline(cfg, dtype, bandwidth=1.0, context_len=context_len)["bytes_per_token"]
            for name, cfg in [("teacher", teacher), ("student", student)]}
    row = {"layers": student.num_layers, "query heads": student.num_heads, "MLP channels": student.intermediate_size,
           "parameters (M)": student.num_parameters / 1e6,
           "of the teacher": student.num_parameters / teacher.num_parameters,
           "MB read per token": roof["student"] / 1e6,
           "predicted decode speedup": roof["teacher"] / roof["student"]}
    if teacher_tokens_per_s is not None:
        row["predicted tokens/s"] = teacher_tokens_per_s * row["predicted decode speedup"]
    return row


def cut_name(num_drop: int, head_fraction: float, mlp_fraction: float) -> str:
    parts = [f"{num_drop} layers" if num_drop else "", f"{head_fraction:.0%} of heads" if head_fraction else "",
             f"{mlp_fraction:.0%} of MLP" if mlp_fraction else ""]
    return "cut " + ", ".join(p for p in parts if p) if any(parts) else "no cut"


def cut_table(teacher: ModelConfig, cuts: Sequence[tuple[int, float, float]], dtype: torch.dtype,
              context_len: int = 256, teacher_tokens_per_s: float | None = None) -> pd.DataFrame:
    """``cut_row`` for each (num_drop, head_fraction, mlp_fraction): the widget's static twin."""
    rows = [{"cut": cut_name(d, h, m), **cut_row(teacher, d, h, m, dtype, context_len, teacher_tokens_per_s)}
            for d, h, m in cuts]
    return pd.DataFrame(rows).set_index("cut")


def cut_explorer(teacher: ModelConfig, dtype: torch.dtype, context_len: int = 256,
                 teacher_tokens_per_s: float | None = None):
    """Sliders for the depth and width cuts; shows the student's size and predicted decode speed as you move them."""
    import ipywidgets as widgets

    group = teacher.num_heads // teacher.num_kv_heads
    drop = widgets.IntSlider(value=10, min=0, max=teacher.num_layers - 1, description="layers cut")
    heads = widgets.SelectionSlider(options=[(f"{k}/{group}", k / group) for k in range(group)], value=0.0,
                                    description="heads cut")
    mlp = widgets.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.05, description="MLP cut", readout_format=".0%")
    out = widgets.HTML()

    def show(_=None) -> None:
        row = cut_row(teacher, drop.value, heads.value, mlp.value, dtype, context_len, teacher_tokens_per_s)
        speed = (f", about <b>{row['predicted tokens/s']:.0f} tokens/s</b> here"
                 if "predicted tokens/s" in row else "")
        out.value = (f"{row['layers']} layers, {row['query heads']} query heads, {row['MLP channels']} MLP channels: "
                     f"<b>{row['parameters (M)']:.1f} M parameters</b> ({row['of the teacher']:.0%} of the teacher), "
                     f"{row['MB read per token']:.0f} MB read per decoded token at {context_len} tokens of context, "
                     f"predicted decode speedup <b>{row['predicted decode speedup']:.2f}×</b>{speed}")

    for slider in (drop, heads, mlp):
        slider.observe(show, names="value")
    show()
    return widgets.VBox([drop, heads, mlp, out])
