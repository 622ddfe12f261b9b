"""Chapter 8 checks (distillation), used by solutions/08_distillation.ipynb.

Each check compares the learner's function with minillm's own (``minillm/distill/``) on fixed cases and on fresh
random ones (``ex.randn``/``ex.randint``/``ex.rng``, a new seed every run) and tests the properties whose failure
names the likely mistake: the T² factor and the direction of the KL, a teacher that rules tokens out (-inf logits),
prompt-major order and one seed per sample, one ``generate`` call for the whole corpus, a per-token cosine, sorted
layer indices, a frozen teacher, clipping the global gradient norm before the optimizer step. Every check has
plausible wrong answers in tests/answers/ch08_distillation.py that it must reject.

``CharTokenizer`` and ``tiny_teacher`` are the offline teacher of the checks and of the notebook's demos: a random
Llama of 256 tokens and a tokenizer of one token per character, so generating, pruning and training take milliseconds
on a CPU.

Shapes: B batch, T tokens, C model dim, V vocab, L layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.grading.framework import (
    Exercise,
    assert_close,
    assert_equal,
    assert_shape,
    exercise,
    generator,
    randint,
    randn,
)
from minillm.model import Transformer

__all__ = [  # the checks, re-exported by minillm.grading
    "check_kd_loss",
    "check_teacher_texts",
    "check_block_influence",
    "check_layers_to_drop",
    "check_train_step",
    "check_lr_at",
]

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------------------
# The tiny offline teacher: a random Llama and a tokenizer of one token per character.
# ---------------------------------------------------------------------------------------------------------------------

ALPHABET = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?-"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


class _Encoding(dict):
    @property
    def input_ids(self) -> list[int] | torch.Tensor:
        return self["input_ids"]


class CharTokenizer:
    """Character ``ALPHABET[k]`` is token ``3 + k`` (0 pad, 1 bos, 2 eos); the 256-token vocabulary of
    ``ModelConfig.tiny()`` wraps around the alphabet when decoding. Enough of the transformers tokenizer API
    (``__call__``, ``decode``, ``len``, the special ids) for ``minillm.LLM`` and ``minillm.distill``."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    name_or_path = "chars"
    vocab_size = 256

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True) -> _Encoding:
        unknown = 3 + ALPHABET.index("?")
        ids = [3 + ALPHABET.index(c) if c in ALPHABET else unknown for c in text]
        return _Encoding(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(
            ALPHABET[(i - 3) % len(ALPHABET)] if i >= 3 else ("" if skip_special_tokens else SPECIAL_TOKENS[i])
            for i in ids
        )


def tiny_teacher(seed: int = 0, num_layers: int = 4) -> Transformer:
    """A tiny random Llama (V=256, C=64, `num_layers` layers) on the CPU, in eval mode, the same for a seed everywhere.

    With the default initialization the tied embedding (std 1) dominates the residual stream and every position
    predicts its own token; smaller weights make the layers matter and the samples varied.
    """
    with torch.random.fork_rng(devices=[]):  # building the model draws from the global RNG: leave the learner's alone
        model = Transformer(ModelConfig.tiny(num_layers=num_layers)).eval()
    g = generator(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.15 if "embed" in name else 0.1))
    return model


def _description(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {str(x)[:80]}"


def _calling(fn: Callable) -> Callable:
    """`fn`, called on copies of its tensor arguments: a function that edits them in place (``logits /= T``) must
    not change the inputs the check compares with afterwards."""

    def call(*args):
        return fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])

    call.__name__ = getattr(fn, "__name__", "fn")
    return call


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 8.1: the temperature-scaled KD loss.
# ---------------------------------------------------------------------------------------------------------------------


