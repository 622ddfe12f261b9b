"""minillm.viz.softmax: the stepper's states are the online softmax's, its last step is the exact softmax on odd
sizes and masked rows, every intermediate step is the exact softmax of the keys seen, and the figures build."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minillm.viz.softmax import OnlineSoftmaxStepper  # noqa: E402

ATOL = 1e-6  # fp32; the rescaled sums differ from one softmax by a few ulps


@pytest.mark.parametrize(
    "num_rows, num_keys, head_dim, block_n", [(1, 19, 4, 4), (3, 7, 5, 3), (2, 5, 3, 8), (1, 1, 2, 1)]
)
def test_last_step_is_the_exact_softmax_on_odd_sizes(num_rows, num_keys, head_dim, block_n):
    st = OnlineSoftmaxStepper.random(num_rows, num_keys, head_dim, block_n, seed=num_keys)
    assert st.num_tiles == math.ceil(num_keys / block_n)
    assert st.states[-1].num_keys == num_keys
    torch.testing.assert_close(st.weights(st.num_tiles), torch.softmax(st.s, -1), atol=ATOL, rtol=0)
    torch.testing.assert_close(st.output(st.num_tiles), torch.softmax(st.s, -1) @ st.v, atol=ATOL, rtol=0)
    assert st.max_error(st.num_tiles) < ATOL
    torch.testing.assert_close(st.states[-1].m_i, st.s.amax(-1))


def test_every_step_is_the_exact_softmax_of_the_keys_seen_so_far():
    st = OnlineSoftmaxStepper.random(num_rows=2, num_keys=13, head_dim=4, block_n=3, seed=1)
    for step in range(1, st.num_tiles + 1):
        n = st.states[step].num_keys
        assert st.tile_keys(step) == ((step - 1) * 3, n)
        prefix = torch.softmax(st.s[:, :n], -1)
        torch.testing.assert_close(st.weights(step)[:, :n], prefix, atol=ATOL, rtol=0)
        assert not st.weights(step)[:, n:].any()  # unseen keys carry no weight yet
        torch.testing.assert_close(st.output(step), prefix @ st.v[:n], atol=ATOL, rtol=0)
        torch.testing.assert_close(st.states[step].m_i, st.s[:, :n].amax(-1))


def test_alpha_is_one_while_the_max_stays_and_rescales_when_it_grows():
    s = torch.tensor([[1.0, 0.0, 0.5, -1.0, 3.0, 2.0]])  # the max grows at the first and the third tile only
    st = OnlineSoftmaxStepper(s, torch.randn(6, 2), block_n=2)
    alphas = [float(x.alpha[0]) for x in st.states]
    assert alphas[0] == 1.0 and alphas[1] == 0.0  # the first tile replaces the empty state
    assert alphas[2] == 1.0
    assert alphas[3] == pytest.approx(math.exp(1.0 - 3.0))
    old, new = st.states[2], st.states[3]
    assert float(new.l_i[0]) == pytest.approx(alphas[3] * float(old.l_i[0]) + math.exp(0.0) + math.exp(-1.0))
    assert "alpha = 0.135" in st.describe(3) and "m_i 1.00 -> 3.00" in st.describe(3)
    assert st.describe(0).startswith("start")


def test_masked_keys_and_a_row_that_sees_nothing_give_zeros_not_nan():
    inf = float("-inf")
    s = torch.tensor([[inf, inf, 0.3, 1.2, inf], [inf, inf, inf, inf, inf]])  # causal-style mask; row 1 all masked
    st = OnlineSoftmaxStepper(s, torch.randn(5, 3), block_n=2)
    for step in range(st.num_tiles + 1):
        assert torch.isfinite(st.weights(step)).all() and torch.isfinite(st.output(step)).all()
    assert not st.weights(1).any()  # row 0's first tile is all masked: nothing seen yet
    assert not st.output(st.num_tiles)[1].any()
    torch.testing.assert_close(st.output(st.num_tiles), st.exact_output, atol=ATOL, rtol=0)
    for row in (0, 1):  # masked keys and an all-masked row draw too
        plt.close(st.snapshots(row=row))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="block_n"):
        OnlineSoftmaxStepper(torch.randn(1, 4), torch.randn(4, 2), block_n=0)
    with pytest.raises(ValueError, match=r"s \(T, S\)"):
        OnlineSoftmaxStepper(torch.randn(1, 4), torch.randn(5, 2), block_n=2)
    st = OnlineSoftmaxStepper.random()
    with pytest.raises(ValueError, match="step"):
        st.tile_keys(0)


def test_random_is_seeded():
    a, b = OnlineSoftmaxStepper.random(seed=3), OnlineSoftmaxStepper.random(seed=3)
    assert torch.equal(a.s, b.s) and torch.equal(a.v, b.v)
    assert not torch.equal(a.s, OnlineSoftmaxStepper.random(seed=4).s)


def test_figures_and_widget_build():
    st = OnlineSoftmaxStepper.random(num_rows=2, num_keys=10, block_n=4)
    fig = st.snapshots(row=1)
    assert len(fig.axes) == 3 * st.num_tiles
    plt.close(fig)
    axes = st.draw(0)
    assert len(axes) == 3
    plt.close("all")
    pytest.importorskip("ipywidgets")
    w = st.widget()
    play, slider, row = w.children[0].children
    assert slider.max == st.num_tiles and row.max == 1
    slider.value = 2  # redraws into the Output widget without a display
    row.value = 1
    plt.close("all")
