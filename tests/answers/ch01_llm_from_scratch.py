"""Chapter 01's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
worked example above each exercise in the solution notebook is recomputed here with the package's reference.
"""

from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm import grading
from minillm.attention.reference import repeat_kv
from minillm.config import ModelConfig
from minillm.course import exercise_header, read_notebook
from minillm.engine.sampling import apply_top_p
from minillm.model import MLP, RMSNorm, apply_rope, rope_cos_sin

RIGHT_ANSWERS = []
WRONG_ANSWERS = []
SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "01_llm_from_scratch.ipynb"


# Exercise 1.1: RMSNorm.


def rms_norm_right(x, weight, eps):
    norm = RMSNorm(x.shape[-1], eps).to(weight.dtype)
    norm.weight.data = weight
    return norm(x)


def rms_norm_rsqrt(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_without_eps(x, weight, eps):
    # Wrong: forgets eps, so inputs near zero are blown up to RMS 1 (and a zero row becomes NaN).
    x32 = x.float()
    return weight * (x32 / x32.pow(2).mean(-1, keepdim=True).sqrt()).to(x.dtype)


def rms_norm_as_layer_norm(x, weight, eps):
    # Wrong: subtracts the mean first (that is LayerNorm without a bias, not RMSNorm).
    x32 = x.float() - x.float().mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_eps_outside_sqrt(x, weight, eps):
    # Wrong: adds eps to the RMS instead of to the mean of squares: x / (sqrt(mean(x^2)) + eps).
    x32 = x.float()
    return weight * (x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(x.dtype)


def rms_norm_in_input_dtype(x, weight, eps):
    # Wrong: no float32 upcast; in fp16 the square of an activation above 256 overflows to inf and the row becomes 0.
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rms_norm_in_place(x, weight, eps):
    # Wrong: x.float() IS x when x is already float32, so `*=` normalizes the caller's tensor in place (in the model
    # that is the residual stream, which is still needed after the norm). The returned value is right.
    x32 = x.float()
    x32 *= torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm_whole_tensor(x, weight, eps):
    # Wrong: the mean of squares over every element (no dim), not over each row's C features.
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean() + eps)).to(x.dtype)


RIGHT_ANSWERS += [
    pytest.param(grading.check_rmsnorm, rms_norm_right, id="1.1-reference"),
    pytest.param(grading.check_rmsnorm, rms_norm_rsqrt, id="1.1-rsqrt"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_rmsnorm, rms_norm_without_eps, id="1.1-no-eps"),
    pytest.param(grading.check_rmsnorm, rms_norm_as_layer_norm, id="1.1-layernorm"),
    pytest.param(grading.check_rmsnorm, rms_norm_eps_outside_sqrt, id="1.1-eps-outside-sqrt"),
    pytest.param(grading.check_rmsnorm, rms_norm_in_input_dtype, id="1.1-no-fp32-upcast"),
    pytest.param(grading.check_rmsnorm, rms_norm_in_place, id="1.1-modifies-input-in-place"),
    pytest.param(grading.check_rmsnorm, rms_norm_whole_tensor, id="1.1-mean-over-whole-tensor"),
]


# Exercise 1.2: rotary position embeddings.


def rope_chunk(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return torch.cat([x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]], dim=-1)


def rope_adjacent_pairs(x, cos, sin):
    # Wrong: rotates adjacent pairs (x_0, x_1), (x_2, x_3)... (the GPT-J / original-paper layout) while the weights
    # were permuted for the half-split layout (x_i, x_{i+D/2}); a rotation all the same, so norms are preserved.
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


def rope_first_sequence_angles(x, cos, sin):
    # Wrong: drops the batch axis of cos/sin (as tutorials with one (T, D) table do), so every sequence in the
    # batch is rotated by the first sequence's positions.
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[0] + rotated * sin[0]


