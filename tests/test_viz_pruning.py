"""minillm.viz.pruning: the grid, the sweep on a tiny random model (weights restored, every point what prune_model
gives), the lookups the slider uses, and that the figures build (no display, no timings)."""

import copy
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minillm.eval import perplexity  # noqa: E402
from minillm.prune import prunable_linears, prune_model  # noqa: E402
from minillm.viz.pruning import (  # noqa: E402
    PruneSetting,
    continuation_perplexity,
    grid,
    pattern_holds,
    sweep_pruning,
)

TEXT = "the quick brown fox jumps over the lazy dog. " * 4


class ByteTokenizer:
    """One token per character (ids below the tiny model's vocabulary of 256)."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text]]))


def evaluate(model):
    return perplexity(model, ByteTokenizer(), TEXT, max_tokens=96, window=96, progress=False)


@torch.no_grad()
def generate(model, num_tokens=6):
    ids = ByteTokenizer()("the ").input_ids
    for _ in range(num_tokens):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return "".join(chr(i) for i in ids[0, 4:].tolist())


@pytest.fixture
def calib():
    return torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(1))


def weights(model):
    return {name: linear.weight.detach().clone() for name, linear in prunable_linears(model).items()}


def test_grid_lists_dense_once_then_each_method():
    settings = grid(("magnitude", "wanda"), [0.5, 0.0, 0.25], patterns=("2:4",))
    assert [s.label for s in settings] == [
        "dense", "magnitude 25%", "magnitude 50%", "magnitude 2:4", "wanda 25%", "wanda 50%", "wanda 2:4"]
    assert settings[3] == PruneSetting("magnitude", 0.5, "2:4")


@pytest.mark.parametrize(
    "args,match",
    [(("sparsegpt", 0.5), "unknown method"), (("wanda", 1.0), "sparsity"), (("dense", 0.5), "dense"),
     (("wanda", 0.25, "2:4"), "fixes the sparsity"), (("wanda", 0.5, "2-4"), "N:M")],
)
def test_bad_settings_name_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        PruneSetting(*args)


def test_sweep_measures_what_prune_model_gives_and_restores_the_weights(tiny_model, calib):
    before = weights(tiny_model)
    calls = []
    settings = grid(("magnitude", "wanda"), [0.3, 0.7], patterns=("2:4",))
    sweep = sweep_pruning(tiny_model, settings, lambda m: calls.append(1) or evaluate(m), generate, calib)
    assert len(calls) == len(settings) == len(sweep.points) == 7  # the dense point is measured once
    assert all(torch.equal(before[n], w) for n, w in weights(tiny_model).items())
    assert sweep.dense.perplexity == pytest.approx(evaluate(tiny_model))
    assert sweep.dense.text == generate(tiny_model)
    # Every point is the model prune_model makes from the dense weights: no setting leaks into the next.
    for setting in settings[1:]:
        fresh = prune_model(copy.deepcopy(tiny_model), setting.method, setting.sparsity,
                            setting.pattern, calibration=calib)
        point = sweep.point(setting.method, setting.sparsity, setting.pattern)
        assert point.perplexity == pytest.approx(evaluate(fresh), rel=1e-5)
        assert point.text == generate(fresh)
        assert point.pattern_holds
        assert point.achieved == pytest.approx(setting.sparsity, abs=1 / 64)
    assert sweep.point("wanda", 0.3).perplexity != sweep.point("magnitude", 0.3).perplexity


def test_sweep_restores_the_weights_when_a_call_fails(tiny_model):
    before = weights(tiny_model)

    def failing(model):
        if any(bool((w == 0).any()) for w in weights(model).values()):
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(RuntimeError, match="boom"):
        sweep_pruning(tiny_model, grid(("magnitude",), [0.5]), failing, lambda m: "")
    assert all(torch.equal(before[n], w) for n, w in weights(tiny_model).items())
    with pytest.raises(ValueError, match="empty"):
        sweep_pruning(tiny_model, [], evaluate, generate)


def test_pattern_holds_sees_a_dense_model_fail(tiny_model):
    assert pattern_holds(tiny_model, PruneSetting("dense"))
    assert not pattern_holds(tiny_model, PruneSetting("magnitude", 0.5))
    assert not pattern_holds(tiny_model, PruneSetting("magnitude", 0.5, "2:4"))
    prune_model(tiny_model, "magnitude", 0.5, "2:4")
    assert pattern_holds(tiny_model, PruneSetting("wanda", 0.5, "2:4"))
    assert pattern_holds(tiny_model, PruneSetting("wanda", 0.5))  # 2 of every 4 zero: half of every row too
    assert not pattern_holds(tiny_model, PruneSetting("wanda", 0.6))


def test_continuation_perplexity_scores_only_the_text(tiny_model):
    tok, text = ByteTokenizer(), TEXT[1:40]
    # With a one-token prompt every other token is scored, exactly as minillm.eval.perplexity scores the whole text.
    whole = perplexity(tiny_model, tok, TEXT[0] + text, max_tokens=100, window=100, progress=False)
    assert continuation_perplexity(tiny_model, tok, TEXT[0], text) == pytest.approx(whole, rel=1e-5)
    # A longer prompt is context only: its own tokens are not scored.
    ids = tok("the quick" + text).input_ids  # (1, T)
    logp = torch.log_softmax(tiny_model(ids)[0].float(), dim=-1)  # (T, V)
    num_prompt = len("the quick")
    nll = -logp[num_prompt - 1 : -1].gather(1, ids[0, num_prompt:, None]).mean()
    got = continuation_perplexity(tiny_model, tok, "the quick", text)
    assert got == pytest.approx(torch.exp(nll).item(), rel=1e-5)
    with pytest.raises(ValueError, match="adds no token"):
        continuation_perplexity(tiny_model, tok, "the", "")


@pytest.fixture
def sweep(tiny_model, calib):
    return sweep_pruning(tiny_model, grid(("magnitude", "wanda"), [0.2, 0.5, 0.9], patterns=("4:8",)), evaluate,
                         generate, calib)


def test_lookups_the_slider_uses(sweep):
    assert sweep.methods == ["magnitude", "wanda"]
    assert sweep.sparsities("wanda") == [0.0, 0.2, 0.5, 0.9]  # the 4:8 point is not on the slider
    assert sweep.point("wanda", 0.0) is sweep.dense is sweep.point("magnitude", 0)
    assert sweep.nearest("wanda", 0.45) is sweep.point("wanda", 0.5)
    assert sweep.nearest("magnitude", 0.05) is sweep.dense
    assert sweep.point("wanda", 0.5, "4:8").setting.label == "wanda 4:8"
    with pytest.raises(KeyError, match="wanda 2:4 was not measured"):
        sweep.point("wanda", 0.5, "2:4")
    assert [p.setting.sparsity for p in sweep.curve("magnitude")] == [0.0, 0.2, 0.5, 0.9]
    dense = sweep.dense.perplexity
    assert sweep.first_above("magnitude", 0.0) == 0.0
    assert sweep.first_above("magnitude", float("inf")) is None
    high = sweep.point("magnitude", 0.9).perplexity
    assert sweep.first_above("magnitude", high / dense * 0.999) <= 0.9


def test_tables(sweep):
    frame = sweep.frame()
    assert list(frame.columns) == ["method", "pattern", "sparsity", "achieved", "perplexity", "pattern_holds", "text"]
    assert frame.pattern.tolist() == ["-"] + ["unstructured"] * 3 + ["4:8"] + ["unstructured"] * 3 + ["4:8"]
    assert frame.pattern_holds.all()
    table = sweep.text_table([0.0, 0.5, 0.9])
    assert table.setting.tolist() == ["dense", "magnitude 50%", "wanda 50%", "magnitude 90%", "wanda 90%"]
    assert table.text.tolist()[0] == sweep.dense.text
    caption = sweep.describe(sweep.point("wanda", 0.5), prompt="<the>")
    assert "wanda 50%" in caption and "&lt;the&gt;" in caption and "x dense" in caption


def test_figures_build(sweep):
    fig = sweep.figure([0.2, 0.9], prompt="the ", title="tiny")
    assert fig.axes[0].get_yscale() == "log"
    assert len(fig.axes[0].get_lines()) == 3  # two methods and the dense line
    plt.close(fig)
    ax = sweep.draw(highlight=sweep.point("wanda", 0.5))
    plt.close(ax.figure)


def test_widget_builds_without_recomputing(sweep):
    pytest.importorskip("ipywidgets")
    box = sweep.widget(prompt="the ")
    method, slider, caption, image = box.children
    first = bytes(image.value)
    assert "dense" in caption.value and first.startswith(b"\x89PNG")
    slider.value = 0.9
    assert "magnitude 90%" in caption.value and bytes(image.value) != first
    method.value = "wanda"
    assert "wanda 90%" in caption.value
    slider.value = 0.0
    assert bytes(image.value) == first  # drawn once, shown again from the cache
    assert not plt.get_fignums()  # nothing left in pyplot
