"""Unit tests for minillm.prune on tiny random models and hand-made tensors (fast, CPU)."""

import copy

import pytest
import torch
from torch import nn
from transformers import BatchEncoding

from minillm.config import ModelConfig
from minillm.model import Transformer
from minillm.prune import (
    InputNormCollector,
    count_parameters,
    is_nm_sparse,
    magnitude_mask,
    model_sparsity,
    nm_mask,
    parse_pattern,
    prunable_linears,
    prune_heads,
    prune_mlp_channels,
    prune_model,
    row_mask,
    sensitivity_scan,
    sparsity_report,
    to_semi_structured,
    wanda_score,
)
from minillm.prune.magnitude import num_pruned_per_row
from minillm.eval import calibration_batch
from minillm.prune.wanda import first_layer_inputs


@pytest.fixture
def calib():
    torch.manual_seed(1)
    return torch.randint(0, 256, (12, 24))


def test_row_mask_exact_per_row():
    torch.manual_seed(0)
    score = torch.rand(7, 40)
    for sparsity in (0.0, 0.1, 0.25, 0.5, 0.73, 0.99):
        mask = row_mask(score, sparsity)
        expected_zeros = round(sparsity * 40)
        assert (mask.sum(dim=1) == 40 - expected_zeros).all(), sparsity
        # The dropped entries are the smallest of their row.
        if 0 < expected_zeros < 40:
            dropped_max = torch.where(mask, -torch.inf, score).amax(dim=1)
            kept_min = torch.where(mask, score, torch.inf).amin(dim=1)
            assert (dropped_max <= kept_min).all()


def test_num_pruned_per_row_rounds_to_nearest():
    assert num_pruned_per_row(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert num_pruned_per_row(576, 0.5) == 288
    assert num_pruned_per_row(10, 0.04) == 0


def test_magnitude_mask_drops_smallest():
    weight = torch.tensor([[0.1, -3.0, 0.2, 2.0], [-5.0, 0.01, 0.3, -0.02]])
    mask = magnitude_mask(weight, 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_mask_pattern(pattern):
    n, m = parse_pattern(pattern)
    torch.manual_seed(0)
    score = torch.rand(5, 32)
    mask = nm_mask(score, n, m)
    groups = mask.view(5, 32 // m, m)
    assert (groups.sum(dim=-1) == n).all()
    # Within each group, every kept score beats every dropped one.
    s = score.view(5, 32 // m, m)
    assert (torch.where(groups, -torch.inf, s).amax(-1) <= torch.where(groups, s, torch.inf).amin(-1)).all()
    assert is_nm_sparse(score * mask, n, m)


def test_is_nm_sparse_rejects_dense_group():
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    assert not is_nm_sparse(w, 2, 4)
    assert is_nm_sparse(w, 3, 4)


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "4:4", 2, None])
def test_parse_pattern_errors(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(bad)


def test_wanda_score_scales_columns():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norm = torch.tensor([10.0, 1.0])
    assert torch.equal(wanda_score(weight, norm), torch.tensor([[10.0, 2.0], [30.0, 0.5]]))
    with pytest.raises(ValueError, match="input_norm"):
        wanda_score(weight, torch.ones(3))


def test_input_norm_collector_matches_direct_norm():
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    x = torch.randn(4, 5, 6)
    with InputNormCollector({"lin": linear}) as collector:
        linear(x[:2])
        linear(x[2:])
    torch.testing.assert_close(collector.norms()["lin"], x.reshape(-1, 6).norm(dim=0))
    assert not linear._forward_hooks  # hooks removed on exit


def test_first_layer_inputs_are_the_embeddings(tiny_model, calib):
    x, args, kwargs = first_layer_inputs(tiny_model, calib)
    torch.testing.assert_close(x, tiny_model.embed_tokens(calib))
    # Feeding them through all layers by hand reproduces the model's logits.
    for layer in tiny_model.layers:
        x = layer(x, *args, **kwargs)
    torch.testing.assert_close(tiny_model.lm_head(tiny_model.norm(x)), tiny_model(calib))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.3, None), (0.7, None), (0.5, "2:4"), (0.5, "4:8")])
def test_prune_model_sparsity_and_pattern(tiny_model, calib, method, sparsity, pattern):
    embed_before = tiny_model.embed_tokens.weight.clone()
    out = prune_model(tiny_model, method, sparsity, pattern, calibration=calib)
    assert out is tiny_model
    report = sparsity_report(tiny_model)
    assert len(report) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    for name, linear in prunable_linears(tiny_model).items():
        in_features = linear.in_features
        zeros_per_row = (linear.weight == 0).sum(dim=1)
        assert (zeros_per_row == round(sparsity * in_features)).all(), name
        if pattern is not None:
            assert is_nm_sparse(linear.weight, *parse_pattern(pattern)), name
    assert model_sparsity(tiny_model) == pytest.approx(sparsity, abs=1 / 64)
    # Embedding and (tied) LM head untouched; the model still runs.
    assert torch.equal(tiny_model.embed_tokens.weight, embed_before)
    assert torch.isfinite(tiny_model(calib)).all()


