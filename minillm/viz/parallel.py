"""Tensor and pipeline parallelism, drawn: which slice of every matrix a rank holds, where ranks talk, what it costs.

In doing so, you will see:
  * one layer's seven matrices with each rank's slice colored (``plot_weight_split``): column-parallel q/k/v and
    gate/up split their output features (rows of the (out, in) weight), row-parallel o/down their input features
    (columns), Megatron-LM's pairing (arXiv 1909.08053 section 3) that needs no communication between the two;
  * the heads each rank computes at several world sizes (``plot_head_assignment``), KV heads copied onto several
    ranks hatched: grouped-query attention with more ranks than KV heads (``minillm.parallel.heads``);
  * where the collectives fall in a step (``plot_layer_collectives``): an all-reduce after the embedding, after
    ``o_proj`` and after ``down_proj`` in every layer, and one all-gather of the logits;
  * what a rank moves against what it reads (``plot_comm_vs_compute``): bytes all-reduced per token are tiny next to
    the weights a decode step streams, yet the time in collectives is not, because each one is a synchronization;
  * a pipeline's timeline (``plot_pipeline``): the bubble of ``minillm.parallel.pipeline``.

Every split comes from ``minillm.parallel`` itself (``plan_shards``, ``assign_heads``), for the real model's config.
Used by notebooks/11_tensor_parallelism.ipynb. Matplotlib only; each function returns its figure.
"""

from __future__ import annotations

from minillm.config import ModelConfig
from minillm.parallel.heads import assign_heads
from minillm.parallel.pipeline import Schedule, bubble_fraction
from minillm.parallel.shard import plan_shards

RANK_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
COMM_COLORS = {"all-reduce": "#cf222e", "all-gather": "#8250df"}


def rank_color(rank: int) -> str:
    return RANK_COLORS[rank % len(RANK_COLORS)]


def layer_slices(config: ModelConfig, world_size: int) -> dict[str, dict]:
    """One layer's matrices and every rank's slice of each, from ``plan_shards``.

    name -> {"shape": (out, in) of the dense weight, "how": "column" or "row", "slices": [(rank, start, end)]}, the
    slice's [start, end) along rows (column-parallel: output features) or columns (row-parallel: input features).
    KV slices of ranks that share a replicated KV head are equal.
    """
    C, D, I = config.hidden_size, config.head_dim, config.intermediate_size
    H, Hkv = config.num_heads, config.num_kv_heads
    plan = plan_shards(config, world_size)
    q = [(s.rank, s.heads.q_heads[0] * D, (s.heads.q_heads[-1] + 1) * D) for s in plan]
    kv = [(s.rank, s.heads.kv_heads[0] * D, (s.heads.kv_heads[-1] + 1) * D) for s in plan]
    mlp = [(s.rank, s.mlp_start, s.mlp_end) for s in plan]
    return {
        "q_proj": {"shape": (H * D, C), "how": "column", "slices": q},
        "k_proj": {"shape": (Hkv * D, C), "how": "column", "slices": kv},
        "v_proj": {"shape": (Hkv * D, C), "how": "column", "slices": kv},
        "o_proj": {"shape": (C, H * D), "how": "row", "slices": q},
        "gate_proj": {"shape": (I, C), "how": "column", "slices": mlp},
        "up_proj": {"shape": (I, C), "how": "column", "slices": mlp},
        "down_proj": {"shape": (C, I), "how": "row", "slices": mlp},
    }