def rope_backwards(x, cos, sin):
    # Wrong: the partner's sign is on the wrong half, a rotation by -angle (norms and relative positions survive).
    half = x.shape[-1] // 2
    rotated = torch.cat([x[..., half:], -x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_overwrites_its_own_input(x, cos, sin):
    # Wrong: x1 is a view into `out`, so the second half is computed from the already rotated first half.
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    out = x.clone()
    x1, x2 = out[..., :half], out[..., half:]
    out[..., :half] = x1 * c - x2 * s
    out[..., half:] = x2 * c + x1 * s
    return out


def rope_returns_fp32(x, cos, sin):
    # Wrong: rotates in float32 for accuracy and forgets to cast back, so bf16 queries come back as float32.
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return x32 * cos[:, None].float() + rotated * sin[:, None].float()


def rope_in_fp32(x, cos, sin):
    half = x.shape[-1] // 2
    x32, c, s = x.float(), cos[:, None].float(), sin[:, None].float()
    return (x32 * c + torch.cat([-x32[..., half:], x32[..., :half]], dim=-1) * s).to(x.dtype)


RIGHT_ANSWERS += [
    pytest.param(grading.check_rope, apply_rope, id="1.2-reference"),
    pytest.param(grading.check_rope, rope_chunk, id="1.2-chunk"),
    pytest.param(grading.check_rope, rope_in_fp32, id="1.2-in-fp32"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_rope, rope_adjacent_pairs, id="1.2-adjacent-pairs"),
    pytest.param(grading.check_rope, rope_first_sequence_angles, id="1.2-first-sequence-angles"),
    pytest.param(grading.check_rope, rope_backwards, id="1.2-rotates-backwards"),
    pytest.param(grading.check_rope, rope_overwrites_its_own_input, id="1.2-overwrites-first-half"),
    pytest.param(grading.check_rope, rope_returns_fp32, id="1.2-returns-fp32"),
]


# Exercise 1.3: repeat K/V heads.


def repeat_kv_interleave(x, n_rep):
    return x.repeat_interleave(n_rep, dim=1)


def repeat_kv_tiled(x, n_rep):
    # Wrong: Tensor.repeat tiles the heads (0, 1, 2, 0, 1, 2...) instead of repeating each (0, 0, 1, 1...).
    return x.repeat(1, n_rep, 1, 1)


def repeat_kv_view_needs_contiguous(x, n_rep):
    # Wrong: .view needs compatible strides; the model's K/V are transposed views of (B, S, Hkv, D), where merging
    # B and Hkv is impossible, so this crashes on the tensors the model passes (and works on contiguous ones).
    B, Hkv, S, D = x.shape
    return x.view(B * Hkv, 1, S, D).expand(B * Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def repeat_kv_mqa_only(x, n_rep):
    # Wrong: expands the head axis directly, which only works for multi-query attention (one KV head).
    B, Hkv, S, D = x.shape
    return x.expand(B, Hkv * n_rep, S, D)


def repeat_kv_sequence_axis(x, n_rep):
    # Wrong: repeats axis 2, the head axis of a (B, S, H, D) layout, which here is the sequence axis.
    return x.repeat_interleave(n_rep, dim=2)


def repeat_kv_smollm_groups(x, n_rep):
    # Wrong: hard-codes SmolLM2-135M's group size (9 query heads / 3 KV heads) instead of using n_rep.
    return x.repeat_interleave(3, dim=1)


RIGHT_ANSWERS += [
    pytest.param(grading.check_repeat_kv, repeat_kv, id="1.3-reference"),
    pytest.param(grading.check_repeat_kv, repeat_kv_interleave, id="1.3-repeat-interleave"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_repeat_kv, repeat_kv_tiled, id="1.3-repeat-tiles-heads"),
    pytest.param(grading.check_repeat_kv, repeat_kv_view_needs_contiguous, id="1.3-view-on-transposed-kv"),
    pytest.param(grading.check_repeat_kv, repeat_kv_mqa_only, id="1.3-mqa-only"),
    pytest.param(grading.check_repeat_kv, repeat_kv_sequence_axis, id="1.3-repeats-sequence-axis"),
    pytest.param(grading.check_repeat_kv, repeat_kv_smollm_groups, id="1.3-hard-coded-group-size"),
]


# Exercise 1.4: top-p filtering.


def top_p_unsorted_softmax(logits, p):
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= p
    return logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))


def top_p_without_crossing_token(logits, p):
    # Wrong: keeps only tokens whose cumulative mass stays <= p, dropping the token that crosses p.
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative > p
    drop_sorted[..., 0] = False
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def top_p_no_shortcut_for_one(logits, p):
    # Wrong: no `p >= 1` shortcut. On a real vocabulary the float32 cumulative sum reaches 1.0 long before the
    # tail, so p = 1.0 drops thousands of tokens it should keep.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def top_p_strict_comparison(logits, p):
    # Wrong: `>` where `>=` is meant (the shifted-mask recipe of many tutorials): when the more likely tokens hold
    # exactly p, it keeps one token more than the smallest set.
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs > p
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def top_p_unstable_softmax(logits, p):
    # Wrong: probabilities as exp(logits) / sum without subtracting the max: exp overflows to inf for logits above
    # ~88 (confident float32 logits, or any logits divided by a small temperature) and the row turns into NaN.
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    e = sorted_logits.exp()
    probs = e / e.sum(-1, keepdim=True)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def top_p_gather_back(logits, p):
    # Wrong: sends the decision back to vocabulary order with gather, which applies the sort permutation a second
    # time instead of inverting it.
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    return logits.masked_fill(drop_sorted.gather(-1, order), float("-inf"))


def top_p_ascending(logits, p):
    # Hugging Face's TopPLogitsWarper: sort ascending, drop the least likely tokens while their mass is <= 1 - p.
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)
    drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p
    drop_sorted[..., -1] = False
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


