"""Chapter 08's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
last test recomputes the worked example above each exercise in the solution notebook with minillm's reference.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minillm
from answers.worked_examples import check_worked_examples
from minillm import grading
from minillm.distill import distill, drop_layers, kd_loss, layers_to_drop, lr_at, next_token_loss, sample_batch
from minillm.grading.ch08_distillation import (
    CharTokenizer,
    _block_influence_ref,
    _teacher_texts_ref,
    _train_step_ref,
    tiny_teacher,
)

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


# ---------------------------------------------------------------------------------------------------------------------
# 8.1 KD loss
# ---------------------------------------------------------------------------------------------------------------------


def kd_loss_xlogy(student_logits, teacher_logits, temperature):  # the solution notebook's answer
    V = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    p = log_p.exp()
    kl = (torch.special.xlogy(p, p) - p * log_q).sum(dim=-1)
    return temperature**2 * kl.mean()


def kd_loss_kl_div(student_logits, teacher_logits, temperature):  # torch's kl_div, per token, then the mean
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, p, reduction="none").sum(-1).mean()


def kd_loss_where(student_logits, teacher_logits, temperature):  # masks the ruled-out tokens with torch.where
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    return temperature**2 * kl.mean()


def kd_loss_missing_t2(student_logits, teacher_logits, temperature):
    # Wrong: forgets the T² factor, so the gradient shrinks like 1/T² as the temperature grows.
    return kd_loss_kl_div(student_logits, teacher_logits, temperature) / temperature**2


def kd_loss_divides_by_t2(student_logits, teacher_logits, temperature):
    # Wrong: divides by T² instead of multiplying.
    return kd_loss_kl_div(student_logits, teacher_logits, temperature) / temperature**4


def kd_loss_reversed(student_logits, teacher_logits, temperature):
    # Wrong: KL(student || teacher), the reverse direction (mode-seeking, and it ignores what the teacher rules in).
    return kd_loss_kl_div(teacher_logits.clamp_min(-1e4), student_logits, temperature)


def kd_loss_teacher_temperature_only(student_logits, teacher_logits, temperature):
    # Wrong: softens the teacher but not the student.
    log_q = F.log_softmax(student_logits, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, p, reduction="none").sum(-1).mean()


def kd_loss_sum_over_tokens(student_logits, teacher_logits, temperature):
    # Wrong: sums over the tokens, so the loss (and the step size) grows with the batch.
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, p, reduction="sum")


def kd_loss_batchmean(student_logits, teacher_logits, temperature):
    # Wrong: reduction="batchmean" divides by the first dim only: B for (B, T, V) logits, not B * T.
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, p, reduction="batchmean")


def kd_loss_mean_over_vocab(student_logits, teacher_logits, temperature):
    # Wrong: reduction="mean" also divides by the vocabulary size V.
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, p, reduction="mean")


def kd_loss_kl_div_probabilities(student_logits, teacher_logits, temperature):
    # Wrong: F.kl_div expects log-probabilities as its input; given probabilities it computes something else.
    q = F.softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(q, p, reduction="none").sum(-1).mean()


def kd_loss_nan_on_ruled_out(student_logits, teacher_logits, temperature):
    # Wrong: p * (log p - log q) is 0 * (-inf) = NaN where the teacher rules a token out (-inf logit).
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kd_loss_log_target(student_logits, teacher_logits, temperature):
    # Wrong: F.kl_div(..., log_target=True) computes exp(log p) * (log p - log q): NaN where log p = -inf.
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()


def kd_loss_no_graph(student_logits, teacher_logits, temperature):
    # Wrong: the right value, but as a fresh tensor (.item()): no gradient reaches the student.
    return torch.tensor(kd_loss_kl_div(student_logits, teacher_logits, temperature).item())


# ---------------------------------------------------------------------------------------------------------------------
# 8.2 teacher texts
# ---------------------------------------------------------------------------------------------------------------------


def teacher_texts_right(llm, prompts, num_samples, max_tokens, seed):  # the solution notebook's answer
    all_prompts = [p for p in prompts for _ in range(num_samples)]
    params = [minillm.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i)
              for i in range(len(all_prompts))]
    outputs = llm.generate(all_prompts, params)
    return [prompt + out.text for prompt, out in zip(all_prompts, outputs)]


def teacher_texts_parallel_sampling(llm, prompts, num_samples, max_tokens, seed):
    # n completions per request: completion j of prompt k is seeded (seed + k * num_samples) + j = seed + i.
    params = [minillm.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + k * num_samples,
                                     n=num_samples) for k in range(len(prompts))]
    outputs = llm.generate(prompts, params)
    return [prompt + completion.text for prompt, out in zip(prompts, outputs) for completion in out.outputs]


def teacher_texts_one_seed(llm, prompts, num_samples, max_tokens, seed):
    # Wrong: one SamplingParams (one seed) for every text: the samples of a prompt are all the same.
    all_prompts = [p for p in prompts for _ in range(num_samples)]
    outputs = llm.generate(all_prompts, minillm.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed))
    return [prompt + out.text for prompt, out in zip(all_prompts, outputs)]


def teacher_texts_without_prompt(llm, prompts, num_samples, max_tokens, seed):
    # Wrong: the continuations alone; the student would learn to continue text it never sees.
    all_prompts = [p for p in prompts for _ in range(num_samples)]
    params = [minillm.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i)
              for i in range(len(all_prompts))]
    return [out.text for out in llm.generate(all_prompts, params)]


def teacher_texts_sample_major(llm, prompts, num_samples, max_tokens, seed):
    # Wrong: sample-major order, [p0, p1, p0, p1, ...].
    all_prompts = [p for _ in range(num_samples) for p in prompts]
    params = [minillm.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i)
              for i in range(len(all_prompts))]
    return [prompt + out.text for prompt, out in zip(all_prompts, llm.generate(all_prompts, params))]


def teacher_texts_greedy(llm, prompts, num_samples, max_tokens, seed):
    # Wrong: greedy decoding (SamplingParams' default temperature 0): every sample of a prompt is the same text.
    all_prompts = [p for p in prompts for _ in range(num_samples)]
    params = [minillm.SamplingParams(max_tokens=max_tokens, seed=seed + i) for i in range(len(all_prompts))]
    return [prompt + out.text for prompt, out in zip(all_prompts, llm.generate(all_prompts, params))]


def teacher_texts_call_per_prompt(llm, prompts, num_samples, max_tokens, seed):
    # Wrong: one generate call per prompt: the engine never batches more than num_samples sequences.
    texts = []
    for k, prompt in enumerate(prompts):
        params = [minillm.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + k * num_samples + j)
                  for j in range(num_samples)]
        texts += [prompt + out.text for out in llm.generate([prompt] * num_samples, params)]
    return texts


def teacher_texts_seed_per_prompt(llm, prompts, num_samples, max_tokens, seed):
    # Wrong: seeds the samples of every prompt with seed, seed + 1, ... (seed + sample index, not seed + i).
    all_prompts = [p for p in prompts for _ in range(num_samples)]
    params = [minillm.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i % num_samples)
              for i in range(len(all_prompts))]
    return [prompt + out.text for prompt, out in zip(all_prompts, llm.generate(all_prompts, params))]


# ---------------------------------------------------------------------------------------------------------------------
# 8.3 block influence
# ---------------------------------------------------------------------------------------------------------------------


def block_influence_right(hidden_states):  # the solution notebook's answer
    scores = []
    for x_in, x_out in zip(hidden_states[:-1], hidden_states[1:]):
        cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, T)
        scores.append(1 - cos.mean())
    return torch.stack(scores)


def block_influence_manual(hidden_states):  # the cosine written out, in float64
    h = torch.stack([s.double() for s in hidden_states])  # (L+1, B, T, C)
    cos = (h[:-1] * h[1:]).sum(-1) / (h[:-1].norm(dim=-1) * h[1:].norm(dim=-1))  # (L, B, T)
    return (1 - cos).flatten(1).mean(1).float()


def block_influence_cos(hidden_states):
    # Wrong: the cosine itself, not 1 - cos: the highest score goes to the layer that changes least.
    return torch.stack([F.cosine_similarity(a.float(), b.float(), dim=-1).mean()
                        for a, b in zip(hidden_states[:-1], hidden_states[1:])])


def block_influence_norm_difference(hidden_states):
    # Wrong: how much the layer changes each channel, on average, instead of how much it turns the stream.
    return torch.stack([(b.float() - a.float()).abs().mean() for a, b in zip(hidden_states[:-1], hidden_states[1:])])


def block_influence_relative_change(hidden_states):
    # Wrong: the relative size of the update, ||x_out - x_in|| / ||x_in|| per token: a rescaling counts as a change.
    return torch.stack([((b.float() - a.float()).norm(dim=-1) / a.float().norm(dim=-1)).mean()
                        for a, b in zip(hidden_states[:-1], hidden_states[1:])])


def block_influence_flattened(hidden_states):
    # Wrong: one cosine of the whole flattened tensors: long tokens (attention sinks) outweigh all the others.
    return torch.stack([1 - F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
                        for a, b in zip(hidden_states[:-1], hidden_states[1:])])


def block_influence_over_tokens(hidden_states):
    # Wrong: the cosine over the token axis (dim=-2) instead of the channels.
    return torch.stack([1 - F.cosine_similarity(a.float(), b.float(), dim=-2).mean()
                        for a, b in zip(hidden_states[:-1], hidden_states[1:])])


def block_influence_from_embeddings(hidden_states):
    # Wrong: compares every layer's output with the model's input instead of with the layer's own input.
    x0 = hidden_states[0].float()
    return torch.stack([1 - F.cosine_similarity(x0, b.float(), dim=-1).mean() for b in hidden_states[1:]])


def block_influence_low_precision(hidden_states):
    # Wrong: computes in the states' own dtype: in bfloat16, 1 - cos of nearly parallel vectors is rounding noise.
    return torch.stack([(1 - F.cosine_similarity(a, b, dim=-1)).mean().float()
                        for a, b in zip(hidden_states[:-1], hidden_states[1:])])


# ---------------------------------------------------------------------------------------------------------------------
# 8.4 layers to drop
# ---------------------------------------------------------------------------------------------------------------------


def layers_to_drop_right(influence, num_drop):  # the solution notebook's answer
    return sorted(influence.argsort()[:num_drop].tolist())


def layers_to_drop_topk(influence, num_drop):  # topk of the smallest, then sorted
    return sorted(influence.topk(num_drop, largest=False).indices.tolist())


def layers_to_drop_unsorted(influence, num_drop):
    # Wrong: in order of influence, not of layer index.
    return influence.argsort()[:num_drop].tolist()


def layers_to_drop_most_influential(influence, num_drop):
    # Wrong: drops the layers that change the stream most.
    return sorted(influence.argsort(descending=True)[:num_drop].tolist())


def layers_to_drop_tensor_items(influence, num_drop):
    # Wrong: sorted() over a tensor gives 0-dim tensors, which drop_layers refuses.
    return sorted(influence.argsort()[:num_drop])


def layers_to_drop_negative_slice(influence, num_drop):
    # Wrong: the last num_drop of a descending order, but [-0:] is the whole list: num_drop=0 drops every layer.
    return sorted(influence.argsort(descending=True)[-num_drop:].tolist())


def layers_to_drop_below_mean(influence, num_drop):
    # Wrong: every layer below the mean influence, whatever num_drop asks.
    return (influence < influence.mean()).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------------------------------
# 8.5 train step
# ---------------------------------------------------------------------------------------------------------------------


def train_step_right(student, teacher, input_ids, optimizer, max_grad_norm, temperature):  # the solution's answer
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    loss = kd_loss(student(input_ids), teacher_logits, temperature)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_own_loss_detach(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Own KD loss (8.1), the teacher detached instead of run under no_grad, clipping over the optimizer's params.
    teacher_logits = teacher(input_ids).detach()
    loss = kd_loss_xlogy(student(input_ids), teacher_logits, temperature)
    student.zero_grad()
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(loss)


def train_step_clip_after_step(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: clips after optimizer.step(): the step already used the unclipped gradients.
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    loss = kd_loss(student(input_ids), teacher_logits, temperature)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    return loss.item()


def train_step_clip_each_parameter(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: clips every parameter's gradient to max_grad_norm separately: the total norm can be far larger, and the
    # direction of the step changes.
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    loss = kd_loss(student(input_ids), teacher_logits, temperature)
    optimizer.zero_grad()
    loss.backward()
    for p in student.parameters():
        torch.nn.utils.clip_grad_norm_(p, max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_clip_value(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: clips every gradient entry to [-max, max] (clip_grad_value_) instead of the norm.
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    loss = kd_loss(student(input_ids), teacher_logits, temperature)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_value_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_no_zero_grad(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: never clears the gradients: each step adds its gradient to all the previous ones.
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    loss = kd_loss(student(input_ids), teacher_logits, temperature)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_zero_grad_after_backward(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: clears the gradients between backward and step: the optimizer steps with no gradient at all.
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    loss = kd_loss(student(input_ids), teacher_logits, temperature)
    loss.backward()
    optimizer.zero_grad()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_teacher_with_grad(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: runs the teacher with autograd on and without detaching: backward fills the teacher's .grad too.
    loss = kd_loss(student(input_ids), teacher(input_ids), temperature)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_clips_teacher_too(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: the teacher's parameters join the student's (as if they were trained): its gradients enter the norm.
    loss = kd_loss(student(input_ids), teacher(input_ids), temperature)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([*student.parameters(), *teacher.parameters()], max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_next_token_loss(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: the plain next-token cross-entropy: the teacher is not used at all.
    loss = next_token_loss(student(input_ids), input_ids)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_swapped_logits(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: kd_loss(teacher_logits, student_logits): KL(student || teacher), the reverse direction.
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    loss = kd_loss(teacher_logits, student(input_ids), temperature)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def train_step_returns_tensor(student, teacher, input_ids, optimizer, max_grad_norm, temperature):
    # Wrong: returns the loss tensor, which keeps the whole graph of the step alive.
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    loss = kd_loss(student(input_ids), teacher_logits, temperature)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return loss


# ---------------------------------------------------------------------------------------------------------------------
# 8.6 learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------------


def lr_at_right(step, num_steps, lr, warmup_steps, min_lr_ratio=0.1):  # the solution notebook's answer
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at_min_lr(step, num_steps, lr, warmup_steps, min_lr_ratio=0.1):  # min + (max - min) * cosine, strict <
    min_lr = min_lr_ratio * lr
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def lr_at_warmup_from_zero(step, num_steps, lr, warmup_steps, min_lr_ratio=0.1):
    # Wrong: 0-based warm-up, lr * (step - 1) / warmup_steps: the first step does not train at all.
    if step <= warmup_steps:
        return lr * (step - 1) / warmup_steps
    return lr_at_right(step, num_steps, lr, warmup_steps, min_lr_ratio)


def lr_at_decays_to_zero(step, num_steps, lr, warmup_steps, min_lr_ratio=0.1):
    # Wrong: the cosine ends at 0, ignoring min_lr_ratio.
    return lr_at_right(step, num_steps, lr, warmup_steps, 0.0)


def lr_at_progress_over_all_steps(step, num_steps, lr, warmup_steps, min_lr_ratio=0.1):
    # Wrong: the cosine's progress counts from step 0, not from the end of the warm-up: it drops at the warm-up's end.
    if step <= warmup_steps:
        return lr * step / warmup_steps
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / num_steps)))


def lr_at_clamped(step, num_steps, lr, warmup_steps, min_lr_ratio=0.1):
    # Wrong: cosine to 0, then clamped at min_lr_ratio * lr: flat at the end instead of a scaled cosine.
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    return max(min_lr_ratio * lr, lr * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at_off_by_one(step, num_steps, lr, warmup_steps, min_lr_ratio=0.1):
    # Wrong: progress (step - warmup - 1) / (num_steps - warmup): the last step stays above min_lr_ratio * lr.
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps - 1) / max(1, num_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at_full_period(step, num_steps, lr, warmup_steps, min_lr_ratio=0.1):
    # Wrong: cos(2 pi progress), a full period: the rate comes back up to lr at the end.
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(2 * math.pi * progress)))


RIGHT_ANSWERS += [
    pytest.param(grading.check_kd_loss, kd_loss, id="8.1-reference"),
    pytest.param(grading.check_kd_loss, kd_loss_xlogy, id="8.1-xlogy"),
    pytest.param(grading.check_kd_loss, kd_loss_kl_div, id="8.1-kl-div-per-token"),
    pytest.param(grading.check_kd_loss, kd_loss_where, id="8.1-torch-where"),
    pytest.param(grading.check_teacher_texts, teacher_texts_right, id="8.2-one-params-per-text"),
    pytest.param(grading.check_teacher_texts, teacher_texts_parallel_sampling, id="8.2-parallel-sampling-n"),
    pytest.param(grading.check_block_influence, block_influence_right, id="8.3-cosine-similarity"),
    pytest.param(grading.check_block_influence, block_influence_manual, id="8.3-manual-float64"),
    pytest.param(grading.check_layers_to_drop, layers_to_drop, id="8.4-reference"),
    pytest.param(grading.check_layers_to_drop, layers_to_drop_right, id="8.4-argsort"),
    pytest.param(grading.check_layers_to_drop, layers_to_drop_topk, id="8.4-topk-smallest"),
    pytest.param(grading.check_train_step, train_step_right, id="8.5-no-grad-teacher"),
    pytest.param(grading.check_train_step, train_step_own_loss_detach, id="8.5-own-loss-detached-teacher"),
    pytest.param(grading.check_lr_at, lr_at, id="8.6-reference"),
    pytest.param(grading.check_lr_at, lr_at_right, id="8.6-warmup-then-cosine"),
    pytest.param(grading.check_lr_at, lr_at_min_lr, id="8.6-min-lr-form"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_kd_loss, kd_loss_missing_t2, id="8.1-missing-t2"),
    pytest.param(grading.check_kd_loss, kd_loss_divides_by_t2, id="8.1-divides-by-t2"),
    pytest.param(grading.check_kd_loss, kd_loss_reversed, id="8.1-kl-reversed"),
    pytest.param(grading.check_kd_loss, kd_loss_teacher_temperature_only, id="8.1-temperature-on-teacher-only"),
    pytest.param(grading.check_kd_loss, kd_loss_sum_over_tokens, id="8.1-sum-over-tokens"),
    pytest.param(grading.check_kd_loss, kd_loss_batchmean, id="8.1-batchmean-divides-by-b"),
    pytest.param(grading.check_kd_loss, kd_loss_mean_over_vocab, id="8.1-mean-over-vocab"),
    pytest.param(grading.check_kd_loss, kd_loss_kl_div_probabilities, id="8.1-kl-div-given-probabilities"),
    pytest.param(grading.check_kd_loss, kd_loss_nan_on_ruled_out, id="8.1-nan-on-minus-inf"),
    pytest.param(grading.check_kd_loss, kd_loss_log_target, id="8.1-log-target-nan"),
    pytest.param(grading.check_kd_loss, kd_loss_no_graph, id="8.1-no-gradient"),
    pytest.param(grading.check_teacher_texts, teacher_texts_one_seed, id="8.2-one-seed-for-all"),
    pytest.param(grading.check_teacher_texts, teacher_texts_without_prompt, id="8.2-continuation-only"),
    pytest.param(grading.check_teacher_texts, teacher_texts_sample_major, id="8.2-sample-major"),
    pytest.param(grading.check_teacher_texts, teacher_texts_greedy, id="8.2-greedy"),
    pytest.param(grading.check_teacher_texts, teacher_texts_call_per_prompt, id="8.2-one-call-per-prompt"),
    pytest.param(grading.check_teacher_texts, teacher_texts_seed_per_prompt, id="8.2-seed-per-sample-index"),
    pytest.param(grading.check_block_influence, block_influence_cos, id="8.3-cos-not-one-minus-cos"),
    pytest.param(grading.check_block_influence, block_influence_norm_difference, id="8.3-mean-abs-difference"),
    pytest.param(grading.check_block_influence, block_influence_relative_change, id="8.3-relative-change"),
    pytest.param(grading.check_block_influence, block_influence_flattened, id="8.3-flattened-cosine"),
    pytest.param(grading.check_block_influence, block_influence_over_tokens, id="8.3-cosine-over-tokens"),
    pytest.param(grading.check_block_influence, block_influence_from_embeddings, id="8.3-vs-model-input"),
    pytest.param(grading.check_block_influence, block_influence_low_precision, id="8.3-bfloat16-arithmetic"),
    pytest.param(grading.check_layers_to_drop, layers_to_drop_unsorted, id="8.4-unsorted"),
    pytest.param(grading.check_layers_to_drop, layers_to_drop_most_influential, id="8.4-drops-top-k"),
    pytest.param(grading.check_layers_to_drop, layers_to_drop_tensor_items, id="8.4-tensor-items"),
    pytest.param(grading.check_layers_to_drop, layers_to_drop_negative_slice, id="8.4-minus-zero-slice"),
    pytest.param(grading.check_layers_to_drop, layers_to_drop_below_mean, id="8.4-below-mean"),
    pytest.param(grading.check_train_step, train_step_clip_after_step, id="8.5-clip-after-step"),
    pytest.param(grading.check_train_step, train_step_clip_each_parameter, id="8.5-clip-each-parameter"),
    pytest.param(grading.check_train_step, train_step_clip_value, id="8.5-clip-value"),
    pytest.param(grading.check_train_step, train_step_no_zero_grad, id="8.5-no-zero-grad"),
    pytest.param(grading.check_train_step, train_step_zero_grad_after_backward, id="8.5-zero-grad-after-backward"),
    pytest.param(grading.check_train_step, train_step_teacher_with_grad, id="8.5-teacher-with-grad"),
    pytest.param(grading.check_train_step, train_step_clips_teacher_too, id="8.5-teacher-params-in-clip"),
    pytest.param(grading.check_train_step, train_step_next_token_loss, id="8.5-next-token-loss"),
    pytest.param(grading.check_train_step, train_step_swapped_logits, id="8.5-swapped-logits"),
    pytest.param(grading.check_train_step, train_step_returns_tensor, id="8.5-returns-tensor"),
    pytest.param(grading.check_lr_at, lr_at_warmup_from_zero, id="8.6-warmup-from-zero"),
    pytest.param(grading.check_lr_at, lr_at_decays_to_zero, id="8.6-decays-to-zero"),
    pytest.param(grading.check_lr_at, lr_at_progress_over_all_steps, id="8.6-progress-from-step-0"),
    pytest.param(grading.check_lr_at, lr_at_clamped, id="8.6-clamped-at-min"),
    pytest.param(grading.check_lr_at, lr_at_off_by_one, id="8.6-progress-off-by-one"),
    pytest.param(grading.check_lr_at, lr_at_full_period, id="8.6-full-cosine-period"),
]


# ---------------------------------------------------------------------------------------------------------------------
# The worked examples above each exercise, recomputed with minillm's reference.
# ---------------------------------------------------------------------------------------------------------------------

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "08_distillation.ipynb"
# The learner's function names, bound to the package's reference for the worked examples.
REFERENCE = {
    "torch": torch,
    "copy": copy,
    "minillm": minillm,
    "CharTokenizer": CharTokenizer,
    "tiny_teacher": tiny_teacher,
    "drop_layers": drop_layers,
    "kd_loss": kd_loss,
    "teacher_texts": _teacher_texts_ref,
    "block_influence_from_states": _block_influence_ref,
    "layers_to_drop": layers_to_drop,
    "train_step": _train_step_ref,
    "lr_at": lr_at,
}
def test_worked_examples_are_the_references_output():
    check_worked_examples(SOLUTION, 8, ["8.1", "8.2", "8.3", "8.4", "8.5", "8.6"], REFERENCE)


def test_char_tokenizer_round_trips_and_the_tiny_teacher_is_reproducible():
    tok = CharTokenizer()
    text = "Once upon a time, 42 cats!"
    assert tok.decode(tok(text).input_ids) == text and len(tok) == 256
    assert tok.decode([1, 3, 2]) == " " and tok.decode([1, 3, 2], skip_special_tokens=False) == "<s> </s>"
    state = torch.get_rng_state()
    a, b = tiny_teacher(seed=1), tiny_teacher(seed=1)
    assert torch.equal(torch.get_rng_state(), state), "building the teacher must leave the global RNG alone"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    texts = _teacher_texts_ref(minillm.LLM(a, tokenizer=tok), ["Hi"], 2, 6, seed=0)
    assert len(texts) == 2 and texts[0] != texts[1] and all(t.startswith("Hi") for t in texts)


def test_train_step_reference_is_the_step_of_distill():
    """Three reference steps with distill's optimizer, schedule and batches train the student exactly as
    minillm.distill.distill(kd_weight=1) does."""
    teacher = tiny_teacher(seed=2, num_layers=3)
    student = copy.deepcopy(teacher)
    drop_layers(student, [1])
    mine = copy.deepcopy(student)
    stream = torch.randint(3, 256, (400,), generator=torch.Generator().manual_seed(0))
    steps, lr, warmup_steps, max_grad_norm, temperature = 3, 1e-3, 1, 0.05, 2.0
    distill(student, teacher, CharTokenizer(), steps, data=stream, temperature=temperature, batch_size=2, seq_len=12,
            lr=lr, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, freeze_embedding=False, eval_tokens=16,
            seed=0, progress=False)
    optimizer = torch.optim.AdamW(mine.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps)
        ids = sample_batch(stream, 2, 12, generator)
        _train_step_ref(mine, teacher, ids, optimizer, max_grad_norm, temperature)
    assert all(p.grad is None for p in teacher.parameters())
    for (name, a), b in zip(mine.named_parameters(), student.parameters()):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


# Each run of these generates with the real model or trains a student step: the seed sweeps run them on 5 seeds.
SLOW_CHECK_SEEDS = {grading.check_teacher_texts: 5, grading.check_train_step: 5}
