"""minillm.viz.parallel: the slices drawn are plan_shards' slices, the figures carry the expected axes, labels and
patch counts, for SmolLM2-135M's shape (9 query heads, 3 KV heads: uneven splits and replication) and the tiny
config. Configs only, no weights; Agg backend, no display."""

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.parallel.heads import assign_heads  # noqa: E402
from minillm.parallel.pipeline import bubble_fraction, gpipe_schedule  # noqa: E402
from minillm.viz.parallel import (  # noqa: E402
    LAYER_FLOW,
    layer_slices,
    plot_comm_vs_compute,
    plot_head_assignment,
    plot_layer_collectives,
    plot_pipeline,
    plot_weight_split,
)

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, tie_word_embeddings=True, name="SmolLM2-135M")
CONFIGS = [SMOLLM2, ModelConfig.tiny()]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def rectangles(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_layer_slices_cover_every_matrix(config, W):
    for name, m in layer_slices(config, W).items():
        out, inp = m["shape"]
        length = out if m["how"] == "column" else inp
        spans = sorted({(a, b) for _, a, b in m["slices"]})  # replicated KV slices count once
        assert spans[0][0] == 0 and spans[-1][1] == length, name
        assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(spans)), f"{name}: gaps or overlaps {spans}"
        assert [r for r, _, _ in m["slices"]] == list(range(W))


def test_layer_slices_follow_the_heads():
    q = layer_slices(SMOLLM2, 2)["q_proj"]["slices"]
    assert q == [(0, 0, 6 * 64), (1, 6 * 64, 9 * 64)]  # two groups on rank 0, one on rank 1
    kv = layer_slices(SMOLLM2, 4)["k_proj"]["slices"]
    assert kv[0][1:] == kv[1][1:] == (0, 64)  # KV head 0 copied onto ranks 0 and 1


@pytest.mark.parametrize("W", [1, 2, 4])
def test_weight_split_draws_one_slice_per_rank_per_matrix(W):
    fig = plot_weight_split(SMOLLM2, W)
    assert len(fig.axes) == 7
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split("\n")[0] for t in titles] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]
    assert "(576, 576)" in titles[0] and "(192, 576)" in titles[1] and "(576, 1536)" in titles[6]
    assert [t.split("\n")[2] for t in titles] == ["column-parallel"] * 3 + ["row-parallel"] + \
        ["column-parallel"] * 2 + ["row-parallel"]
    for ax in fig.axes:
        assert len(rectangles(ax)) == W
    hatched = [p for p in rectangles(fig.axes[1]) if p.get_hatch()]
    assert len(hatched) == (2 if W == 4 else 0)  # world size 4 > 3 KV heads: head 0 on two ranks
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:W] == [f"rank {r}" for r in range(W)]
    assert ("replicated KV head" in legend) == (W == 4)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_head_assignment_grid(config):
    world_sizes = (1, 2, 3, 4)
    fig = plot_head_assignment(config, world_sizes)
    assert len(fig.axes) == len(world_sizes)
    for ax, W in zip(fig.axes, world_sizes):
        shards = assign_heads(config.num_heads, config.num_kv_heads, W)
        kv_cells = sum(len(s.kv_heads) for s in shards)  # one per (rank, KV head): copies included
        assert len(rectangles(ax)) == config.num_heads + kv_cells
        hatched = [p for p in rectangles(ax) if p.get_hatch()]
        copied = [kv for kv in range(config.num_kv_heads) if sum(kv in s.kv_heads for s in shards) > 1]
        assert len(hatched) == (kv_cells - config.num_kv_heads + len(copied))
        assert ax.get_title(loc="left").startswith(f"world size {W}: query heads per rank "
                                                   f"{[len(s.q_heads) for s in shards]}")
        assert [t.get_text() for t in ax.get_yticklabels()] == ["KV heads", "query heads"]


def test_head_assignment_marks_replication_in_labels():
    fig = plot_head_assignment(SMOLLM2, (4,))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "kv0 x2" in texts and "kv1" in texts and "replicated" in fig.axes[0].get_title(loc="left")


def test_layer_collectives_diagram():
    fig = plot_layer_collectives(SMOLLM2)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.texts if t.get_text()]  # the arrows are empty annotations
    assert sum(label.startswith("all-reduce") for label in labels) == 3  # embedding, after o_proj, after down_proj
    assert sum(label.startswith("all-gather") for label in labels) == 1  # the logits
    assert labels.index(next(x for x in labels if x.startswith("o_proj"))) + 1 == labels.index(
        "all-reduce (C per token), + residual")
    assert labels[labels.index(next(x for x in labels if x.startswith("down_proj"))) + 1].startswith("all-reduce")
    assert len([p for p in ax.patches if isinstance(p, FancyBboxPatch)]) == len(LAYER_FLOW)
    assert "x 30 layers" in labels and "61 all-reduces" in ax.get_title()
    assert "2L + 1" in plot_layer_collectives().axes[0].get_title()


ROWS = [
    {"world_size": 2, "comm_bytes_per_token": 240_000, "weight_bytes_per_rank": 3.0e8, "step_s": 0.2,
     "collective_s_per_step": 0.08},
    {"world_size": 1, "comm_bytes_per_token": 0, "weight_bytes_per_rank": 5.4e8, "step_s": 0.1,
     "collective_s_per_step": 0.0},
    {"world_size": 3, "comm_bytes_per_token": 205_000, "weight_bytes_per_rank": 2.0e8, "step_s": 0.25,
     "collective_s_per_step": 0.12},
]


def test_comm_vs_compute_panels():
    fig = plot_comm_vs_compute(ROWS)
    left, right = fig.axes
    assert [t.get_text() for t in left.get_xticklabels()] == ["W=1", "W=2", "W=3"]  # sorted by world size
    assert len(rectangles(left)) == 2 * len(ROWS) and left.get_yscale() == "log"
    assert len(rectangles(right)) == 2 * len(ROWS)  # compute and collectives, stacked
    heights = [p.get_height() for p in rectangles(right)]
    assert heights[:3] == pytest.approx([100, 120, 130]) and heights[3:] == pytest.approx([0, 80, 120])  # ms
    assert right.get_ylabel() == "ms per decode step" and "per token" in left.get_ylabel()


@pytest.mark.parametrize("P, M", [(1, 3), (4, 6), (3, 1)])
def test_pipeline_timeline(P, M):
    fig = plot_pipeline(gpipe_schedule(P, M))
    (ax,) = fig.axes
    cells = rectangles(ax)
    assert len(cells) == P * (M + P - 1)
    idle = [p for p in cells if p.get_hatch()]
    assert len(idle) / len(cells) == pytest.approx(bubble_fraction(P, M))
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"stage {s}" for s in range(P)]
    assert f"{bubble_fraction(P, M):.0%}" in ax.get_title()