RIGHT_ANSWERS += [
    pytest.param(grading.check_top_p, apply_top_p, id="1.4-reference"),
    pytest.param(grading.check_top_p, top_p_unsorted_softmax, id="1.4-softmax-then-sort"),
    pytest.param(grading.check_top_p, top_p_ascending, id="1.4-ascending"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_top_p, top_p_without_crossing_token, id="1.4-drops-crossing-token"),
    pytest.param(grading.check_top_p, top_p_no_shortcut_for_one, id="1.4-no-shortcut-at-p-1"),
    pytest.param(grading.check_top_p, top_p_strict_comparison, id="1.4-strict-comparison"),
    pytest.param(grading.check_top_p, top_p_unstable_softmax, id="1.4-softmax-overflows"),
    pytest.param(grading.check_top_p, top_p_gather_back, id="1.4-gather-instead-of-scatter"),
]


# Exercise 1.5: the SwiGLU MLP.


def swiglu_right(x, gate_w, up_w, down_w):
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def swiglu_matmul(x, gate_w, up_w, down_w):
    g = x @ gate_w.T
    return (g * torch.sigmoid(g) * (x @ up_w.T)) @ down_w.T


def swiglu_in_fp32(x, gate_w, up_w, down_w):
    x32, g, u, d = x.float(), gate_w.float(), up_w.float(), down_w.float()
    return F.linear(F.silu(F.linear(x32, g)) * F.linear(x32, u), d).to(x.dtype)


def swiglu_gate_on_up(x, gate_w, up_w, down_w):
    # Wrong: applies silu to the up projection instead of the gate.
    return F.linear(F.linear(x, gate_w) * F.silu(F.linear(x, up_w)), down_w)


