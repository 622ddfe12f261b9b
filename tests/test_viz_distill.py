"""minillm.viz.distill: the temperature sweep's numbers, the cut calculator against the real pruned shapes, and that
the figures and the widget build (no display, no timings)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minillm.bench.roofline import decode_roofline  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.distill import DistillHistory, kd_loss, student_config  # noqa: E402
from minillm.viz.distill import (  # noqa: E402
    TrainingCurves,
    cut_explorer,
    cut_row,
    cut_table,
    plot_block_influence,
    plot_soft_targets,
    plot_temperature_sweep,
    temperature_sweep,
    token_label,
)

SMOLLM = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, tie_word_embeddings=True)


class CharTokenizer:
    def decode(self, ids):
        return "".join(" abcdefghij\n"[i % 12] for i in ids)


def test_temperature_sweep_matches_kd_loss_and_shows_the_t_squared_effect():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 33, generator=g), 3 * torch.randn(7, 33, generator=g)
    temperatures = [0.5, 1, 4, 16, 64, 256]
    sweep = temperature_sweep(student, teacher, temperatures).set_index("T")
    for t in temperatures:
        assert sweep.loc[t, "T² KL"] == pytest.approx(kd_loss(student, teacher, t).item(), rel=1e-6)
        assert sweep.loc[t, "KL"] == pytest.approx(sweep.loc[t, "T² KL"] / t**2, rel=1e-6)
        assert sweep.loc[t, "|grad KL|"] == pytest.approx(sweep.loc[t, "|grad T² KL|"] / t**2, rel=1e-6)
    # The plain KL's gradient fades like 1/T², the scaled one settles.
    assert sweep.loc[256, "|grad KL|"] / sweep.loc[64, "|grad KL|"] == pytest.approx(1 / 16, rel=0.05)
    assert sweep.loc[256, "|grad T² KL|"] / sweep.loc[64, "|grad T² KL|"] == pytest.approx(1, rel=0.05)
    plt.close(plot_temperature_sweep(sweep.reset_index()))


def test_cut_row_matches_student_config_and_the_roofline():
    row = cut_row(SMOLLM, 10, 1 / 3, 0.5, torch.float16, context_len=100, teacher_tokens_per_s=50.0)
    student = student_config(SMOLLM, 10, 1 / 3, 0.5)
    assert (row["layers"], row["query heads"], row["MLP channels"]) == (20, 6, 768)
    assert row["parameters (M)"] * 1e6 == pytest.approx(student.num_parameters)
    ratio = (decode_roofline(SMOLLM, torch.float16, 1.0, 100)["bytes_per_token"]
             / decode_roofline(student, torch.float16, 1.0, 100)["bytes_per_token"])
    assert row["predicted decode speedup"] == pytest.approx(ratio)
    assert row["predicted tokens/s"] == pytest.approx(50.0 * ratio)
    # No cut, no change; deeper cuts, faster predictions.
    assert cut_row(SMOLLM, 0, 0, 0, torch.float16, 100)["predicted decode speedup"] == pytest.approx(1.0)
    table = cut_table(SMOLLM, [(0, 0, 0), (5, 0, 0), (15, 0, 0), (15, 1 / 3, 0.5)], torch.float16)
    assert table["predicted decode speedup"].is_monotonic_increasing
    assert table["parameters (M)"].is_monotonic_decreasing


def test_figures_and_widget_build():
    logits = torch.randn(12)
    plt.close(plot_soft_targets(logits, CharTokenizer(), [0.5, 1, 4], top_k=5))
    plt.close(plot_block_influence(torch.rand(6) + 0.01, [2, 3]))
    assert token_label(CharTokenizer(), 0) == "␣" and token_label(CharTokenizer(), 11) == "\\n"
    curves = TrainingCurves(teacher_ppl=10.0, pruned_ppl=40.0)
    for name, slope in [("kd", 2.0), ("ce", 1.0)]:
        h = DistillHistory(steps=[1, 2], losses=[3.0, 3.0 - slope], eval_steps=[0, 2], perplexities=[40.0, 40 - slope])
        curves.histories[name] = h
    plt.close(curves.figure())
    widgets = pytest.importorskip("ipywidgets")
    box = cut_explorer(SMOLLM, torch.float16, teacher_tokens_per_s=50.0)
    assert isinstance(box, widgets.VBox)
    drop, heads, mlp, out = box.children
    before = out.value
    drop.value = 20
    assert out.value != before and "10 layers" in out.value
