"""Perplexity with sliding windows, on stub models whose answer is known; the offline texts. Never downloads."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import minillm.eval as ev

V = 32


class CharTokenizer:
    """A stub tokenizer: one token per character, ids modulo V."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % V for c in text]]))


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, V)


class Bigram(nn.Module):
    """Logits depend on the previous token only, so any window with >= 1 token of context scores the same."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))
        self.calls = []

    def forward(self, input_ids):
        self.calls.append(input_ids.shape[1])
        return self.table[input_ids]


TEXT = "the quick brown fox jumps over the lazy dog. " * 3


def test_uniform_model_has_perplexity_vocab_size():
    assert ev.perplexity(Uniform(), CharTokenizer(), TEXT, window=16, progress=False) == pytest.approx(V)


@pytest.mark.parametrize("window,stride", [(8, 3), (16, 15), (10, None), (1000, None)])
def test_windows_score_every_token_exactly_once(window, stride):
    model, tok = Bigram(), CharTokenizer()
    ids = tok(TEXT).input_ids[0]
    logp = torch.log_softmax(model.table[ids[:-1]], dim=-1)
    expected = math.exp(-logp.gather(1, ids[1:, None]).mean().item())
    got = ev.perplexity(model, tok, TEXT, max_tokens=10_000, window=window, stride=stride, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)
    assert all(n <= window for n in model.calls)


def test_stride_equal_to_window_skips_each_window_start():
    # Non-overlapping windows: the first token of a window has no context inside it, so it is not scored.
    model, tok = Bigram(), CharTokenizer()
    ids = tok(TEXT).input_ids[0]
    logp = torch.log_softmax(model.table[ids[:-1]], dim=-1).gather(1, ids[1:, None])[:, 0]  # target t at t - 1
    scored = torch.tensor([t % 16 != 0 for t in range(1, ids.numel())])
    expected = math.exp(-logp[scored].mean().item())
    got = ev.perplexity(model, tok, TEXT, max_tokens=10_000, window=16, stride=16, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)


def test_max_tokens_truncates():
    model = Bigram()
    ev.perplexity(model, CharTokenizer(), TEXT, max_tokens=20, window=8, stride=4, progress=False)
    assert model.calls == [8, 8, 8, 8]  # windows start at 0, 4, 8, 12; the last reaches token 20


def test_argument_errors():
    with pytest.raises(ValueError, match="window"):
        ev.perplexity(Uniform(), CharTokenizer(), TEXT, window=1)
    with pytest.raises(ValueError, match="stride"):
        ev.perplexity(Uniform(), CharTokenizer(), TEXT, window=8, stride=9)
    with pytest.raises(ValueError, match="at least 2"):
        ev.perplexity(Uniform(), CharTokenizer(), "a", window=8)


def test_offline_texts_ship_with_the_package_and_do_not_overlap():
    text = ev.load_eval_text("offline")
    calibration = ev.load_calibration_text()
    assert len(text) > 30_000 and len(calibration) > 8_000
    paragraphs = {p.strip() for p in text.split("\n\n") if len(p) > 80}
    assert not any(p.strip() in paragraphs for p in calibration.split("\n\n"))
    with pytest.raises(ValueError, match="offline"):
        ev.load_eval_text("ptb")


def test_text_none_falls_back_to_offline_without_network(monkeypatch, capsys):
    real = ev.load_eval_text

    def no_network(source="offline"):
        if source == "wikitext2":
            raise ConnectionError("no network in tests")
        return real(source)

    monkeypatch.setattr(ev, "load_eval_text", no_network)
    ppl = ev.perplexity(Uniform(), CharTokenizer(), None, max_tokens=64, window=16, progress=False)
    assert ppl == pytest.approx(V) and "offline" in capsys.readouterr().out
