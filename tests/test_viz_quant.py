"""minillm.viz.quant: the bytes formula matches the real layers, error falls with bits and group size, the Pareto front
is right, and the figures and widget build (no display). Properties on seeded random data, no timings."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minillm.quant.linear import Int4Linear, Int8Linear  # noqa: E402
from minillm.viz.quant import (  # noqa: E402
    QuantPoint,
    bits_per_weight,
    draw_explorer,
    draw_tradeoff,
    error_grid,
    measure,
    pareto_front,
)


def weight(N=48, K=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.02


def test_bits_per_weight_formula():
    assert bits_per_weight(4, 128) == 4 + 24 / 128  # the 4.19 bits of int4 g128
    assert bits_per_weight(4, 32) == 4.75
    assert bits_per_weight(8, 1536, symmetric=True) == 8 + 16 / 1536
    assert bits_per_weight(2, 64, symmetric=True) < bits_per_weight(2, 64, symmetric=False)
    with pytest.raises(ValueError, match="bits"):
        bits_per_weight(1, 32)
    with pytest.raises(ValueError, match="group_size"):
        bits_per_weight(4, 0)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_bits_per_weight_is_what_int4linear_stores(group_size):
    linear = torch.nn.Linear(256, 40, bias=False)
    q = Int4Linear.from_linear(linear, group_size=group_size, backend="reference")
    assert q.nbytes() * 8 == bits_per_weight(4, group_size) * linear.weight.numel()


def test_bits_per_weight_is_what_int8linear_stores():
    linear = torch.nn.Linear(320, 24, bias=False)
    q = Int8Linear.from_linear(linear, backend="reference")
    assert q.nbytes() * 8 == pytest.approx(bits_per_weight(8, 320, symmetric=True) * linear.weight.numel())


@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_falls_with_bits(group_size, symmetric):
    w = weight()
    sqnr = [measure(w, b, group_size, symmetric)[0].weight_sqnr_db for b in (2, 3, 4, 8)]
    assert sqnr == sorted(sqnr) and len(set(sqnr)) == 4
    per_bit = (sqnr[3] - sqnr[2]) / 4  # far from the coarse end, each bit halves the step: ~6 dB
    assert 5.0 < per_bit < 7.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_falls_with_smaller_groups_on_heavy_tails(bits):
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02  # occasional large weights, like real layers
    sqnr = [measure(w, bits, gs)[0].weight_sqnr_db for gs in (None, 128, 64, 32)]
    assert sqnr == sorted(sqnr)


def test_output_error_uses_the_activations():
    w, x = weight(), torch.randn(20, 256, generator=torch.Generator().manual_seed(2))
    low, _ = measure(w, 2, 64, x=x)
    high, w_hat = measure(w, 8, 64, x=x)
    assert low.output_sqnr_db < high.output_sqnr_db
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    assert measure(w, 4, 64)[0].output_sqnr_db is None
    with pytest.raises(ValueError, match="activations"):
        measure(w, 4, 64)[0].sqnr("output")


def test_grid_covers_every_combination_and_rejects_bad_groups():
    points = error_grid(weight(), (2, 4), (32, None), (False, True))
    assert len(points) == 8
    assert {p.label for p in points} >= {"int2 g32", "int4 channel", "int4 g32 sym"}
    with pytest.raises(ValueError, match="divisor"):
        measure(weight(K=200), 4, 64)


def test_pareto_front_keeps_only_undominated_points():
    def pt(bpw, db):
        return QuantPoint(4, 32, False, bpw, db, None)

    a, b, c, d = pt(2.5, 5.0), pt(3.0, 4.0), pt(4.2, 18.0), pt(4.75, 17.0)  # b and d are dominated
    assert pareto_front([a, b, c, d]) == [a, c]
    points = error_grid(weight())
    front = pareto_front(points)
    assert front and all(p in points for p in front)
    for p in points:  # every point is on the front or beaten by a point of it
        assert p in front or any(q.bits_per_weight <= p.bits_per_weight and q.weight_sqnr_db >= p.weight_sqnr_db
                                 for q in front)


def test_figures_build():
    w, x = weight(), torch.randn(16, 256)
    points = error_grid(w, x=x)
    ax = draw_tradeoff(points, metric="output", highlight=points[0])
    assert "output" in ax.get_ylabel()
    plt.close(ax.figure)
    fig, point = draw_explorer(w, 3, 32, x=x, points=points)
    assert len(fig.axes) == 3 and point.bits == 3 and point.group_size == 32
    plt.close(fig)
    fig, _ = draw_explorer(w, 2, None, symmetric=True)
    assert "3 levels per row" in fig.axes[0].get_title()
    plt.close(fig)


def test_widget_builds_and_redraws():
    pytest.importorskip("ipywidgets")
    from minillm.viz.quant import explorer_widget

    box = explorer_widget(weight(N=8, K=128), bits_options=(2, 4), group_options=(32, None))
    bits, group, fmt, image = box.children
    first = image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    bits.value, group.value, fmt.value = 2, None, True  # each change redraws
    assert image.value != first and image.value[:4] == b"\x89PNG"
    assert not plt.get_fignums()  # every redraw closed its figure