def plot_weight_split(config: ModelConfig, world_size: int):
    """One layer's q/k/v/o and gate/up/down weights drawn to scale, (out, in) each, every rank's slice in its color.

    One rectangle per rank per matrix. Ranks holding a copy of the same KV head share its band, side by side and
    hatched: those rows are stored (and read) more than once.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    matrices = layer_slices(config, world_size)
    widths = [m["shape"][1] for m in matrices.values()]
    fig, axes = plt.subplots(1, len(matrices), figsize=(14, 4.2), gridspec_kw={"width_ratios": widths})
    tallest = max(m["shape"][0] for m in matrices.values())
    for ax, (name, m) in zip(axes, matrices.items()):
        out, inp = m["shape"]
        sharing: dict[tuple[int, int], list[int]] = {}  # the same [start, end) held by several ranks: replicated
        for rank, a, b in m["slices"]:
            sharing.setdefault((a, b), []).append(rank)
        for rank, a, b in m["slices"]:
            group = sharing[(a, b)]
            copies, i = len(group), group.index(rank)
            if m["how"] == "column":  # rows [a, b) of W: a band across the full input width
                x, y, w, h = i * inp / copies, a, inp / copies, b - a
            else:  # columns [a, b) of W: a band down the full output height
                x, y, w, h = a, i * out / copies, b - a, out / copies
            ax.add_patch(Rectangle((x, y), w, h, facecolor=rank_color(rank), edgecolor="white", linewidth=1.0,
                                   alpha=0.85, hatch="//" if copies > 1 else None))
        ax.set_xlim(0, inp)
        ax.set_ylim(tallest, 0)  # row 0 on top, every matrix on one vertical scale
        ax.set_aspect("equal")
        ax.set_title(f"{name}\n({out}, {inp})\n{m['how']}-parallel", fontsize=9)
        ax.set_xlabel("in", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("out (rows of W)", fontsize=8)
    handles = [Patch(color=rank_color(r), label=f"rank {r}") for r in range(world_size)]
    if world_size > config.num_kv_heads:  # assign_heads copies KV heads exactly then
        handles.append(Patch(facecolor="white", edgecolor="gray", hatch="//", label="replicated KV head"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"one layer of {config.name} over {world_size} rank{'s' * (world_size > 1)}: column-parallel "
                 "slices split the output features, row-parallel ones the input features (then all-reduce)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return fig


def plot_head_assignment(config: ModelConfig, world_sizes=(1, 2, 3, 4)):
    """A grid per world size: query heads (top row) and KV heads (bottom row) colored by rank; a KV head held by
    several ranks is split between their colors and hatched. One patch per query head, one per (rank, KV head)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    H, Hkv = config.num_heads, config.num_kv_heads
    group = H // Hkv
    fig, axes = plt.subplots(len(world_sizes), 1, figsize=(0.55 * H + 3, 1.25 * len(world_sizes) + 0.6),
                             squeeze=False)
    for ax, W in zip(axes[:, 0], world_sizes):
        shards = assign_heads(H, Hkv, W)
        for s in shards:
            for h in s.q_heads:
                ax.add_patch(Rectangle((h, 1), 0.94, 0.9, facecolor=rank_color(s.rank), edgecolor="white"))
                ax.text(h + 0.47, 1.45, f"q{h}", ha="center", va="center", fontsize=7, color="white")
        for kv in range(Hkv):  # a KV head spans its group's query heads; its holders share that width
            holders = [s.rank for s in shards if kv in s.kv_heads]
            width = group / len(holders)
            for i, rank in enumerate(holders):
                ax.add_patch(Rectangle((kv * group + i * width, 0), width - 0.06, 0.9, facecolor=rank_color(rank),
                                       edgecolor="white", hatch="//" if len(holders) > 1 else None))
            label = f"kv{kv}" + (f" x{len(holders)}" if len(holders) > 1 else "")
            ax.text(kv * group + group / 2, 0.45, label, ha="center", va="center", fontsize=7,
                    color="black" if len(holders) > 1 else "white",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1} if len(holders) > 1 else None)
        loads = [len(s.q_heads) for s in shards]
        copies = sum(len(s.kv_heads) for s in shards) - Hkv
        ax.set_xlim(0, H)
        ax.set_ylim(0, 2)
        ax.set_yticks([0.45, 1.45], ["KV heads", "query heads"], fontsize=8)
        ax.set_xticks([])
        ax.set_title(f"world size {W}: query heads per rank {loads}"
                     + (f", {copies} KV head cop{'ies' if copies > 1 else 'y'} replicated" if copies else ""),
                     fontsize=9, loc="left")
    fig.suptitle(f"{config.name}: {H} query heads, {Hkv} KV heads (groups of {group})", fontsize=10)
    fig.tight_layout()
    return fig


