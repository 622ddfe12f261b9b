"""The step profiler (chapter 10): regions and kernels of real engine steps, read back in one table."""

import pytest

import minillm
from minillm.fast.forward import PiecewiseForward
from minillm.fast.profiler import family, profile_decode_steps


class FakeTokenizer:
    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def test_a_decode_step_splits_into_python_kernels_and_gaps(varied_model):
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer())
    prof = profile_decode_steps(llm, batch_size=3, num_steps=2, prompt_len=5)
    assert llm.engine.block_manager.num_used_blocks == 0 and not llm.engine.has_unfinished()  # left clean
    assert prof.num_steps == 2 and set(prof.kernels["step"]) == {0, 1}
    summary = prof.summary().set_index("part")
    step_ms = prof.regions.query("region == 'step'")["dur_us"].sum() / 2e3
    assert summary["ms_per_step"].sum() == pytest.approx(step_ms, rel=1e-6)  # the parts add up to the step
    assert summary.loc["forward: matmul", "ms_per_step"] > 0
    L = varied_model.config.num_layers
    linears = prof.kernels.query("in_forward and name == 'aten::linear'")
    assert len(linears) == 2 * (7 * L + 1)  # q, k, v, o, gate, up, down per layer + the LM head, per step
    assert (prof.forward_gaps()["gap_us"] >= 0).all()


def test_fused_launches_count_as_one_kernel_each(varied_model):
    """Under the interpreter a Triton launch runs many torch ops; the profile counts the launch once."""
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer())
    eager = profile_decode_steps(llm, num_steps=1)
    llm.engine.model = PiecewiseForward(varied_model, "fused")
    fused = profile_decode_steps(llm, num_steps=1)
    L = varied_model.config.num_layers
    launches = fused.kernels.query("in_forward and family == 'fused (Triton)'")
    assert len(launches) == (2 * L + 1) + L + L  # add_rmsnorm per norm, rope_qk and silu_mul per layer
    assert fused.kernels_per_step() < eager.kernels_per_step() - 5 * L


@pytest.mark.parametrize("name,expected", [("aten::linear", "matmul"), ("ampere_sgemm_64x32", "matmul"),
                                           ("aten::scaled_dot_product_attention", "attention"),
                                           ("triton::rope_qk", "fused (Triton)"),
                                           ("aten::index_put_", "KV store / gather"),
                                           ("graph_1_cpp_fused_mul_silu_1", "fused (compiled)"),
                                           ("aten::mul", "elementwise / other")])
def test_kernel_families(name, expected):
    assert family(name) == expected


def test_bad_sizes_are_refused(varied_model):
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer())
    with pytest.raises(ValueError, match="batch_size"):
        profile_decode_steps(llm, batch_size=0)
    assert not llm.engine.has_unfinished()