def test_prune_model_zero_sparsity_is_identity(tiny_model, calib):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    prune_model(tiny_model, "wanda", 0.0, calibration=calib)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_wanda_differs_from_magnitude_and_uses_activations(tiny_model, calib):
    magnitude = prune_model(copy.deepcopy(tiny_model), "magnitude", 0.5)
    wanda = prune_model(copy.deepcopy(tiny_model), "wanda", 0.5, calibration=calib)
    q_mag = magnitude.layers[0].self_attn.q_proj.weight != 0
    q_wanda = wanda.layers[0].self_attn.q_proj.weight != 0
    assert not torch.equal(q_mag, q_wanda)


def test_wanda_is_sequential(tiny_model, calib):
    """Layer 1 is calibrated on the outputs of the already pruned layer 0, as in the paper's procedure."""
    sequential = prune_model(copy.deepcopy(tiny_model), "wanda", 0.5, calibration=calib)
    # Reproduce by hand: prune layer 0 with dense norms, then measure layer 1's inputs on the pruned model.
    reference = copy.deepcopy(tiny_model)
    linears = prunable_linears(reference)
    with InputNormCollector(linears) as dense:
        reference(calib)
    for name, norm in dense.norms().items():
        if name.startswith("layers.0."):
            keep = row_mask(wanda_score(linears[name].weight, norm), 0.5)
            linears[name].weight.data.masked_fill_(~keep, 0)
    with InputNormCollector(linears) as after_layer0:
        reference(calib)
    norm = after_layer0.norms()["layers.1.mlp.down_proj"]
    keep = row_mask(wanda_score(linears["layers.1.mlp.down_proj"].weight, norm), 0.5)
    assert torch.equal(sequential.layers[1].mlp.down_proj.weight != 0, keep)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.5", True])
def test_bad_sparsity(tiny_model, sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(tiny_model, "magnitude", sparsity)


def test_unknown_method_lists_choices(tiny_model):
    with pytest.raises(ValueError, match="'magnitude', 'wanda'"):
        prune_model(tiny_model, "sparsegpt", 0.5)


def test_pattern_must_divide_width():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny(intermediate_size=100)).eval()  # down_proj has 100 inputs
    before = model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match="down_proj has in_features=100"):
        prune_model(model, "magnitude", 0.5, pattern="4:8")
    # Validation happens before any weight changes.
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, before)


def test_pattern_sparsity_mismatch(tiny_model):
    with pytest.raises(ValueError, match="fixes the sparsity at 0.5"):
        prune_model(tiny_model, "magnitude", 0.6, pattern="2:4")
    prune_model(tiny_model, "magnitude", 0.75, pattern="1:4")
    assert is_nm_sparse(tiny_model.layers[0].mlp.up_proj.weight, 1, 4)


def test_wanda_needs_calibration_or_tokenizer(tiny_model):
    with pytest.raises(ValueError, match="tokenizer"):
        prune_model(tiny_model, "wanda", 0.5)
    with pytest.raises(ValueError, match="long tensor"):
        prune_model(tiny_model, "wanda", 0.5, calibration=torch.zeros(2, 8))