# The step of a tensor-parallel model, top to bottom: (label, kind), kind "op" (local compute) or a collective.
LAYER_FLOW = [
    ("token ids (every rank)", "op"),
    ("embedding: this rank's vocabulary rows, zeros elsewhere", "op"),
    ("all-reduce (C per token): fill in the other ranks' rows", "all-reduce"),
    ("RMSNorm (replicated)", "op"),
    ("q/k/v_proj, column-parallel: this rank's heads", "op"),
    ("attention over this rank's heads and KV cache", "op"),
    ("o_proj, row-parallel: a partial sum", "op"),
    ("all-reduce (C per token), + residual", "all-reduce"),
    ("RMSNorm (replicated)", "op"),
    ("gate/up_proj, column-parallel: this rank's hidden slice", "op"),
    ("SiLU(gate) * up, local", "op"),
    ("down_proj, row-parallel: a partial sum", "op"),
    ("all-reduce (C per token), + residual", "all-reduce"),
    ("final RMSNorm (replicated)", "op"),
    ("LM head: logits of this rank's vocabulary slice", "op"),
    ("all-gather (V / W per sampled row): full logits, sample on rank 0", "all-gather"),
]
LAYER_ROWS = range(3, 13)  # the rows of LAYER_FLOW that repeat once per layer: RMSNorm .. the second all-reduce