def _kd_inputs(source: int | Exercise, shape: tuple[int, ...], student_scale: float = 2.0,
               teacher_scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits of `shape`, from a fixed seed or from the Exercise's fresh draws."""
    if isinstance(source, Exercise):
        return source.randn(*shape) * student_scale, source.randn(*shape) * teacher_scale
    return randn(*shape, seed=source) * student_scale, randn(*shape, seed=source + 1) * teacher_scale


def _rule_out(teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The teacher logits with the `mask`ed tokens at -inf, except each row's largest (a row keeps one token)."""
    keep = F.one_hot(teacher.argmax(dim=-1), teacher.shape[-1]).bool()
    return teacher.masked_fill(mask & ~keep, NEG_INF)


def check_kd_loss(fn: Callable) -> None:
    """Exercise 8.1. `fn(student_logits, teacher_logits, temperature) -> loss`: logit distillation.

    student_logits, teacher_logits: (..., V), any leading shape, every position one token. Returns a scalar tensor,
    ``T² * KL(softmax(teacher / T) || softmax(student / T))`` averaged over tokens, differentiable with respect to
    the student logits; teacher logits may be -inf (a ruled-out token adds 0). Same as ``minillm.distill.kd_loss``.
    """
    from minillm.distill import kd_loss

    loss_of = _calling(fn)

    def matches(student, teacher, temperature, what):
        expected = kd_loss(student.double(), teacher.double(), temperature)  # float64: no rounding of its own
        got = loss_of(student, teacher, temperature)
        assert_shape(got, (), what=f"{what}: the loss (a scalar tensor; .mean() over the tokens)")
        assert_close(got, expected, atol=1e-4, rtol=1e-4, check_dtype=False, what=f"{what}: the loss")

    def gradient_matches(student, teacher, temperature, what):
        s64 = student.double().requires_grad_()
        kd_loss(s64, teacher.double(), temperature).backward()
        s = student.clone().requires_grad_()
        got = fn(s, teacher.clone(), temperature)
        assert isinstance(got, torch.Tensor) and got.requires_grad, (
            f"{what}: the loss does not depend on the student logits through autograd (got {_description(got)} "
            "without a graph): no .item(), .detach(), numpy or torch.no_grad() inside, training needs its gradient"
        )
        got.backward()
        assert_close(s.grad, s64.grad.float(), atol=1e-6, rtol=1e-3, what=f"{what}: d loss / d student_logits")

    def temperature_one():
        matches(*_kd_inputs(80, (2, 5, 17)), 1.0, what="(B=2, T=5, V=17) logits at T = 1")

    def temperatures():
        for i, temperature in enumerate((0.5, 2.0, 7.3)):
            student, teacher = _kd_inputs(82 + 2 * i, (3, 4, 29))
            matches(student, teacher, temperature, what=f"(3, 4, 29) logits at T = {temperature:g}")

    def leading_dims():
        student, teacher = _kd_inputs(88, (12, 23))
        matches(student, teacher, 2.0, what="12 tokens as (N=12, V=23)")
        matches(student.reshape(3, 4, 23), teacher.reshape(3, 4, 23), 2.0, what="the same 12 tokens as (B=3, T=4)")
        matches(student[:1], teacher[:1], 2.0, what="one token (N=1, V=23)")

    def zero_for_equal_logits():
        student, teacher = _kd_inputs(90, (4, 31))
        got = loss_of(teacher, teacher, 1.5)
        assert_shape(got, (), what="kd_loss(x, x, 1.5)")
        assert abs(got.item()) < 1e-5, f"a student equal to its teacher must have loss 0, got {got.item():.6g}"
        got = loss_of(student, teacher, 1.5).item()
        assert got > 0, f"a student unlike its teacher must have a positive loss, got {got:.6g}"

    def ruled_out_tokens():
        student, teacher = _kd_inputs(92, (2, 6, 13))
        teacher = _rule_out(teacher, randn(2, 6, 13, seed=94) > 0)  # about half the tokens at -inf
        for temperature in (1.0, 2.0):
            matches(student, teacher, temperature, what=f"teacher logits with -inf entries at T = {temperature:g} "
                                                        "(0 * log 0 counts as 0: torch.special.xlogy)")
        gradient_matches(student, teacher, 2.0, what="teacher logits with -inf entries")

    def gradient():
        gradient_matches(*_kd_inputs(96, (2, 3, 11)), 1.0, what="(2, 3, 11) logits at T = 1")
        gradient_matches(*_kd_inputs(98, (5, 7)), 3.0, what="(5, 7) logits at T = 3")

    def real_vocabulary():
        student, teacher = _kd_inputs(100, (2, 3, 49152), student_scale=3.0, teacher_scale=4.0)
        for temperature in (1.0, 2.0):
            matches(student, teacher, temperature, what=f"SmolLM2's vocabulary (2, 3, 49152) at T = {temperature:g}")

    def fresh_cases():
        temperatures = [0.5, 1.0, 2.0, 7.3, ex.rng.uniform(0.25, 10.0)]
        for i, temperature in enumerate(temperatures):
            leading = ex.rng.choice([(ex.rng.randint(2, 9),), (1,), (ex.rng.randint(1, 3), ex.rng.randint(2, 6))])
            V = ex.rng.choice([2, 3, ex.rng.randrange(5, 300, 2)])
            student, teacher = _kd_inputs(ex, (*leading, V), ex.rng.uniform(0.5, 4), ex.rng.uniform(0.5, 6))
            if i % 2:
                teacher = _rule_out(teacher, ex.randn(*leading, V) > 0.5)
            what = f"fresh logits {(*leading, V)} at T = {temperature:.3g}"
            matches(student, teacher, temperature, what=what)
            gradient_matches(student, teacher, temperature, what=what)

    with exercise("8.1", "the temperature-scaled KD loss") as ex:
        ex.check("(B, T, V) logits at temperature 1 match the reference (KL(teacher || student), mean over tokens)",
                 temperature_one)
        ex.check("temperatures 0.5, 2 and 7.3 match: both sides softened by T, the KL multiplied by T²", temperatures)
        ex.check("the mean over tokens, whatever the leading dims: (N, V), (B, T, V) and one token", leading_dims)
        ex.check("a student equal to its teacher has loss 0, any other a positive loss", zero_for_equal_logits)
        ex.check("a teacher that rules tokens out (-inf logits) gives the reference's finite loss and gradient",
                 ruled_out_tokens)
        ex.check("the gradient with respect to the student logits matches the reference", gradient)
        ex.check("SmolLM2's real vocabulary (V = 49152) matches the reference", real_vocabulary)
        ex.check("fresh random logits of odd shapes at random temperatures match, loss and gradient", fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 8.2: the teacher's corpus, generated by the engine.
# ---------------------------------------------------------------------------------------------------------------------

WORDS = ["Once upon a time", "The cat", "In the beginning", "x", "Hello world", "A B C", "Seven", "the quick fox",
         "Rain, then sun", "What is a token?"]


def _teacher_texts_ref(llm: Any, prompts: list[str], num_samples: int, max_tokens: int, seed: int,
                       temperature: float = 1.0) -> list[str]:
    """``minillm.distill.teacher_corpus`` on an engine already built: prompt-major, the i-th text seeded seed + i."""
    from minillm.engine.sampling import SamplingParams

    all_prompts = [p for p in prompts for _ in range(num_samples)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
              for i in range(len(all_prompts))]
    outputs = llm.generate(all_prompts, params, use_tqdm=False)
    return [prompt + out.text for prompt, out in zip(all_prompts, outputs)]


def _recording_llm(model: nn.Module) -> Any:
    """A fresh ``minillm.LLM`` on `model` whose ``generate`` records its calls (and shows no progress bar)."""
    from minillm.engine.llm import LLM

    llm = LLM(model, tokenizer=CharTokenizer())
    generate, llm.calls = llm.generate, []

    def recorded(prompts, params=None, use_tqdm=None):
        llm.calls.append(len(prompts) if isinstance(prompts, list) else 1)
        return generate(prompts, params, use_tqdm=False)

    llm.generate = recorded
    return llm


def check_teacher_texts(fn: Callable) -> None:
    """Exercise 8.2. `fn(llm, prompts, num_samples, max_tokens, seed) -> texts`: sequence-level distillation data.

    Returns ``len(prompts) * num_samples`` strings ``prompt + continuation``, prompt-major (every sample of prompt 0
    first), the i-th drawn with ``SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i)``, all in one
    ``llm.generate`` call. What ``minillm.distill.teacher_corpus`` does, on an engine already built.
    """
    from minillm.engine.llm import LLM

    teacher = tiny_teacher(seed=0)

    def run(prompts, num_samples, max_tokens, seed):
        llm = _recording_llm(teacher)
        got = fn(llm, list(prompts), num_samples, max_tokens, seed)
        return got, llm.calls

    def expected(prompts, num_samples, max_tokens, seed, temperature=1.0):
        llm = LLM(teacher, tokenizer=CharTokenizer())
        return _teacher_texts_ref(llm, list(prompts), num_samples, max_tokens, seed, temperature)

    def assert_texts(got, prompts, num_samples):
        total = len(prompts) * num_samples
        assert isinstance(got, list) and all(isinstance(t, str) for t in got), (
            f"expected a list of {total} strings, got {_description(got)}"
        )
        assert len(got) == total, (
            f"{len(prompts)} prompts x {num_samples} samples must give {total} texts, got {len(got)}"
        )

    def assert_order(got, prompts, num_samples):
        for i, text in enumerate(got):
            prompt = prompts[i // num_samples]
            if text.startswith(prompt):
                continue
            if any(text.startswith(p) for p in prompts):
                raise AssertionError(
                    f"text {i} should continue prompt {i // num_samples} ({prompt!r}), got {text!r}: order the texts "
                    f"prompt-major, all {num_samples} samples of prompt 0 first ([p for p in prompts for _ in "
                    "range(num_samples)])"
                )
            raise AssertionError(
                f"text {i} should start with its prompt {prompt!r}, got {text!r}: return prompt + output.text "
                "(the engine's output holds the continuation only)"
            )

    def assert_same(got, want, prompts, num_samples, max_tokens, seed):
        if got == want:
            return
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        hint = f"the i-th text uses SamplingParams(max_tokens={max_tokens}, temperature=1.0, seed={seed} + i)"
        if got == expected(prompts, num_samples, max_tokens, seed, temperature=0.0):
            hint = "these are the greedy continuations: sample from the teacher's distribution, temperature=1.0"
        raise AssertionError(
            f"text {i} (prompt {i // num_samples}, sample {i % num_samples}): expected {want[i]!r}, got "
            f"{got[i] if i < len(got) else None!r}; {hint}"
        )

    def count_and_type():
        prompts = ["Once upon a time", "The cat", "x"]
        assert_texts(run(prompts, 2, 6, 0)[0], prompts, 2)

    def prompt_major():
        prompts = ["Once upon a time", "The cat", "x"]
        assert_order(run(prompts, 2, 6, 0)[0], prompts, 2)

    def samples_differ():
        prompts = ["Once upon a time", "The cat"]
        got, want = run(prompts, 3, 8, 0)[0], expected(prompts, 3, 8, 0)
        for j in range(len(prompts)):
            samples, wanted = got[3 * j : 3 * j + 3], want[3 * j : 3 * j + 3]
            if len(set(samples)) < len(set(wanted)):
                greedy = expected(prompts, 3, 8, 0, temperature=0.0)[3 * j : 3 * j + 3]
                how = "sample (temperature=1.0, not greedy) and " if samples == greedy else ""
                raise AssertionError(
                    f"the 3 samples of prompt {j} repeat each other: {samples}; {how}give the i-th text its own seed, "
                    f"seed + i (one seed for all of them draws the same tokens each time)"
                )

    def matches_reference():
        prompts = ["Once upon a time", "The cat", "x"]
        got = run(prompts, 2, 6, 0)[0]
        assert_texts(got, prompts, 2)
        assert_same(got, expected(prompts, 2, 6, 0), prompts, 2, 6, 0)

    def one_generate_call():
        prompts = ["Hello world", "Seven", "the quick fox"]
        got, calls = run(prompts, 2, 4, 5)
        assert len(calls) == 1, (
            f"llm.generate was called {len(calls)} times (with {calls} prompts): call it once with all the "
            f"prompts and a list of SamplingParams, one per text, so the engine decodes them in one batch"
        )
        assert_same(got, expected(prompts, 2, 4, 5), prompts, 2, 4, 5)

    def reproducible():
        prompts = ["In the beginning", "A B C"]
        first, second = run(prompts, 2, 6, 11)[0], run(prompts, 2, 6, 11)[0]
        assert first == second, f"the same arguments gave other texts: {first} then {second}"
        other = run(prompts, 2, 6, 12)[0]
        assert other != first, "seed 12 gave the same texts as seed 11: seed the i-th text with seed + i"
        assert_same(other, expected(prompts, 2, 6, 12), prompts, 2, 6, 12)

    def one_prompt_one_sample():
        got = run(["Seven"], 1, 5, 3)[0]
        assert_texts(got, ["Seven"], 1)
        assert_same(got, expected(["Seven"], 1, 5, 3), ["Seven"], 1, 5, 3)

    def fresh_cases():
        for _ in range(2):
            prompts = ex.rng.sample(WORDS, ex.rng.randint(1, 4))
            num_samples, max_tokens, seed = ex.rng.randint(1, 3), ex.rng.randint(1, 10), ex.rng.randrange(2**31)
            got, calls = run(prompts, num_samples, max_tokens, seed)
            assert_texts(got, prompts, num_samples)
            assert_order(got, prompts, num_samples)
            assert_same(got, expected(prompts, num_samples, max_tokens, seed), prompts, num_samples, max_tokens,
                        seed)
            assert len(calls) == 1, f"llm.generate was called {len(calls)} times: call it once with every prompt"

    with exercise("8.2", "the teacher's corpus, generated by the engine") as ex:
        ex.check("returns a list of len(prompts) * num_samples strings", count_and_type)
        ex.check("prompt-major order, each text its prompt followed by the continuation", prompt_major)
        ex.check("the samples of one prompt differ (sampled, each with its own seed)", samples_differ)
        ex.check("the texts match the reference: the i-th sampled at temperature 1 with seed + i", matches_reference)
        ex.check("one llm.generate call for every text (the engine batches them)", one_generate_call)
        ex.check("the same seed gives the same texts, another seed other texts", reproducible)
        ex.check("one prompt and one sample", one_prompt_one_sample)
        ex.check("fresh random prompts, sample counts, lengths and seeds match the reference", fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 8.3: block influence from the residual streams.
# ---------------------------------------------------------------------------------------------------------------------


def _block_influence_ref(hidden_states: list[torch.Tensor]) -> torch.Tensor:
    """``minillm.distill.block_influence`` from residual streams already captured: (L+1) x (B, T, C) -> (L,) float32,
    ``1 - cos(x_i, x_{i+1})`` per token, averaged over every token, computed in float32 at least."""
    scores = []
    for x_in, x_out in zip(hidden_states[:-1], hidden_states[1:]):
        cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, T)
        scores.append((1 - cos).double().mean())
    return torch.stack(scores).float()


def _residual_streams(source: int | Exercise, num_layers: int, B: int, T: int, C: int,
                      scales: list[float] | None = None) -> list[torch.Tensor]:
    """L + 1 residual streams (B, T, C): tokens of different lengths, each layer adding `scales[i]` times a random
    update relative to its input's size (a layer of small scale barely turns the stream: low influence)."""
    if isinstance(source, Exercise):
        draw = source.randn
    else:
        g = generator(source)
        draw = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if scales is None:
        scales = [0.05 + 1.5 * abs(float(draw(1))) for _ in range(num_layers)]
    x = draw(B, T, C) * (0.5 + draw(B, T, 1).abs() * 3)  # token lengths differ, as in a real stream
    states = [x]
    for scale in scales:
        update = draw(B, T, C) * states[-1].norm(dim=-1, keepdim=True) / math.sqrt(C)
        states.append(states[-1] + scale * update)
    return states


def _states_of(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering layer 0 and leaving every layer, captured by forward hooks."""
    states = []

    def record(module, inputs, output):
        if not states:
            states.append(inputs[0].detach())
        states.append(output.detach())

    handles = [layer.register_forward_hook(record) for layer in model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return states


def check_block_influence(fn: Callable) -> None:
    """Exercise 8.3. `fn(hidden_states) -> influence`: ShortGPT's block influence from captured residual streams.

    hidden_states: a list of L + 1 tensors (B, T, C), the input of layer 0 and the output of every layer. Returns (L,)
    with ``1 - cos(x_i, x_{i+1})`` per token (cosine over C) averaged over all B * T tokens; float32 at least, also
    for bfloat16 states. Same as ``minillm.distill.block_influence`` on the model the states came from.
    """
    from minillm.distill import block_influence

    def matches(states, what, atol=1e-5, rtol=1e-4):
        got = fn([s.clone() for s in states])
        assert_shape(got, (len(states) - 1,), what=f"{what}: the influence (one score per layer)")
        assert_close(got, _block_influence_ref(states), atol=atol, rtol=rtol, check_dtype=False, what=what)

    def fixed():
        matches(_residual_streams(110, 4, 2, 5, 16), what="4 layers of (B=2, T=5, C=16) streams")

    def identity_and_flip():
        x = randn(2, 3, 8, seed=111)
        got = fn([x, x.clone(), -x, 2 * -x])
        assert_shape(got, (3,), what="the influence of 3 layers")
        assert_close(got, torch.tensor([0.0, 2.0, 0.0]), atol=1e-5, rtol=0, check_dtype=False,
                     what="a layer that changes nothing (1 - cos = 0), one that flips the sign (1 - cos = 2), one "
                          "that only rescales (0)")

    def per_token():
        # One token (an attention sink) 1000x longer than the others, which the layer leaves alone: averaging over
        # tokens counts it once; one cosine of the flattened tensors would be all about it.
        states = _residual_streams(112, 1, 1, 6, 12, scales=[0.8])
        states[0][0, 0] *= 1000
        states[1][0, 0] = states[0][0, 0]
        matches(states, what="one token 1000x longer than the rest (a cosine per token, then the mean over tokens)")

    def lengths_do_not_count():
        states = _residual_streams(113, 3, 2, 4, 10)
        states[1] = states[1] * 5.0  # layer 0 scales its output up, layer 1 scales its input down
        matches(states, what="streams whose lengths change between layers (a cosine ignores length)")

    def bfloat16():
        states = [s.to(torch.bfloat16) for s in _residual_streams(114, 3, 2, 8, 64, scales=[0.03, 0.1, 0.05])]
        matches(states, what="bfloat16 streams (compute in float32: 1 - cos of nearly parallel vectors in bfloat16 "
                             "is all rounding)")

    def model_states():
        model = tiny_teacher(seed=5, num_layers=4)
        ids = randint(3, 256, 2, 12, seed=115)
        states = _states_of(model, ids)
        got = fn([s.clone() for s in states])
        assert_shape(got, (4,), what="the influence of the 4 layers of a tiny model")
        assert_close(got, block_influence(model, ids), atol=1e-5, rtol=1e-4, check_dtype=False,
                     what="your influence from hooked residual streams vs minillm.distill.block_influence(model, ids)")

    def fresh_cases():
        for _ in range(4):
            L, B, T = ex.rng.randint(1, 6), ex.rng.randint(1, 3), ex.rng.randint(1, 9)
            C = ex.rng.choice([3, ex.rng.randrange(5, 66, 2)])
            states = _residual_streams(ex, L, B, T, C)
            if ex.rng.random() < 0.5:  # an attention sink: one token far longer than the others
                b, t = ex.rng.randrange(B), ex.rng.randrange(T)
                for s in states:
                    s[b, t] *= 10 ** ex.rng.uniform(1, 3)
            matches(states, what=f"fresh streams: L={L}, (B, T, C)={(B, T, C)}")

    with exercise("8.3", "block influence from the residual streams") as ex:
        ex.check("4 layers of residual streams match the reference", fixed)
        ex.check("1 - cos: 0 for a layer that changes nothing or only rescales, 2 for one that flips the sign",
                 identity_and_flip)
        ex.check("a cosine per token over C, averaged over tokens (one long token counts once)", per_token)
        ex.check("the lengths of the streams do not count, only their directions", lengths_do_not_count)
        ex.check("bfloat16 streams match the reference computed in float32", bfloat16)
        ex.check("on a tiny model's hooked streams, equals minillm.distill.block_influence", model_states)
        ex.check("fresh random streams (one layer, one token, odd C, attention sinks) match the reference",
                 fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 8.4: choosing the layers to drop.
# ---------------------------------------------------------------------------------------------------------------------


def check_layers_to_drop(fn: Callable) -> None:
    """Exercise 8.4. `fn(influence, num_drop) -> layers`: the `num_drop` layers of least influence.

    influence (L,) float, 0 <= num_drop < L. Returns a list of Python ints in increasing order (what
    ``minillm.distill.drop_layers`` takes). Same as ``minillm.distill.layers_to_drop``.
    """
    from minillm.distill import layers_to_drop

    def chosen(influence, num_drop, what):
        got = _calling(fn)(influence, num_drop)
        assert isinstance(got, list), f"{what}: expected a list of layer indices, got {_description(got)}"
        bad = [i for i in got if type(i) is not int]
        assert not bad, (
            f"{what}: the layer indices must be Python ints (drop_layers refuses anything else), got "
            f"{type(bad[0]).__name__} {bad[0]!r}: use .tolist()"
        )
        return got

    def matches(influence, num_drop, what):
        got = chosen(influence, num_drop, what)
        want = layers_to_drop(influence, num_drop)
        if sorted(got) == want and got != want:
            raise AssertionError(f"{what}: expected {want}, got {got}: return the layers in increasing order")
        if sorted(got) == sorted(influence.argsort(descending=True)[:num_drop].tolist()) and num_drop:
            raise AssertionError(f"{what}: expected {want}, got {got}, the most influential layers: drop the "
                                 "layers of least influence, which change the residual stream least")
        assert_equal(got, want, what=what)

    def fixed():
        matches(torch.tensor([0.30, 0.05, 0.20, 0.01, 0.40]), 2, what="influence [0.30, 0.05, 0.20, 0.01, 0.40], "
                                                                      "drop 2")

    def increasing_order():
        influence = torch.tensor([0.9, 0.02, 0.5, 0.3, 0.01, 0.04, 0.6, 0.03])
        matches(influence, 4, what=f"influence {influence.tolist()}, drop 4")

    def none_and_all_but_one():
        influence = torch.tensor([0.2, 0.1, 0.3])
        matches(influence, 0, what="drop 0 layers")
        matches(influence, 2, what="drop 2 of 3 layers")

    def smollm_like():
        # SmolLM2-135M has 30 layers; the first and last change the stream most, as in ShortGPT's figures.
        influence = 0.05 + 0.3 * (torch.linspace(-1, 1, 30).abs() ** 4) + 0.01 * randn(30, seed=120).abs()
        matches(influence, 6, what="30 layers like SmolLM2's, drop 6")

    def ties():
        influence = torch.tensor([0.1, 0.3, 0.1, 0.2, 0.1])
        got = chosen(influence, 2, what="influence [0.1, 0.3, 0.1, 0.2, 0.1], drop 2")
        assert len(got) == 2 and set(got) <= {0, 2, 4} and got == sorted(set(got)), (
            f"influence [0.1, 0.3, 0.1, 0.2, 0.1], drop 2: expected two of the tied layers 0, 2, 4 in increasing "
            f"order, got {got}"
        )

    def fresh_cases():
        for _ in range(5):
            L = ex.rng.randint(2, 40)
            influence = ex.randn(L).abs() * 10 ** ex.rng.uniform(-3, 0)
            matches(influence, ex.rng.randrange(L), what=f"fresh influence of {L} layers")
        L = ex.rng.randint(2, 40)
        matches(ex.randn(L).abs().double(), L - 1, what=f"{L} layers in float64, keep one")

    with exercise("8.4", "choosing the layers to drop") as ex:
        ex.check("drops the least influential layers, as the reference", fixed)
        ex.check("returns them as Python ints in increasing layer order", increasing_order)
        ex.check("dropping no layer gives [], dropping all but one keeps the most influential", none_and_all_but_one)
        ex.check("30 layers shaped like SmolLM2's influence", smollm_like)
        ex.check("ties: any of the tied layers, still in increasing order", ties)
        ex.check("fresh random influences of 2 to 40 layers match the reference", fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 8.5: one training step with gradient clipping.
# ---------------------------------------------------------------------------------------------------------------------


def _train_step_ref(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
                    optimizer: torch.optim.Optimizer, max_grad_norm: float, temperature: float) -> float:
    """One step of ``minillm.distill.distill`` with ``kd_weight=1``: the KD loss, its gradient clipped to a global norm
    of `max_grad_norm` over the student's parameters, one optimizer step. Returns the loss."""
    from minillm.distill import kd_loss

    with torch.no_grad():
        teacher_logits = teacher(input_ids)  # (B, T, V), no graph: the teacher is frozen
    loss = kd_loss(student(input_ids), teacher_logits, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def _depth_student(teacher: nn.Module, drop: list[int], freeze_embedding: bool = False) -> nn.Module:
    from minillm.distill import drop_layers

    student = copy.deepcopy(teacher)
    drop_layers(student, drop)
    student.embed_tokens.weight.requires_grad_(not freeze_embedding)
    return student


ORDER_OF_A_STEP = ("A step: teacher logits under torch.no_grad(), the KD loss, optimizer.zero_grad(), loss.backward(), "
                   "clip_grad_norm_(student.parameters(), max_grad_norm) (one norm over all the gradients together), "
                   "optimizer.step().")
NOTHING_MOVED = ("Your step did not change the student at all: did the gradients get cleared between loss.backward() "
                 "and optimizer.step()? Call optimizer.zero_grad() before backward.")


def check_train_step(fn: Callable) -> None:
    """Exercise 8.5. `fn(student, teacher, input_ids, optimizer, max_grad_norm, temperature) -> loss`: one step.

    Runs the teacher without a graph, computes ``kd_loss`` at `temperature`, clears the old gradients, backpropagates,
    clips the global gradient norm of the student's parameters to `max_grad_norm`, and steps the optimizer. Returns
    the loss as a Python float. The teacher keeps its weights and gets no gradients. One step of
    ``minillm.distill.distill`` (``kd_weight=1``).
    """
    teacher = tiny_teacher(seed=7, num_layers=3)
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}

    def sgd(lr):
        return lambda params: torch.optim.SGD(params, lr=lr)

    def adamw(lr):
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def assert_teacher_untouched(step):
        with_grad = [name for name, p in teacher.named_parameters() if p.grad is not None]
        assert not with_grad, (
            f"after step {step} the teacher's {with_grad[0]} has a .grad: run the teacher under torch.no_grad() "
            "(it is frozen; its graph only costs memory, and its gradients would flow into the student's loss)"
        )
        changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, teacher_weights[k])]
        assert not changed, f"after step {step} the teacher's {changed[0]} changed: only the student is trained"

    def run(batches, max_grad_norm, temperature, optimizer, drop=(1,), freeze_embedding=False, atol=1e-6):
        """Train two copies of one student side by side, yours and the reference, and compare after every step."""
        base = _depth_student(teacher, list(drop), freeze_embedding)
        mine, ref = copy.deepcopy(base), copy.deepcopy(base)
        opt_mine = optimizer([p for p in mine.parameters() if p.requires_grad])
        opt_ref = optimizer([p for p in ref.parameters() if p.requires_grad])
        for step, ids in enumerate(batches, 1):
            before = [p.detach().clone() for p in mine.parameters()]
            got = fn(mine, teacher, ids.clone(), opt_mine, max_grad_norm, temperature)
            want = _train_step_ref(ref, teacher, ids, opt_ref, max_grad_norm, temperature)
            assert_teacher_untouched(step)
            assert type(got) is float, (
                f"step {step} returned {_description(got)}: return loss.item(), a Python float (a tensor keeps the "
                "step's whole graph alive)"
            )
            assert_close(got, want, atol=1e-5, rtol=1e-5,
                         what=f"the loss of step {step} (kd_loss of the student's logits against the teacher's at "
                              f"T = {temperature:g}, before the update)")
            for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
                try:
                    assert_close(p, q, atol=atol, rtol=1e-5, what=f"the student's {name} after step {step}")
                except AssertionError as e:
                    moved = any(not torch.equal(a, b) for a, b in zip(mine.parameters(), before))
                    raise AssertionError(f"{e}\n{ORDER_OF_A_STEP if moved else NOTHING_MOVED}") from None

    def batch(B, T, seed):
        return randint(3, 256, B, T, seed=seed)

    def one_step():
        run([batch(2, 12, 130)], max_grad_norm=1e3, temperature=2.0, optimizer=sgd(0.5))

    def frozen_teacher():
        run([batch(2, 10, 131)], max_grad_norm=1e3, temperature=1.0, optimizer=sgd(0.5))

    def zero_grad():
        run([batch(2, 12, 132 + i) for i in range(3)], max_grad_norm=1e3, temperature=1.0, optimizer=sgd(0.5))

    def clipping():
        run([batch(2, 12, 135), batch(2, 12, 136)], max_grad_norm=0.02, temperature=2.0, optimizer=sgd(0.5))

    def clipping_tiny():
        run([batch(1, 16, 137)], max_grad_norm=1e-3, temperature=1.0, optimizer=sgd(5.0))

    def frozen_embedding():
        run([batch(2, 8, 138), batch(2, 8, 139)], max_grad_norm=0.02, temperature=1.0, optimizer=sgd(0.5),
            freeze_embedding=True)

    def adam():
        run([batch(2, 12, 140 + i) for i in range(3)], max_grad_norm=0.05, temperature=1.0, optimizer=adamw(1e-3),
            atol=1e-5)

    def fresh_cases():
        for _ in range(2):
            batches = [ex.randint(3, 256, ex.rng.randint(1, 3), ex.rng.randint(2, 16))
                       for _ in range(ex.rng.randint(1, 3))]
            max_grad_norm = ex.rng.choice([10 ** ex.rng.uniform(-3, -1.3), 1e3])
            drop = ex.rng.sample(range(3), ex.rng.randint(0, 2))
            run(batches, max_grad_norm, ex.rng.uniform(0.5, 4.0), sgd(10 ** ex.rng.uniform(-1, 0.5)), drop=drop)

    with exercise("8.5", "one training step with gradient clipping") as ex:
        ex.check("one step returns the KD loss as a float and updates the student like the reference", one_step)
        ex.check("the teacher stays frozen: no gradients, unchanged weights", frozen_teacher)
        ex.check("three steps: each starts from fresh gradients (zero_grad), not piled-up ones", zero_grad)
        ex.check("clipping: one global norm over all the student's gradients, before optimizer.step()", clipping)
        ex.check("a tiny max_grad_norm: the clipped step is the reference's", clipping_tiny)
        ex.check("a frozen embedding (requires_grad=False) is left alone", frozen_embedding)
        ex.check("three AdamW steps, as minillm.distill.distill takes them, match the reference", adam)
        ex.check("fresh random batches, temperatures, clip thresholds and students match the reference", fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 8.6: the learning-rate schedule.
# ---------------------------------------------------------------------------------------------------------------------


def check_lr_at(fn: Callable) -> None:
    """Exercise 8.6. `fn(step, num_steps, lr, warmup_steps, min_lr_ratio) -> float`: warm-up then cosine decay.

    step is 1-based (1..num_steps). Linear warm-up to `lr` over the first `warmup_steps` steps (``lr * step /
    warmup_steps``), then a cosine from `lr` down to ``min_lr_ratio * lr`` at the last step. Same as
    ``minillm.distill.lr_at``.
    """
    from minillm.distill import lr_at

    def schedule(num_steps, lr, warmup_steps, min_lr_ratio):
        return [fn(step, num_steps, lr, warmup_steps, min_lr_ratio) for step in range(1, num_steps + 1)]

    def matches(num_steps, lr, warmup_steps, min_lr_ratio, what):
        got = schedule(num_steps, lr, warmup_steps, min_lr_ratio)
        for step, value in enumerate(got, 1):
            want = lr_at(step, num_steps, lr, warmup_steps, min_lr_ratio)
            assert_close(value, want, atol=lr * 1e-7, rtol=1e-6,
                         what=f"{what}: the learning rate of step {step} (of {num_steps}, warm-up {warmup_steps})")

    def fixed():
        matches(10, 1.0, 2, 0.1, what="10 steps, lr 1, 2 warm-up steps, min_lr_ratio 0.1")

    def warmup():
        got = [fn(step, 100, 3e-4, 10, 0.1) for step in (1, 5, 10)]
        for step, value in zip((1, 5, 10), got):
            assert_close(value, 3e-4 * step / 10, atol=1e-12, rtol=1e-6,
                         what=f"warm-up step {step} of 10 (lr * step / warmup_steps: step 1 is not 0)")

    def end_of_decay():
        for ratio in (0.1, 0.0, 0.5):
            assert_close(fn(50, 50, 2e-3, 5, ratio), 2e-3 * ratio, atol=1e-12, rtol=1e-6,
                         what=f"the last step with min_lr_ratio {ratio:g} (min_lr_ratio * lr)")
        matches(50, 2e-3, 5, 0.1, what="50 steps, 5 warm-up steps")

    def no_warmup():
        matches(20, 1e-3, 0, 0.1, what="no warm-up (warmup_steps=0): step 1 is already on the cosine")

    def all_warmup():
        matches(8, 1e-3, 8, 0.1, what="warm-up over every step (warmup_steps = num_steps)")
        matches(1, 1e-3, 1, 0.1, what="one step")
        matches(3, 1e-3, 2, 0.1, what="one step after the warm-up")

    def fresh_cases():
        for _ in range(4):
            num_steps = ex.rng.randint(1, 300)
            warmup_steps = ex.rng.choice([0, ex.rng.randint(0, num_steps), ex.rng.randint(0, max(1, num_steps // 10))])
            matches(num_steps, 10 ** ex.rng.uniform(-5, -2), min(warmup_steps, num_steps), ex.rng.uniform(0, 0.5),
                    what="a fresh schedule")

    with exercise("8.6", "warm-up and cosine decay") as ex:
        ex.check("a 10-step schedule matches the reference", fixed)
        ex.check("linear warm-up: lr * step / warmup_steps", warmup)
        ex.check("the cosine ends at min_lr_ratio * lr on the last step", end_of_decay)
        ex.check("no warm-up", no_warmup)
        ex.check("warm-up over every step, one step, one step after the warm-up", all_warmup)
        ex.check("fresh random schedules match the reference at every step", fresh_cases)
