"""minillm.viz.spec: traces that reassemble the plain greedy output and leave the engine idle, the text twin's marks,
rejection sampling's histogram, the rollback against a real BlockManager, the sweep's rows, and that the figures and
the stepper build (no display)."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import minillm  # noqa: E402
from minillm import SamplingParams  # noqa: E402
from minillm.spec.verify import expected_tokens_per_step  # noqa: E402
from minillm.viz.spec import (  # noqa: E402
    VerificationStepper,
    hoeffding_bound,
    plot_rejection_rule,
    plot_rollback,
    plot_speculation_sweep,
    render_trace,
    rollback_demo,
    sample_histogram,
    sweep_table,
    trace_speculation,
    trace_stats,
    trace_summary,
    trace_text,
    verification_table,
)


class FakeTokenizer:
    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "min_expected_tokens": 0}
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
# Found by trying: with the varied tiny model each of these gets guesses accepted and rejected.
PROMPTS = [[6, 191, 169, 56, 13] * 5 + [6, 191], [155, 72, 250, 134, 88, 41, 211, 83, 116, 244, 127, 255]]

# A plain step, a correction after one accepted guess, a bonus after two, a stop inside the accepted guesses.
RECORDS = [
    {"step": 1, "kind": "plain", "position": 3, "context": [1, 2, 3], "guesses": [], "emitted": [5], "accepted": 0,
     "target": 5},
    {"step": 2, "kind": "verify", "position": 4, "context": [2, 3, 5], "guesses": [7, 8, 9], "emitted": [7, 4],
     "accepted": 1, "target": 4},
    {"step": 3, "kind": "verify", "position": 6, "context": [5, 7, 4], "guesses": [1, 2], "emitted": [1, 2, 3],
     "accepted": 2, "target": 3},
    {"step": 4, "kind": "verify", "position": 9, "context": [1, 2, 3], "guesses": [6, 6, 6], "emitted": [6],
     "accepted": 1, "target": None},
]


@pytest.fixture
def llm(varied_model):
    return minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=NGRAM, block_size=4)


def test_trace_reassembles_the_plain_greedy_output_and_leaves_the_engine_idle(varied_model, llm):
    plain = minillm.LLM(varied_model, tokenizer=FakeTokenizer())
    seen = {"accepted": 0, "rejected": 0}
    for prompt in PROMPTS:
        records = trace_speculation(llm, prompt, GREEDY)
        expected = plain.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
        assert [t for r in records for t in r["emitted"]] == expected
        for r in records:
            assert r["position"] == len(prompt) + sum(len(x["emitted"]) for x in records if x["step"] < r["step"])
            if r["kind"] == "verify":
                assert r["emitted"][: r["accepted"]] == r["guesses"][: r["accepted"]]
                assert len(r["emitted"]) == r["accepted"] + 1  # no stop token here: the target's token always lands
                seen["accepted"] += r["accepted"]
                seen["rejected"] += r["accepted"] < len(r["guesses"])
            else:
                assert r["guesses"] == [] and len(r["emitted"]) == 1
        stats, spec = trace_stats(records), llm.stats()["speculative"]
        assert (stats["proposed"], stats["accepted"], stats["verification_steps"]) == (
            spec["proposed"], spec["accepted"], spec["verification_steps"])
        assert stats["tokens"] == len(expected) and len(records) < len(expected)
        summary = trace_summary(records)
        assert summary["emitted"].sum() == len(expected) and summary["tokens so far"].iloc[-1] == len(expected)
        assert not llm.engine.has_unfinished() and llm.stats()["kv_blocks_used"] == 0
    assert seen["accepted"] > 0 and seen["rejected"] > 0, seen  # both colors show up

    with pytest.raises(ValueError, match="n=2"):
        trace_speculation(llm, PROMPTS[0], SamplingParams(n=2, temperature=1.0))


def test_trace_aborts_on_an_error_and_refuses_a_busy_engine(llm, monkeypatch):
    engine, step, calls = llm.engine, llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        trace_speculation(llm, PROMPTS[0], GREEDY)
    assert not engine.has_unfinished() and llm.stats()["kv_blocks_used"] == 0
    monkeypatch.undo()
    llm.add_request(PROMPTS[1], GREEDY)
    with pytest.raises(ValueError, match="running"):
        trace_speculation(llm, PROMPTS[0], GREEDY)


def test_trace_text_marks_each_role_and_is_deterministic(llm):
    tok = FakeTokenizer()
    assert trace_text(RECORDS, tok) == "<5>[<7>]~~<8>~~~~<9>~~{<4>}[<1>][<2>]{<3>}[<6>]"
    assert trace_text(RECORDS[:1], tok, prompt=[1, 2]) == "<1><2><5>"
    html = render_trace(RECORDS, tok, prompt=[1, 2])._repr_html_()
    assert "line-through" in html and "font-weight:bold" in html and "&lt;9&gt;" in html
    first, second = (trace_text(trace_speculation(llm, PROMPTS[1], GREEDY), tok) for _ in range(2))
    assert first == second and "{" in first


def test_verification_table_and_the_stepper(llm):
    results = [list(verification_table(r)["result"]) for r in RECORDS]
    assert results[0] == ["plain decode: no guess"]
    assert [x.split(":")[0] for x in results[1]] == ["accepted", "rejected", "discarded"]
    assert [x.split(":")[0] for x in results[2]] == ["accepted", "accepted", "bonus"]
    assert [x.split(":")[0] for x in results[3]] == ["accepted", "unused", "unused"]
    table = verification_table(RECORDS[1], FakeTokenizer())
    assert list(table["position"]) == [4, 5, 6] and list(table["target"]) == ["<7>", "<4>", ""]

    stepper = VerificationStepper(RECORDS, FakeTokenizer())
    assert len(stepper) == 3 and "step 2" in stepper.describe(0)
    assert len(VerificationStepper(RECORDS, only_verify=False)) == 4
    with pytest.raises(ValueError, match="no verification"):
        VerificationStepper(RECORDS[:1])
    pytest.importorskip("ipywidgets")
    box = VerificationStepper(trace_speculation(llm, PROMPTS[0], GREEDY), FakeTokenizer()).widget()
    (prev, nxt, slider), out = box.children[0].children, box.children[1]
    first = out.value
    nxt.click()
    assert slider.value == 1 and out.value != first
    prev.click()
    prev.click()
    assert slider.value == 0 and out.value == first


def test_sample_histogram_matches_p_for_the_right_sampler_only():
    p, q = torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    fig, table, dev = sample_histogram(p, q, num_samples=4000, seed=0)
    bound = hoeffding_bound(4000, 4, delta=1e-3)
    assert bound == pytest.approx(math.sqrt(math.log(8 / 1e-3) / 8000))
    assert dev < bound and list(table.columns) == ["token", "p", "q", "empirical"]
    assert table["empirical"].sum() == pytest.approx(1.0) and len(fig.axes) == 1
    plt.close(fig)

    def keeps_every_guess(proposed, target_probs, draft_probs, generator):
        return [proposed[0]]  # distributed as q, not p

    fig, _, wrong = sample_histogram(p, q, num_samples=4000, seed=0, sampler=keeps_every_guess)
    assert wrong > 0.25
    plt.close(fig)
    fig = plot_rejection_rule(p, q, guess=3, labels=list("abcd"))
    assert len(fig.axes) == 4
    plt.close(fig)
    with pytest.raises(ValueError, match="distribution"):
        plot_rejection_rule([0.5, 0.6], [0.5, 0.5], 0)


@pytest.mark.parametrize("prompt_len,k,accepted", [(6, 6, 1), (5, 3, 3), (1, 4, 0), (8, 1, 0)])
def test_rollback_demo_frees_the_blocks_of_rejected_guesses(prompt_len, k, accepted):
    bs = 4
    before, after, facts = rollback_demo(bs, prompt_len, k, accepted)
    assert facts["blocks_before"] == math.ceil((prompt_len + k) / bs) == len(before.block_table)
    kept = min(prompt_len + accepted + 1, len(before.block_table) * bs)
    assert facts["num_tokens_kept"] == kept and facts["blocks_after"] == math.ceil(kept / bs)
    assert facts["blocks_freed"] == before.block_table[facts["blocks_after"]:]
    assert after.block_table == before.block_table[: facts["blocks_after"]]
    assert facts["free_blocks_after"] - facts["free_blocks_before"] == len(facts["blocks_freed"])
    assert set(facts["blocks_freed"]) <= set(after.free_block_ids)
    roles = [s for block in before.slots for s in block]
    assert roles.count("accepted") == accepted and roles.count("rejected") == k - accepted
    assert [s for block in after.slots for s in block].count("rejected") == 0
    fig = plot_rollback(before, after, bs)
    assert len(fig.axes) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match="accepted"):
        rollback_demo(bs, prompt_len, k, k + 1)


def sweep_rows():
    rows = []
    for workload, alpha in [("repetitive", 0.8), ("chat", 0.3)]:
        for proposer in ["ngram", "draft"]:
            for k in [1, 2, 4]:
                for adaptive in [False, True]:
                    tpv = expected_tokens_per_step(alpha, k)
                    rows.append({"workload": workload, "proposer": proposer, "k": k, "batch": 1, "adaptive": adaptive,
                                 "tokens_per_s": 10 * tpv / (1 + 0.2 * k), "plain_tokens_per_s": 10.0,
                                 "speedup": tpv / (1 + 0.2 * k), "acceptance_rate": alpha,
                                 "tokens_per_verification": tpv, "extra": "ignored"})
    return rows


def test_sweep_table_and_figure_take_the_benchmark_rows():
    table = sweep_table(sweep_rows())
    assert len(table) == 24 and "predicted tokens_per_verification" in table.columns
    assert (table["predicted tokens_per_verification"] - table["tokens_per_verification"]).abs().max() < 1e-9
    k1 = table[(table["k"] == 1) & (table["workload"] == "chat")]
    assert (k1["predicted tokens_per_verification"] == 1.3).all()
    fig = plot_speculation_sweep(sweep_rows())
    assert len(fig.axes) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match="lacks"):
        sweep_table([{"workload": "chat"}])
    with pytest.raises(ValueError, match="batch=8"):
        plot_speculation_sweep(sweep_rows(), batch=8)