class _CharTokenizer:
    """Stands in for a transformers tokenizer: one token per byte."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        return BatchEncoding({"input_ids": torch.tensor([list(text.encode())])})


def test_calibration_batch_from_text():
    batch = calibration_batch(_CharTokenizer(), "abcdefghij" * 10, num_tokens=64, seq_len=16)
    assert batch.shape == (4, 16) and batch.dtype == torch.long
    assert bytes(batch[0].tolist()) == b"abcdefghijabcdef"
    with pytest.raises(ValueError, match="fewer than"):
        calibration_batch(_CharTokenizer(), "short", num_tokens=64, seq_len=16)


def test_to_semi_structured_is_a_no_op_on_cpu(tiny_model):
    prune_model(tiny_model, "magnitude", 0.5, pattern="2:4")
    assert to_semi_structured(tiny_model) == []
    assert model_sparsity(tiny_model) == 0.5


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sensitivity_scan_restores_model(tiny_model, method):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    text = "The quick brown fox jumps over the lazy dog. " * 8
    df = sensitivity_scan(tiny_model, _CharTokenizer(), method=method, sparsity=0.5, text=text, max_tokens=64,
                          window=64, calibration=text, num_calibration_tokens=128, progress=False)
    assert list(df.columns) == ["layer", "group", "perplexity", "delta"]
    assert df[["layer", "group"]].values.tolist() == [[0, "self_attn"], [0, "mlp"], [1, "self_attn"], [1, "mlp"]]
    assert (df.perplexity > 0).all() and (df.delta != 0).all()
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    with pytest.raises(ValueError, match="matches no linear"):
        sensitivity_scan(tiny_model, _CharTokenizer(), groups=("attn",), text=text, progress=False)


def _greedy(model, ids, steps):
    for _ in range(steps):
        next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("unit, heads, kv_heads", [("kv_group", 2, 1), ("query_head", 2, 2)])
@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_prune_heads_shrinks_and_runs(calib, unit, heads, kv_heads, score):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny(num_heads=4, num_kv_heads=2)).eval()
    result = prune_heads(model, 0.5, unit=unit, score=score, calibration=calib)
    D, C = 16, 64
    for layer in model.layers:
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (heads * D, C) and attn.o_proj.weight.shape == (C, heads * D)
        assert attn.k_proj.weight.shape == (kv_heads * D, C) == attn.v_proj.weight.shape
        assert (attn.num_heads, attn.num_kv_heads) == (heads, kv_heads)
    assert (model.config.num_heads, model.config.num_kv_heads) == (heads, kv_heads)
    assert result.num_params_after == count_parameters(model) == model.config.num_parameters
    assert result.num_params_before - result.num_params_after == 2 * (2 * (4 - heads) + 2 * (2 - kv_heads)) * D * C
    assert all(len(r) == 4 - heads for r in result.removed.values())
    assert _greedy(model, calib[:1, :5], 4).shape == (1, 9)


def test_prune_heads_equals_zeroing_those_heads(calib):
    """Removing query heads must give exactly the model whose removed heads' o_proj columns are zero."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny(num_heads=6, num_kv_heads=2, head_dim=16)).eval()  # G = 3
    zeroed = copy.deepcopy(model)
    result = prune_heads(model, 1 / 3, unit="query_head", calibration=calib)
    assert model.config.num_heads == 4 and model.config.num_kv_heads == 2
    for i, layer in enumerate(zeroed.layers):
        for h in result.removed[i]:
            layer.self_attn.o_proj.weight.data[:, h * 16 : (h + 1) * 16] = 0
    torch.testing.assert_close(model(calib), zeroed(calib))


def test_prune_kv_group_equals_zeroing_its_heads(calib):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny(num_heads=6, num_kv_heads=3, head_dim=16)).eval()  # G = 2
    zeroed = copy.deepcopy(model)
    result = prune_heads(model, 1 / 3, unit="kv_group", calibration=calib)
    assert model.config.num_heads == 4 and model.config.num_kv_heads == 2
    for i, layer in enumerate(zeroed.layers):
        removed = result.removed[i]
        assert len(removed) == 2 and removed[0] // 2 == removed[1] // 2  # one whole group
        for h in removed:
            layer.self_attn.o_proj.weight.data[:, h * 16 : (h + 1) * 16] = 0
    torch.testing.assert_close(model(calib), zeroed(calib))


def test_prune_mlp_channels_equals_zeroing_them(tiny_model, calib):
    zeroed = copy.deepcopy(tiny_model)
    result = prune_mlp_channels(tiny_model, 0.25, calibration=calib)
    assert tiny_model.config.intermediate_size == 96
    for i, layer in enumerate(tiny_model.layers):
        assert layer.mlp.gate_proj.weight.shape == (96, 64) and layer.mlp.down_proj.weight.shape == (64, 96)
        zeroed.layers[i].mlp.down_proj.weight.data[:, result.removed[i]] = 0
    torch.testing.assert_close(tiny_model(calib), zeroed(calib))
    assert result.num_params_before - result.num_params_after == 2 * 32 * 3 * 64
    assert result.fraction_removed == pytest.approx(2 * 32 * 3 * 64 / result.num_params_before)


def test_structured_prunes_lowest_scores(tiny_model):
    """With the magnitude score, the channels removed are those with the smallest weight norms."""
    mlp = tiny_model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, :8] *= 1e-3
        mlp.gate_proj.weight[:8] *= 1e-3
        mlp.up_proj.weight[:8] *= 1e-3
    result = prune_mlp_channels(tiny_model, 8 / 128, score="magnitude")
    assert result.removed[0] == list(range(8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=1.0), "fraction"),
    (dict(fraction=0.5, unit="layer"), "unit"),
    (dict(fraction=0.5, score="random"), "score"),
    (dict(fraction=0.9), "every kv_group"),
])
def test_prune_heads_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_heads(tiny_model, **kwargs)


@pytest.mark.gpu
def test_to_semi_structured_on_gpu_matches_dense_zeros():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need an Ampere or newer GPU")
    torch.manual_seed(0)
    config = ModelConfig.tiny(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)  # dims % 64 == 0
    model = Transformer(config).to("cuda", torch.float16).eval()
    prune_model(model, "magnitude", 0.5, pattern="2:4")
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.no_grad():
        expected = model(ids).float()
        converted = to_semi_structured(model)
        assert len(converted) == 2 * 7
        assert sparsity_report(model).sparsity.min() >= 0.5
        torch.testing.assert_close(model(ids).float(), expected, atol=2e-2, rtol=2e-2)
