"""Distillation (minillm.distill): loss properties, the training loop, depth pruning, checkpoints and bad inputs.

Everything runs on tiny random models (``ModelConfig.tiny()``: V=256, C=64, 2 layers) with a small fake tokenizer,
in a few seconds; the real SmolLM2 is only in the tests marked slow.
"""

import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import varied_tiny_model
from transformers import BatchEncoding

import minillm
from minillm.distill import (
    block_influence,
    check_held_out,
    distill,
    drop_layers,
    hf_config,
    hidden_state_loss,
    kd_loss,
    layers_to_drop,
    lr_at,
    mixed_loss,
    model_fingerprint,
    next_token_loss,
    prompts_from_text,
    sample_batch,
    save_checkpoint,
    student_config,
    teacher_corpus,
    token_stream,
    width_student,
)
from minillm.model import Transformer
from minillm.prune import count_parameters, prune_heads, prune_mlp_channels

V = 256


class ByteTokenizer:
    """Byte b is token 3 + b % 253 (ids 0-2 stay special, V=256): enough of the transformers tokenizer API
    (``__call__``, ``decode``, ``len``, the special ids) for distill and the engine on tiny models."""

    eos_token_id, pad_token_id = 2, 0
    name_or_path = "bytes"

    def __len__(self):
        return V

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [3 + b % (V - 3) for b in text.encode()]
        return BatchEncoding({"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def tok():
    return ByteTokenizer()


tiny = varied_tiny_model  # a tiny random Llama whose layers matter (tests/conftest.py)


TRAIN_TEXT = "the quick brown fox jumps over the lazy dog; a stitch in time saves nine. " * 20


# -- losses ---------------------------------------------------------------------------------------------------


def kl_reference(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    """T² KL(p || q) in float64 with torch's own kl_div, per token."""
    p = F.softmax(zt.double() / T, -1)
    log_q = F.log_softmax(zs.double() / T, -1)
    return T**2 * F.kl_div(log_q, p, reduction="none").sum(-1)


def test_kd_loss_matches_kl_div_and_is_zero_for_equal_logits():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(3, 5, 17, generator=g), torch.randn(3, 5, 17, generator=g) * 3
    for T in (0.5, 1.0, 4.0):
        torch.testing.assert_close(kd_loss(zs, zt, T).double(), kl_reference(zs, zt, T).mean(), rtol=1e-5, atol=1e-6)
    assert kd_loss(zt, zt, 2.0).abs() < 1e-6
    assert kd_loss(zs, zt, 1.0) > 0


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_kd_gradient_is_t_times_q_minus_p(T):
    # Hinton eq. 2 with the T² factor: dL/dz_s = T (q - p) / N, q and p the softened student and teacher.
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 11, generator=g, dtype=torch.float64)
    kd_loss(zs, zt, T).backward()
    expected = T * (F.softmax(zs.detach() / T, -1) - F.softmax(zt / T, -1)) / 4
    torch.testing.assert_close(zs.grad, expected)
    # And against finite differences (gradcheck; float64 stays float64 inside).
    assert torch.autograd.gradcheck(lambda z: kd_loss(z, zt, T), (zs.detach().requires_grad_(),))


def test_kd_high_temperature_limit():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(2, 13, generator=g), torch.randn(2, 13, generator=g)
    T = 1e3
    # Softened distributions tend to uniform and the KL itself to 0 ...
    assert (F.softmax(zt / T, -1) - 1 / 13).abs().max() < 1e-3
    assert kd_loss(zs, zt, T) / T**2 < 1e-6
    # ... while T² KL tends to matching centered logits: sum_i (d_i - mean d)² / (2V).
    d = (zt - zs).double()
    limit = ((d - d.mean(-1, keepdim=True)).pow(2).sum(-1) / (2 * 13)).mean()
    torch.testing.assert_close(kd_loss(zs.double(), zt.double(), T), limit, rtol=1e-3, atol=0)


def test_kd_low_temperature_limit():
    zs = torch.tensor([[1.0, 3.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]], dtype=torch.float64)
    zt = torch.tensor([[4.0, 0.0, 1.0, 0.0], [0.0, 1.0, 7.0, 0.0]], dtype=torch.float64)
    T = 1e-3
    # Row 0: the teacher's argmax (0) is not the student's (1): T KL -> z_s[1] - z_s[0] = 2. Row 1: they agree: -> 0.
    per_token = kl_reference(zs, zt, T) / T
    torch.testing.assert_close(per_token, torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-2, rtol=0)
    torch.testing.assert_close(kd_loss(zs, zt, T).double() / T, per_token.mean(), rtol=1e-3, atol=1e-3)


def test_one_hot_teacher_is_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, V, generator=g)
    ids = torch.randint(0, V, (2, 6), generator=g)
    one_hot = torch.full((2, 5, V), float("-inf")).scatter(-1, ids[:, 1:, None], 0.0)  # teacher sure of token t+1
    torch.testing.assert_close(kd_loss(logits[:, :-1], one_hot, 1.0), next_token_loss(logits, ids))
    torch.testing.assert_close(next_token_loss(logits, ids), F.cross_entropy(logits[:, :-1].reshape(-1, V),
                                                                               ids[:, 1:].reshape(-1)))


def test_mixed_loss_weights():
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(2, 5, V, generator=g), torch.randn(2, 5, V, generator=g)
    ids = torch.randint(0, V, (2, 5), generator=g)
    kd, ce = kd_loss(zs, zt, 2.0), next_token_loss(zs, ids)
    for w in (0.0, 0.3, 1.0):
        total, parts = mixed_loss(zs, zt if w > 0 else None, ids, w, 2.0)
        torch.testing.assert_close(total, w * kd + (1 - w) * ce)
        assert set(parts) == {"kd", "ce"} - ({"kd"} if w == 0 else set()) - ({"ce"} if w == 1 else set())
    with pytest.raises(ValueError, match="kd_weight"):
        mixed_loss(zs, zt, ids, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(zs, zt, 0.0)
    with pytest.raises(ValueError, match="one vocabulary"):
        kd_loss(zs, zt[..., :-1])


def test_hidden_state_loss():
    h = torch.randn(2, 3, 8)
    assert hidden_state_loss([h], [h]) == 0
    torch.testing.assert_close(hidden_state_loss([torch.zeros_like(h)], [h]), torch.tensor(1.0))
    torch.testing.assert_close(hidden_state_loss([h * 0, h], [h, h]), torch.tensor(0.5))


# -- schedule, data ---------------------------------------------------------------------------------------------


def test_schedule_warms_up_then_decays_by_cosine():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(1, 101)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # then never rises
    assert lrs[-1] == pytest.approx(0.1)  # ends at min_lr_ratio * lr
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)  # half-way through the cosine: the mean


def test_token_stream_and_batches(tok):
    stream = token_stream(tok, ["ab", "cde"])
    assert stream.tolist() == [3 + 97, 3 + 98, 2, 3 + 99, 3 + 100, 3 + 101, 2]  # EOS after each document
    batch = sample_batch(torch.arange(50), 4, 8, torch.Generator().manual_seed(0))
    assert batch.shape == (4, 8) and (batch.diff(dim=1) == 1).all()  # contiguous windows
    again = sample_batch(torch.arange(50), 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        sample_batch(torch.arange(5), 1, 8, torch.Generator())


def test_prompts_from_shipped_text():
    prompts = prompts_from_text(num_words=6)
    assert len(prompts) >= 10 and all(len(p.split()) == 6 for p in prompts)


def test_held_out_text_is_refused(tok):
    eval_text = "held out passage " * 10
    check_held_out(token_stream(tok, TRAIN_TEXT), tok, eval_text)
    with pytest.raises(ValueError, match="held-out"):
        check_held_out(token_stream(tok, ["intro ", eval_text]), tok, eval_text)


def test_teacher_corpus_is_cached_and_reproducible(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    teacher = tiny()
    texts = teacher_corpus(teacher, tok, ["hello", "world"], max_tokens=5, num_samples=2, progress=False)
    assert len(texts) == 4 and texts[0].startswith("hello") and texts[2].startswith("world")
    files = list((tmp_path / "distill").glob("teacher-*.json"))
    assert len(files) == 1 and not list((tmp_path / "distill").glob(".*.tmp"))
    assert json.loads(files[0].read_text())["texts"] == texts
    # Same inputs: read back (not regenerated); fresh generation with the same seeds gives the same texts.
    assert teacher_corpus(teacher, tok, ["hello", "world"], max_tokens=5, num_samples=2, progress=False) == texts
    assert teacher_corpus(teacher, tok, ["hello", "world"], max_tokens=5, num_samples=2, cache=False,
                          progress=False) == texts
    # Another teacher or other sampling parameters: another entry.
    teacher_corpus(tiny(seed=1), tok, ["hello", "world"], max_tokens=5, num_samples=2, progress=False)
    teacher_corpus(teacher, tok, ["hello", "world"], max_tokens=5, num_samples=2, temperature=0.5, progress=False)
    assert len(list((tmp_path / "distill").glob("teacher-*.json"))) == 3
    assert model_fingerprint(teacher) == model_fingerprint(copy.deepcopy(teacher)) != model_fingerprint(tiny(1))


# -- depth pruning ----------------------------------------------------------------------------------------------


def test_block_influence_and_drop_layers():
    model = tiny(num_layers=4)
    ids = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(0))
    influence = block_influence(model, ids)
    assert influence.shape == (4,) and (influence >= 0).all() and (influence <= 2).all()
    # A layer that adds nothing to its input has influence 0, and is the one dropped.
    with torch.no_grad():
        model.layers[2].self_attn.o_proj.weight.zero_()
        model.layers[2].mlp.down_proj.weight.zero_()
    influence = block_influence(model, ids)
    assert influence[2] < 1e-6 and layers_to_drop(influence, 1) == [2]
    before = model(ids)
    kept = drop_layers(model, [2])
    assert kept == [0, 1, 3] and model.config.num_layers == 3 and len(model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.layers] == [0, 1, 2]
    torch.testing.assert_close(model(ids), before)  # an identity layer was removed: same logits
    # The shallower model still generates through the paged engine (KV cache sized from the new config), greedily
    # the same tokens as argmax over full recomputation.
    params = minillm.SamplingParams(max_tokens=4, ignore_eos=True)
    out = minillm.LLM(model, tokenizer=ByteTokenizer()).generate([[5, 6, 7]], params)[0].token_ids
    seq = [5, 6, 7]
    for _ in range(4):
        seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    assert out == seq[3:]
    with pytest.raises(ValueError, match="distinct ints"):
        drop_layers(model, [3])
    with pytest.raises(ValueError, match="cannot drop all"):
        drop_layers(model, [0, 1, 2])
    with pytest.raises(ValueError, match="num_drop"):
        layers_to_drop(influence, 4)


# -- the training loop ------------------------------------------------------------------------------------------


def pruned_student(teacher: Transformer) -> Transformer:
    student = copy.deepcopy(teacher)
    prune_heads(student, 0.5, unit="kv_group", score="magnitude")
    prune_mlp_channels(student, 0.5, score="magnitude")
    return student


def test_distill_lowers_the_kd_loss_and_leaves_the_teacher_alone(tok):
    teacher = tiny()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = pruned_student(teacher)
    history = distill(student, teacher, tok, steps=30, data=TRAIN_TEXT, batch_size=4, seq_len=32, lr=3e-3,
                      eval_every=10, eval_text=TRAIN_TEXT[:300], eval_tokens=128, freeze_embedding=False,
                      progress=False)
    assert history.steps == list(range(1, 31)) and len(history.kd_losses) == 30 and not history.ce_losses
    assert sum(history.kd_losses[-5:]) < 0.5 * sum(history.kd_losses[:5])
    assert history.eval_steps == [0, 10, 20, 30] and all(math.isfinite(p) for p in history.perplexities)
    assert all(t > 0 for t in history.tokens_per_s) and history.seconds > 0
    assert not student.training and not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_distill_is_reproducible_and_freezes_the_embedding(tok):
    teacher = tiny()
    runs = []
    for _ in range(2):
        student = pruned_student(teacher)
        embedding = student.embed_tokens.weight.clone()
        runs.append(distill(student, teacher, tok, steps=3, data=TRAIN_TEXT, batch_size=2, seq_len=16, lr=1e-3,
                            kd_weight=0.5, eval_text=TRAIN_TEXT[:100], eval_tokens=64, progress=False))
        assert torch.equal(student.embed_tokens.weight, embedding)  # freeze_embedding=True by default
    assert runs[0].losses == runs[1].losses and runs[0].perplexities == runs[1].perplexities
    assert len(runs[0].kd_losses) == len(runs[0].ce_losses) == 3


def test_next_token_training_does_not_need_the_teacher(tok, monkeypatch):
    teacher = tiny()
    student = pruned_student(teacher)
    monkeypatch.setattr(teacher, "forward", lambda *a, **k: pytest.fail("the teacher ran with kd_weight=0"))
    history = distill(student, teacher, tok, steps=2, data=TRAIN_TEXT, batch_size=2, seq_len=16, kd_weight=0.0,
                      eval_text=TRAIN_TEXT[:100], eval_tokens=64, progress=False)
    assert len(history.ce_losses) == 2 and not history.kd_losses


def test_gradient_clipping_is_respected(tok, monkeypatch):
    teacher = tiny()
    student = pruned_student(teacher)
    seen = []
    step = torch.optim.AdamW.step

    def record_then_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record_then_step)
    history = distill(student, teacher, tok, steps=3, data=TRAIN_TEXT, batch_size=2, seq_len=16, lr=1e-3,
                      max_grad_norm=1e-3, eval_text=TRAIN_TEXT[:100], eval_tokens=64, progress=False)
    assert all(n > 1e-3 for n in history.grad_norms)  # the raw norms were above the threshold ...
    assert all(n <= 1e-3 * (1 + 1e-4) for n in seen)  # ... and the optimizer saw clipped gradients


def test_hidden_state_matching_after_drop_layers(tok):
    teacher = tiny(num_layers=3)
    student = copy.deepcopy(teacher)
    kept = drop_layers(student, [1])
    history = distill(student, teacher, tok, steps=2, data=TRAIN_TEXT, batch_size=2, seq_len=16, hidden_weight=1.0,
                      layer_map=kept, eval_text=TRAIN_TEXT[:100], eval_tokens=64, progress=False)
    assert len(history.losses) == 2 and history.losses[0] > history.kd_losses[0]  # the hidden-state term counts
    with pytest.raises(ValueError, match="layer_map"):
        distill(student, teacher, tok, steps=1, data=TRAIN_TEXT, hidden_weight=1.0, layer_map=[0, 7],
                progress=False)


# -- checkpoints ------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_of_a_pruned_student(tmp_path, smollm_tokenizer):
    teacher = tiny(num_layers=3)
    student = pruned_student(teacher)
    drop_layers(student, [1])
    config = student.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.intermediate_size) == (2, 2, 1, 64)
    folder = save_checkpoint(student, smollm_tokenizer, tmp_path / "student")
    written = json.loads((folder / "config.json").read_text())
    assert written == hf_config(config, torch.float32) and written["head_dim"] == 16
    assert written["num_attention_heads"] * written["head_dim"] != written["hidden_size"]  # why head_dim is written
    loaded, _ = minillm.load_model(folder, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.config.to_dict() == {**config.to_dict(), "name": "llama"}
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(ids), student(ids), rtol=0, atol=0)
    assert minillm.LLM(str(folder)).generate([[5, 6, 7]], minillm.SamplingParams(max_tokens=3))[0].token_ids