def plot_layer_collectives(config: ModelConfig | None = None):
    """A decode step of a Megatron-style tensor-parallel model as a flow chart, the collectives in red/purple.

    The rows from the first RMSNorm to the second all-reduce repeat once per layer (bracketed). With `config`, the
    title counts the collectives of one step: 2L + 1 all-reduces and one all-gather.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    fig, ax = plt.subplots(figsize=(8, 8))
    n = len(LAYER_FLOW)
    for i, (label, kind) in enumerate(LAYER_FLOW):
        y = i
        collective = kind in COMM_COLORS
        face = COMM_COLORS[kind] if collective else "#eef1f5"
        ax.add_patch(FancyBboxPatch((0.1, y - 0.34), 0.8, 0.68, boxstyle="round,pad=0.02", facecolor=face,
                                    edgecolor="none" if collective else "#8c959f"))
        ax.text(0.5, y, label, ha="center", va="center", fontsize=8.5, color="white" if collective else "black",
                fontweight="bold" if collective else "normal")
        if i < n - 1:
            ax.annotate("", xy=(0.5, y + 0.66), xytext=(0.5, y + 0.34), arrowprops={"arrowstyle": "->", "lw": 0.8})
    first, last = LAYER_ROWS[0], LAYER_ROWS[-1]
    ax.plot([0.04, 0.02, 0.02, 0.04], [first - 0.4, first - 0.4, last + 0.4, last + 0.4], color="black", lw=1)
    layers = f"x {config.num_layers} layers" if config is not None else "x L layers"
    ax.text(0.0, (first + last) / 2, layers, rotation=90, ha="right", va="center", fontsize=9)
    ax.set_xlim(-0.08, 1.0)
    ax.set_ylim(n - 0.5, -0.5)  # the step reads top to bottom
    ax.axis("off")
    if config is None:
        ax.set_title("one tensor-parallel step: 2L + 1 all-reduces and 1 all-gather", fontsize=10)
    else:
        ax.set_title(f"one tensor-parallel step of {config.name}:\n2 x {config.num_layers} + 1 = "
                     f"{2 * config.num_layers + 1} all-reduces and 1 all-gather", fontsize=10)
    return fig


def plot_comm_vs_compute(rows: list[dict]):
    """Left: bytes a rank moves per token against the weight bytes it reads per token (batch 1, log scale); right:
    seconds per decode step in collectives and in the rest, per world size, as measured on rank 0.

    A row: ``world_size``, ``comm_bytes_per_token`` (all-reduce plus all-gather bytes per token per rank),
    ``weight_bytes_per_rank`` (the largest rank's), ``step_s`` and ``collective_s_per_step``
    (what ``python -m minillm.bench tp`` records). One bar per row in each group.
    """
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["world_size"])
    W = [r["world_size"] for r in rows]
    x = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    comm = [r["comm_bytes_per_token"] for r in rows]
    weights = [r["weight_bytes_per_rank"] for r in rows]
    left.bar([i - 0.2 for i in x], comm, 0.4, color=COMM_COLORS["all-reduce"], label="communicated (collectives)")
    b = left.bar([i + 0.2 for i in x], weights, 0.4, color="tab:blue", label="weights read")
    for i, v in zip(x, comm):
        left.text(i - 0.2, 1.1e3 if not v else v * 1.1, f"{v / 1e3:.0f} kB" if v else "0", ha="center", fontsize=7)
    left.bar_label(b, [f"{v / 1e6:.0f} MB" for v in weights], fontsize=7)
    left.set_yscale("log")
    left.set_ylim(1e3, 100 * max(weights))  # one rank communicates nothing (its bar is labelled "0"); room on top
    left.set_xticks(x, [f"W={w}" for w in W])
    left.set_ylabel("bytes per token per rank (batch 1)")
    left.set_title("what a rank moves vs what it reads", fontsize=10)
    left.legend(fontsize=8, loc="upper center", ncol=2)
    coll = [r["collective_s_per_step"] * 1e3 for r in rows]
    rest = [(r["step_s"] - r["collective_s_per_step"]) * 1e3 for r in rows]
    right.bar(x, rest, 0.6, color="tab:blue", label="compute and the rest")
    top = right.bar(x, coll, 0.6, bottom=rest, color=COMM_COLORS["all-reduce"], label="in collectives (rank 0)")
    right.bar_label(top, [f"{c / (c + r):.0%}" if c + r else "" for c, r in zip(coll, rest)], fontsize=7)
    right.set_xticks(x, [f"W={w}" for w in W])
    right.set_ylabel("ms per decode step")
    right.set_title("where a decode step's time goes", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_pipeline(schedule: Schedule, title: str = ""):
    """The pipeline's timeline: one row per stage, one box per slot, microbatches colored, idle slots (the bubble)
    hatched gray. One patch per (stage, slot)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    P, slots = len(schedule), len(schedule[0])
    M = 1 + max(m for row in schedule for m in row if m is not None)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * slots + 2), 0.6 * P + 1.4))
    for s, row in enumerate(schedule):
        for t, m in enumerate(row):
            if m is None:
                ax.add_patch(Rectangle((t, s - 0.4), 1, 0.8, facecolor="white", edgecolor="#8c959f", hatch="///"))
            else:
                ax.add_patch(Rectangle((t, s - 0.4), 1, 0.8, facecolor=rank_color(m), edgecolor="white"))
                ax.text(t + 0.5, s, str(m), ha="center", va="center", fontsize=8, color="white")
    ax.set_xlim(0, slots)
    ax.set_ylim(P - 0.5, -0.5)
    ax.set_yticks(range(P), [f"stage {s}" for s in range(P)])
    ax.set_xlabel("time slot (one stage's forward of one microbatch)")
    ax.set_title(title or f"GPipe forward, {P} stages x {M} microbatches: bubble (hatched) = (P - 1) / (M + P - 1) "
                          f"= {bubble_fraction(P, M):.0%}", fontsize=10)
    fig.tight_layout()
    return fig
