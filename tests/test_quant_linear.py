"""Int8Linear / Int4Linear layers and quantize_model on a tiny random Llama (fast, CPU)."""

import copy

import pytest
import torch
import torch.nn as nn

from minillm._triton import triton_available
from minillm.quant import (
    SCHEMES, Int4Linear, Int8Linear, QuantizedEmbedding, awq, model_nbytes, quantize_model,
)
from minillm.quant.numerics import fake_quantize


def linear(K=96, N=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias)


def test_int8_linear_matches_fake_quantized_weight():
    lin = linear()
    q = Int8Linear.from_linear(lin)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (40, 1) and q.scales.dtype == torch.float16
    torch.testing.assert_close(q.dequantize_weight(), fake_quantize(lin.weight.detach(), 8, "channel"), atol=1e-3, rtol=1e-3)
    x = torch.randn(2, 3, 96)
    y = q(x)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, x @ q.dequantize_weight().t() + lin.bias.detach())
    assert (y - lin(x)).abs().max() < 0.02
    assert q.nbytes() == 40 * 96 + 40 * 2 + 40 * 4  # int8 codes + fp16 scales + fp32 bias


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_storage_and_forward(group_size):
    lin = linear(K=128, bias=False)
    q = Int4Linear.from_linear(lin, group_size=group_size)
    G = 128 // group_size
    assert q.qweight.shape == (40, 64) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == q.zeros.shape == (40, G) and q.bias is None
    fake = fake_quantize(lin.weight.detach(), 4, "group", group_size, symmetric=False)
    # Same grid as the numerics module up to the fp16 rounding of scales (which may flip a code at a tie).
    assert (q.dequantize_weight() - fake).abs().gt(1e-3).float().mean() < 0.01
    assert (q.dequantize_weight() - lin.weight.detach()).abs().max() <= q.scales.float().max() / 2 + 1e-4
    assert q.nbytes() == 40 * 64 + 40 * G * 3
    x = torch.randn(5, 128)
    torch.testing.assert_close(q(x), x @ q.dequantize_weight().t())


def test_int4_short_last_group():
    lin = linear(K=80, bias=False)  # 80 = 2 * 32 + 16
    q = Int4Linear.from_linear(lin, group_size=32)
    assert q.scales.shape == (40, 3)
    err = (q.dequantize_weight() - lin.weight.detach()).abs()
    assert err.max() <= q.scales.float().max() / 2 + 1e-4


def test_bad_group_sizes_and_backends():
    with pytest.raises(ValueError, match="wider than the layer"):
        Int4Linear.from_linear(linear(K=64), group_size=128)
    with pytest.raises(ValueError, match="one of"):
        Int4Linear.from_linear(linear(K=96), group_size=48)
    with pytest.raises(ValueError, match="even"):
        Int4Linear(in_features=65, out_features=8, group_size=32)
    with pytest.raises(ValueError, match="backend"):
        Int8Linear.from_linear(linear(), backend="cuda")
    with pytest.raises(ValueError, match=r"\(\.\.\., 96\)"):
        Int8Linear.from_linear(linear())(torch.randn(2, 95))


@pytest.mark.skipif(not triton_available("cpu") and not torch.cuda.is_available(), reason="needs triton")
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_triton_backend_matches_reference(cls):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"group_size": 32} if cls is Int4Linear else {}
    q = cls.from_linear(linear(K=64, N=24), **kwargs).to(device)
    x = torch.randn(3, 64, device=device)
    q.backend = "reference"
    ref = q(x)
    q.backend = "triton"
    torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)


def tiny(tie=True):
    from minillm.config import ModelConfig
    from minillm.model import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny(tie_word_embeddings=tie)).eval()


def ids(B=2, T=24, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_model_replaces_every_linear(scheme):
    model = tiny()
    x = ids()
    with torch.no_grad():
        ref = model(x)
    fp_bytes = model_nbytes(model)
    out = quantize_model(model, scheme, group_size=32, calibration=ids(4, 32, seed=1))
    assert out is model
    kinds = {type(m) for m in model.modules()}
    assert nn.Linear not in kinds and isinstance(model.embed_tokens, QuantizedEmbedding)
    assert model.embed_tokens.table is model.lm_head  # still tied: one table
    with torch.no_grad():
        got = model(x)
    assert got.shape == ref.shape
    rel = (got - ref).norm() / ref.norm()
    assert rel < (0.02 if scheme == "int8" else 0.2)
    assert model_nbytes(model) < fp_bytes / (3 if scheme == "int8" else 4)


def test_quantize_model_keeps_lm_head_when_asked():
    model = tiny()
    quantize_model(model, "int4", group_size=32, quantize_lm_head=False)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed_tokens.weight


def test_untied_model_keeps_dense_embedding():
    model = tiny(tie=False)
    quantize_model(model, "int8")
    assert isinstance(model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, Int8Linear)


def test_quantize_model_errors_leave_model_untouched():
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="int4-awq"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="wider than the layer"):
        quantize_model(model, "int4-awq", group_size=128, calibration=ids())  # C = 64 < 128
    with pytest.raises(ValueError, match="tokenizer"):
        quantize_model(model, "int4-awq", group_size=32)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_awq_folding_is_exact_before_quantization():
    """Scaling by s and folding 1/s into norms / v_proj / up_proj must not change the fp model's output."""
    model = tiny()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie, as quantize_model does
    x = ids()
    with torch.no_grad():
        ref = model(x)
    report = awq.awq_scale_(model, ids(4, 32, seed=1), group_size=32, num_grid=10)
    assert len(report) == 4 * 2 + 1
    assert any(r["alpha"] > 0 for r in report.values())  # the search found something better than plain RTN
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_awq_search_never_worse_than_round_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, :4] *= 30  # a few salient input channels, as in LLM activations
    w = torch.randn(48, 64)
    s, alpha, losses = awq.search_scale(x.abs().mean(0), x, w, group_size=32, num_grid=10)
    assert len(losses) == 11 and min(losses) == losses[round(alpha * 10)] <= losses[0]
    assert losses[0] > 1.1 * min(losses)  # activation-aware scaling clearly helps here
    assert s.shape == (64,)


def test_awq_shares_scales_across_query_heads_of_one_kv_head():
    s = torch.arange(1.0, 13.0)  # H*D with H=6 query heads... here D=2, kv_group=3, Hkv=2
    shared = awq.share_across_heads(s, kv_group=3, head_dim=2)
    assert shared.view(2, 3, 2).unique(dim=1).shape == (2, 1, 2)
    torch.testing.assert_close(shared.view(2, 3, 2)[:, 0], s.view(2, 3, 2).mean(1))