@pytest.fixture(scope="module")
def smollm_tokenizer():
    """A small real transformers tokenizer (word level, V tokens), which save_pretrained writes and load_model reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {f"<t{i}>": i for i in range(26, V)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<t26>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<t2>", unk_token="<t26>")


# -- bad input --------------------------------------------------------------------------------------------------


def test_callback_sees_every_step_and_evaluation(tok):
    teacher = tiny()
    seen = []
    distill(pruned_student(teacher), teacher, tok, steps=4, data=TRAIN_TEXT, eval_every=2, progress=False,
            callback=lambda h: seen.append((h.steps[-1], list(h.eval_steps))))
    assert seen == [(1, [0]), (2, [0, 2]), (3, [0, 2]), (4, [0, 2, 4])]


def test_bad_inputs_are_refused(tok):
    teacher = tiny()
    student = pruned_student(teacher)
    kwargs = dict(data=TRAIN_TEXT, progress=False)
    with pytest.raises(ValueError, match="is the teacher object"):
        distill(teacher, teacher, tok, steps=1, **kwargs)
    with pytest.raises(ValueError, match="shares"):
        distill(copy.copy(teacher), teacher, tok, steps=1, **kwargs)  # a shallow copy trains the same tensors
    with pytest.raises(ValueError, match="different vocabularies"):
        distill(tiny(vocab_size=300), teacher, tok, steps=1, **kwargs)
    with pytest.raises(ValueError, match="different tokenizers"):
        distill(tiny(eos_token_ids=[7]), teacher, tok, steps=1, **kwargs)
    with pytest.raises(ValueError, match="not the tokenizer"):
        distill(tiny(vocab_size=200), tiny(seed=1, vocab_size=200), tok, steps=1, **kwargs)
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="steps"):
            distill(student, teacher, tok, steps=bad, **kwargs)
    for bad in (0.0, -1e-3):
        with pytest.raises(ValueError, match="lr"):
            distill(student, teacher, tok, steps=1, lr=bad, **kwargs)
    with pytest.raises(ValueError, match="temperature"):
        distill(student, teacher, tok, steps=1, temperature=0, **kwargs)
    with pytest.raises(ValueError, match="held-out"):
        from minillm.eval import load_eval_text

        distill(student, teacher, tok, steps=1, data=load_eval_text()[:2000], progress=False)


# -- the real model -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pruned_smollm_distills_saves_and_serves(smollm, tmp_path):
    """SmolLM2 cut in width and depth, two distillation steps, saved, loaded back by load_model and LLM."""
    from minillm.distill.students import (
        depth_student,
        parameter_fraction,
        width_student,
    )
    from minillm.eval import calibration_batch

    teacher, tok = smollm
    calibration = calibration_batch(tok, None, num_tokens=256, seq_len=128)
    narrow = width_student(teacher, 1 / 3, 0.5, calibration=calibration)
    student, kept = depth_student(narrow, 10, calibration)
    assert len(kept) == 20 and 0.5 < parameter_fraction(student, teacher) < 0.6
    assert parameter_fraction(student, teacher, count_embedding=False) < parameter_fraction(student, teacher)
    history = distill(student, teacher, tok, steps=2, batch_size=1, seq_len=32, eval_tokens=64,
                      save_to=tmp_path / "student", progress=False)
    assert len(history.kd_losses) == 2 and len(history.perplexities) == 2
    loaded, loaded_tok = minillm.load_model(tmp_path / "student", device="cpu", dtype=torch.float32, progress=False)
    c = loaded.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == (20, 6, 3, 64, 768)
    ids = tok("The water cycle is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), student(ids), rtol=0, atol=0)
    assert loaded_tok("hello").input_ids == tok("hello").input_ids
    # The folder is a plain Hugging Face checkpoint: transformers builds the pruned shape (head_dim 64 with 6 heads
    # in a 576-wide model) and computes the same logits.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - student(ids)).abs().max() < 1e-3
    greedy = minillm.SamplingParams(max_tokens=5, ignore_eos=True)
    served = minillm.LLM(str(tmp_path / "student")).generate(["The water cycle is"], greedy)[0].token_ids
    assert served == minillm.LLM(student, tokenizer=tok).generate(["The water cycle is"], greedy)[0].token_ids


def test_bench_topic_is_found():
    from minillm.bench.__main__ import find_topics

    topics = find_topics()
    assert callable(getattr(topics["distill"], "main", None)), topics["distill"]  # an import error shows here
    with pytest.raises(SystemExit) as exit_info:
        topics["distill"].main(["--help"])
    assert exit_info.value.code == 0


def test_student_config_predicts_the_pruned_shapes():
    teacher = tiny(num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=40)
    student = width_student(teacher, head_fraction=0.25, mlp_fraction=0.3, calibration=torch.randint(0, 64, (2, 8)))
    drop_layers(student, [1])
    predicted = student_config(teacher.config, num_drop=1, head_fraction=0.25, mlp_fraction=0.3)
    assert predicted.num_parameters == count_parameters(student)
    for key in ("num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim"):
        assert getattr(predicted, key) == getattr(student.config, key), key
    with pytest.raises(ValueError, match="num_drop"):
        student_config(teacher.config, num_drop=4)
    with pytest.raises(ValueError, match="at least one"):
        student_config(teacher.config, head_fraction=1.0)