def swiglu_sigmoid_gate(x, gate_w, up_w, down_w):
    # Wrong: sigmoid(gate) * up is the original GLU; SwiGLU's gate is silu(z) = z * sigmoid(z).
    return F.linear(torch.sigmoid(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def swiglu_silu_of_product(x, gate_w, up_w, down_w):
    # Wrong: silu applied after the product, silu(gate(x) * up(x)), instead of to the gate alone.
    return F.linear(F.silu(F.linear(x, gate_w) * F.linear(x, up_w)), down_w)


def swiglu_overflowing_sigmoid(x, gate_w, up_w, down_w):
    # Wrong: sigmoid written as e^z / (1 + e^z): for a large gate value e^z overflows to inf and inf / inf is NaN
    # (in float32 above z ~ 88, in float16 already above z ~ 11). 1 / (1 + e^-z) or F.silu is safe.
    g = F.linear(x, gate_w)
    return F.linear(g * g.exp() / (1 + g.exp()) * F.linear(x, up_w), down_w)


def swiglu_returns_fp32(x, gate_w, up_w, down_w):
    # Wrong: computes in float32 for accuracy and forgets to cast back, so bf16 activations come back as float32.
    x, gate_w, up_w, down_w = x.float(), gate_w.float(), up_w.float(), down_w.float()
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


RIGHT_ANSWERS += [
    pytest.param(grading.check_swiglu_mlp, swiglu_right, id="1.5-reference"),
    pytest.param(grading.check_swiglu_mlp, swiglu_matmul, id="1.5-matmul"),
    pytest.param(grading.check_swiglu_mlp, swiglu_in_fp32, id="1.5-in-fp32"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_swiglu_mlp, swiglu_gate_on_up, id="1.5-silu-on-up"),
    pytest.param(grading.check_swiglu_mlp, swiglu_sigmoid_gate, id="1.5-glu-sigmoid-gate"),
    pytest.param(grading.check_swiglu_mlp, swiglu_silu_of_product, id="1.5-silu-of-product"),
    pytest.param(grading.check_swiglu_mlp, swiglu_overflowing_sigmoid, id="1.5-sigmoid-overflows"),
    pytest.param(grading.check_swiglu_mlp, swiglu_returns_fp32, id="1.5-returns-fp32"),
]


# Worked examples: the notebook's markdown above each exercise shows one small input and the output the package's
# reference gives for it. Each example is the code the markdown shows; its output is computed here, so the text
# cannot drift from the reference (regenerate the markdown from WORKED_EXAMPLES when an example changes).


def _fmt(t: torch.Tensor) -> str:
    """A tensor as nested lists with 4 decimals, as the notebook prints it: [[0.3651, -inf], ...]."""
    if t.dim() == 0:
        v = t.item()
        return "-inf" if v == float("-inf") else f"{v:.4f}".replace("-0.0000", "0.0000")
    return "[" + ", ".join(_fmt(row) for row in t) + "]"


def _mlp_ref(x, gate_w, up_w, down_w, hidden_only=False):
    I, C = gate_w.shape
    mlp = MLP(ModelConfig.tiny(hidden_size=C, intermediate_size=I, num_heads=1, num_kv_heads=1))
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data = gate_w, up_w, down_w
    with torch.no_grad():
        return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x) if hidden_only else mlp(x)


def _claims_1_1(ns):  # the comments' numbers
    assert ns["x"][0].pow(2).mean().item() == 7.5 and not ns["x"][1].any()


def _claims_1_2(ns):
    assert torch.allclose(ns["inv_freq"], 1.0 / 10000 ** (torch.arange(0, 4, 2) / 4))


def _claims_1_4(ns):
    assert torch.allclose(ns["logits"].softmax(-1), torch.tensor([[0.5, 0.1, 0.25, 0.15]]))


def _claims_1_5(ns):
    assert torch.equal(F.linear(ns["x"], ns["gate_w"]), torch.tensor([1.0, -1.0, 0.0]))
    assert torch.equal(F.linear(ns["x"], ns["up_w"]), torch.tensor([2.0, -1.0, 2.0]))


# number -> (the example's code, the call the markdown shows, the reference's result, what the code's comments claim,
# and optionally a line with an intermediate result: (label, the reference's value)).
WORKED_EXAMPLES = {
    "1.1": (
        (
            "x = torch.tensor([[1.0, 2.0, 3.0, 4.0],\n"
            "                  [0.0, 0.0, 0.0, 0.0]])  # (2, 4): mean(x^2) of row 0 is 7.5; row 1 is all zero\n"
            "weight = torch.tensor([1.0, 1.0, 2.0, 0.5])"
        ),
        "rms_norm(x, weight, 1e-6)",
        lambda ns: rms_norm_right(ns["x"], ns["weight"], 1e-6),
        _claims_1_1,
        None,
    ),
    "1.2": (
        (
            "inv_freq = torch.tensor([1.0, 0.01])  # D = 4, theta = 10000: 10000 ** (-0 / 4), 10000 ** (-2 / 4)\n"
            "cos, sin = rope_cos_sin(torch.tensor([[0, 1]]), inv_freq, torch.float32)  # positions 0, 1: (1, 2, 4)\n"
            "x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0],\n"
            "                    [1.0, 2.0, 3.0, 4.0]]]])  # (B, H, T, D) = (1, 1, 2, 4): one vector at both positions"
        ),
        "apply_rope(x, cos, sin)[0, 0]",
        lambda ns: apply_rope(ns["x"], ns["cos"], ns["sin"])[0, 0],
        _claims_1_2,
        None,
    ),
    "1.3": (
        "x = torch.tensor([10.0, 20.0]).view(1, 2, 1, 1)  # (B, Hkv, S, D) = (1, 2, 1, 1): KV heads 10 and 20",
        "repeat_kv(x, 3)[0, :, 0, 0]",
        lambda ns: repeat_kv(ns["x"], 3)[0, :, 0, 0],
        lambda ns: None,
        None,
    ),
    "1.4": (
        "logits = torch.tensor([[0.5, 0.1, 0.25, 0.15]]).log()  # probabilities 0.5, 0.1, 0.25, 0.15",
        "top_p_filter(logits, 0.7)",
        lambda ns: apply_top_p(ns["logits"], 0.7),
        _claims_1_4,
        None,
    ),
    "1.5": (
        (
            "x = torch.tensor([1.0, -1.0])  # C = 2\n"
            "gate_w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (I, C) = (3, 2): gate(x) = [1, -1, 0]\n"
            "up_w = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # up(x) = [2, -1, 2]\n"
            "down_w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # (C, I) = (2, 3)"
        ),
        "swiglu_mlp(x, gate_w, up_w, down_w)",
        lambda ns: _mlp_ref(ns["x"], ns["gate_w"], ns["up_w"], ns["down_w"]),
        _claims_1_5,
        ("silu(gate(x)) * up(x)", lambda ns: _mlp_ref(ns["x"], ns["gate_w"], ns["up_w"], ns["down_w"], True)),
    ),
}


def worked_example(number: str) -> str:
    """The fenced code block the markdown above exercise `number` shows: the inputs, the call, the reference's output."""
    code, call, reference, claims, intermediate = WORKED_EXAMPLES[number]
    ns = {"torch": torch, "rope_cos_sin": rope_cos_sin}
    exec(code, ns)  # noqa: S102 -- the example's own code, so the markdown shows exactly what ran
    claims(ns)
    lines = [code]
    if intermediate is not None:
        label, value = intermediate
        lines.append(f"# {label} = {_fmt(value(ns))}")
    lines += [call, f"# -> {_fmt(reference(ns))}"]
    return "```python\n" + "\n".join(lines) + "\n```"


def _markdown_above_exercises() -> dict[str, str]:
    cells = read_notebook(SOLUTION).cells
    found = {}
    for above, cell in pairwise(cells):
        header = exercise_header(cell.source) if cell.cell_type == "code" else None
        if header and above.cell_type == "markdown":
            found[header[0]] = above.source
    return found


@pytest.mark.parametrize("number", sorted(WORKED_EXAMPLES))
def test_worked_example_matches_the_reference(number):
    markdown = _markdown_above_exercises()
    assert number in markdown, f"no markdown cell right above exercise {number} in {SOLUTION.name}"
    block = worked_example(number)
    assert block in markdown[number], (
        f"the worked example above exercise {number} is not what the reference gives; it should read:\n{block}"
    )
