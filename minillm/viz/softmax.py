"""Pictures of the online softmax: the running max, sum and output of a few query rows, one key tile at a time.

In doing so, you will see:
  * the softmax of a row computed in one pass over tiles of keys (Milakov & Gimelshein, arXiv:1805.02867, section 3)
    with three running quantities per row: the max m_i, the sum l_i of exp(s - m_i), and the accumulator acc of
    exp(s - m_i) v, as FlashAttention keeps them (Dao et al., arXiv:2205.14135, section 3.1; FlashAttention-2,
    arXiv:2307.08691, section 3.1);
  * the rescale factor alpha = exp(m_old - m_new): 1 while the max stays, below 1 when a tile brings a larger score,
    so everything summed so far is re-expressed relative to the new max (0 at the first tile, which replaces -inf);
  * that after each tile the running estimate, exp(s - m_i) / l_i for the weights and acc / l_i for the output, is
    the exact softmax of the keys seen so far, and after the last tile the exact softmax of them all.
Every state is computed by ``minillm.attention.online.online_softmax_step``, the update the tiled attention loop
(``online_attention``) and the Triton kernel (in base 2) perform; nothing here re-implements it. Used by
notebooks/02_attention.ipynb. Matplotlib only; ``OnlineSoftmaxStepper.widget`` also needs ipywidgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.attention.online import online_softmax_step

SEEN, CURRENT, UNSEEN = "tab:blue", "tab:orange", "0.85"  # key colors: folded in earlier, this tile, not yet


@dataclass
class SoftmaxState:
    """The running state of every row after `step` tiles (step 0: nothing seen, m_i = -inf, l_i = 0, acc = 0).

    Keys [0, num_keys) have been folded in. alpha is the factor this step multiplied the old l_i and acc by.
    """

    step: int
    num_keys: int
    m_i: torch.Tensor  # (T,)
    l_i: torch.Tensor  # (T,)
    acc: torch.Tensor  # (T, D)
    alpha: torch.Tensor  # (T,)


def _safe_divide(x: torch.Tensor, l_i: torch.Tensor) -> torch.Tensor:
    # A row that has seen only masked keys has l_i = 0 and acc = 0: report zeros, as the kernel does.
    return x / torch.where(l_i == 0, torch.ones_like(l_i), l_i)[:, None]


def _legend(fig, axes) -> None:
    """One legend for the three panels, below them."""
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=len(handles), fontsize=8)


class OnlineSoftmaxStepper:
    """Folds the scores ``s`` (T, S) and values ``v`` (S, D) in, ``block_n`` keys at a time, and keeps every state.

    T query rows (a Q tile), S keys, D head dim; ``s`` holds scaled scores, -inf where masked. ``states[k]`` is the
    state after k tiles, k = 0 .. num_tiles; ``weights(k)`` and ``output(k)`` are its running estimates, to compare
    with ``exact_weights`` = softmax(s) and ``exact_output`` = softmax(s) @ v.
    """

    def __init__(self, s: torch.Tensor, v: torch.Tensor, block_n: int):
        if s.dim() != 2 or v.dim() != 2 or s.shape[1] != v.shape[0] or s.shape[1] == 0:
            raise ValueError(f"need s (T, S) and v (S, D) with S >= 1, got s {tuple(s.shape)} and v {tuple(v.shape)}")
        if not isinstance(block_n, int) or block_n < 1:
            raise ValueError(f"block_n must be a positive int, got {block_n!r}")
        self.s, self.v, self.block_n = s.float(), v.float(), block_n
        T, S = self.s.shape
        self.exact_weights = torch.nan_to_num(torch.softmax(self.s, dim=-1), nan=0.0)  # (T, S); all-masked rows -> 0
        self.exact_output = self.exact_weights @ self.v  # (T, D)
        m_i, l_i = torch.full((T,), float("-inf")), torch.zeros(T)
        acc = torch.zeros(T, self.v.shape[1])
        self.states = [SoftmaxState(0, 0, m_i, l_i, acc, torch.ones(T))]
        for n0 in range(0, S, block_n):
            s_tile, v_tile = self.s[:, n0 : n0 + block_n], self.v[n0 : n0 + block_n]  # (T, BN), (BN, D)
            m_new, l_i, acc = online_softmax_step(m_i, l_i, acc, s_tile, v_tile)
            # The same alpha online_softmax_step applied inside (shown, not used): exp(m_old - m_new), -inf -> 0.
            alpha = torch.exp(m_i - torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new))
            m_i = m_new
            self.states.append(SoftmaxState(len(self.states), min(n0 + block_n, S), m_i, l_i, acc, alpha))

    @classmethod
    def random(cls, num_rows: int = 1, num_keys: int = 19, head_dim: int = 4, block_n: int = 4, seed: int = 0):
        """Scores q kᵀ / sqrt(D) and values of seeded random q (T, D), k, v (S, D): the same on every machine."""
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(num_rows, head_dim, generator=g) * 2  # a wider spread of scores than randn alone
        k, v = torch.randn(2, num_keys, head_dim, generator=g)
        return cls(q @ k.T / head_dim**0.5, v, block_n)

    @property
    def num_tiles(self) -> int:
        return len(self.states) - 1

    def tile_keys(self, step: int) -> tuple[int, int]:
        """Keys [start, end) of the tile that step `step` (>= 1) folds in."""
        if not 1 <= step <= self.num_tiles:
            raise ValueError(f"step must be in [1, {self.num_tiles}], got {step}")
        return (step - 1) * self.block_n, self.states[step].num_keys

    def weights(self, step: int) -> torch.Tensor:
        """(T, S) running softmax weights exp(s - m_i) / l_i over the keys seen after `step` tiles, 0 elsewhere."""
        st = self.states[step]
        m_safe = torch.where(st.m_i == float("-inf"), torch.zeros_like(st.m_i), st.m_i)
        p = torch.exp(self.s - m_safe[:, None])  # (T, S)
        p[:, st.num_keys :] = 0.0
        return _safe_divide(p, st.l_i)

    def output(self, step: int) -> torch.Tensor:
        """(T, D) running output acc / l_i after `step` tiles."""
        st = self.states[step]
        return _safe_divide(st.acc, st.l_i)

    def max_error(self, step: int, row: int | None = None) -> float:
        """Largest |running output - exact output| after `step` tiles, over `row` or all rows (0 up to rounding at
        the last step)."""
        diff = (self.output(step) - self.exact_output).abs()
        return float(diff.max() if row is None else diff[row].max())

    def describe(self, step: int, row: int = 0) -> str:
        """One line of arithmetic for `row` at `step`: the tile, m_i before and after, alpha, and the new l_i."""
        if step == 0:
            return "start: m_i = -inf, l_i = 0, acc = 0 (no key seen)"
        old, new = self.states[step - 1], self.states[step]
        start, end = self.tile_keys(step)
        alpha = float(new.alpha[row])
        tile_sum = float(new.l_i[row]) - alpha * float(old.l_i[row])
        return (f"tile {step}: keys {start}-{end - 1} | m_i {float(old.m_i[row]):.2f} -> {float(new.m_i[row]):.2f} | "
                f"alpha = {alpha:.3f} | l_i = {alpha:.3f} x {float(old.l_i[row]):.2f} + {tile_sum:.2f} "
                f"= {float(new.l_i[row]):.2f}")

    # ---- drawing ---------------------------------------------------------------------------------------------------
    def draw(self, step: int, row: int = 0, axes=None, titles: bool = True):
        """Three panels for `row` after `step` tiles: scores with the running max, weights, output; returns axes."""
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(3, 1, figsize=(6, 7))
        ax_s, ax_w, ax_o = axes
        st, S = self.states[step], self.s.shape[1]
        start, end = self.tile_keys(step) if step else (0, 0)
        keys = range(S)
        colors = [CURRENT if start <= j < end else SEEN if j < st.num_keys else UNSEEN for j in keys]
        scores = self.s[row].clone()
        masked = scores == float("-inf")
        ax_s.bar(keys, scores.masked_fill(masked, 0.0).tolist(), color=colors)
        ax_s.plot([j for j in keys if masked[j]], [0.0] * int(masked.sum()), "kx")
        finite = self.s[row][~masked].tolist() or [0.0]
        low, high = min(0.0, *finite), max(1e-6, *finite)  # the same limits at every step
        ax_s.set_ylim(low - 0.05 * (high - low), high + 0.25 * (high - low))
        if st.m_i[row] > float("-inf"):
            ax_s.axhline(float(st.m_i[row]), color="tab:red", linestyle="--", linewidth=1, label="running max m_i")
        ax_s.set_ylabel("score s")

        exact = self.exact_weights[row]
        ax_w.bar(keys, self.weights(step)[row].tolist(), color=colors, label="exp(s - m_i) / l_i")
        ax_w.plot(keys, exact.tolist(), "k_", markersize=10, markeredgewidth=2, label="exact softmax (all keys)")
        top = max(float(self.weights(k)[row].max()) for k in range(self.num_tiles + 1))  # largest over all steps
        ax_w.set_ylim(0, 1.05 * max(top, float(exact.max()), 1e-6))
        ax_w.set_ylabel("weight")
        ax_w.set_xlabel("key j")

        dims = range(self.v.shape[1])
        ax_o.bar(dims, self.output(step)[row].tolist(), color=SEEN if step else UNSEEN, label="acc / l_i")
        ax_o.plot(dims, self.exact_output[row].tolist(), "k_", markersize=14, markeredgewidth=2,
                  label="softmax(s) @ v")
        ax_o.axhline(0.0, color="0.6", linewidth=0.8)
        ax_o.set_ylabel("output")
        ax_o.set_xlabel("dimension d")
        for ax in (ax_s, ax_w):
            for n0 in range(self.block_n, S, self.block_n):
                ax.axvline(n0 - 0.5, color="0.7", linestyle=":", linewidth=0.8)
        if titles:
            head = f"after tile {step} of {self.num_tiles}" if step else "before the first tile"
            ax_s.set_title(f"{head}\nm_i = {float(st.m_i[row]):.2f}, alpha = {float(st.alpha[row]):.3f}", fontsize=9)
            ax_w.set_title(f"l_i = {float(st.l_i[row]):.3f}", fontsize=9)
            ax_o.set_title(f"max |acc / l_i - exact| = {self.max_error(step, row):.1e}", fontsize=9)
        return axes

    def snapshots(self, row: int = 0, steps: list[int] | None = None):
        """The static fallback of the widget: one column of ``draw`` panels per step (default: every tile)."""
        import matplotlib.pyplot as plt

        steps = list(range(1, self.num_tiles + 1)) if steps is None else steps
        fig, axes = plt.subplots(3, len(steps), figsize=(3.1 * len(steps), 7.2), squeeze=False, sharey="row")
        for col, step in enumerate(steps):
            self.draw(step, row, axes=axes[:, col])
            if col:
                for ax in axes[:, col]:
                    ax.set_ylabel("")
        fig.suptitle(f"online softmax of query row {row}, {self.block_n} keys per tile: blue seen, orange this tile, "
                     "gray not yet; black marks: the exact softmax of all keys", fontsize=10)
        _legend(fig, axes[:, -1])
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        return fig

    def widget(self):
        """A Play button and a slider over the steps (and a row slider for several rows), redrawing the panels."""
        import ipywidgets as widgets
        import matplotlib.pyplot as plt
        from IPython.display import display

        play = widgets.Play(min=0, max=self.num_tiles, value=0, interval=1200, description="play")
        slider = widgets.IntSlider(min=0, max=self.num_tiles, value=0, description="tiles seen")
        widgets.jslink((play, "value"), (slider, "value"))
        row = widgets.IntSlider(min=0, max=self.s.shape[0] - 1, value=0, description="query row",
                                layout=widgets.Layout(display="flex" if self.s.shape[0] > 1 else "none"))
        out = widgets.Output()

        def show(change=None):
            with out:
                out.clear_output(wait=True)
                fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
                self.draw(slider.value, row.value, axes=axes)
                fig.suptitle(self.describe(slider.value, row.value), fontsize=9, family="monospace")
                _legend(fig, axes)
                fig.tight_layout(rect=(0, 0.07, 1, 1))
                display(fig)
                plt.close(fig)

        slider.observe(show, names="value")
        row.observe(show, names="value")
        show()
        return widgets.VBox([widgets.HBox([play, slider, row]), out])
