"""The distillation loop: a pruned student learns from its frozen teacher, with the held-out perplexity watched.

In doing so, you will learn about:
  * the Minitron recipe (Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation",
    arXiv 2407.14679; Sreenivas et al., "LLM Pruning and Distillation in Practice", arXiv 2408.11796): prune a
    trained model, then retrain it on a small fraction of the original tokens with logit distillation
    (``kd_weight=1``), which recovers more per token than the plain next-token loss (``kd_weight=0``);
  * the standard optimizer setup of LLM training: AdamW (Loshchilov & Hutter, arXiv 1711.05101), a linear warm-up
    while Adam's second-moment estimates are still noise, then a cosine decay (Loshchilov & Hutter, SGDR, arXiv
    1608.03983) to ``min_lr_ratio * lr``, and clipping the global gradient norm (Pascanu et al., arXiv 1211.5063);
  * what to train: the tied embedding is 28M of SmolLM2's 135M parameters, untouched by pruning; freezing it
    (``freeze_embedding=True``) skips its weight gradient, a (V x C) matmul per step, and its AdamW state;
  * measuring what matters: perplexity on held-out text (``minillm.eval.perplexity``) every `eval_every` steps,
    next to the training loss and the throughput in tokens/s.

The teacher is frozen: it runs under ``torch.no_grad`` in eval mode, and none of its tensors reaches the optimizer
(a student that shares a parameter with it is refused). ``distill`` returns a ``DistillHistory`` to plot.
Notebook 08 (``08_distillation``) runs it on a pruned SmolLM2.

Shapes: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.distill.data import check_held_out, sample_batch, token_stream
from minillm.distill.losses import hidden_state_loss, mixed_loss
from minillm.eval import load_eval_text, perplexity


@dataclass
class DistillHistory:
    """What happened during ``distill``, for plots: one entry per step, one per evaluation."""

    steps: list[int] = field(default_factory=list)  # 1..num_steps
    losses: list[float] = field(default_factory=list)  # the optimized (mixed) loss at each step
    kd_losses: list[float] = field(default_factory=list)  # T² KL part (empty when kd_weight = 0)
    ce_losses: list[float] = field(default_factory=list)  # next-token part (empty when kd_weight = 1)
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    tokens_per_s: list[float] = field(default_factory=list)  # student tokens per second of the whole step
    eval_steps: list[int] = field(default_factory=list)  # 0 = before training
    perplexities: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the training steps, evaluations excluded

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def lr_at(step: int, num_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate of step `step` (1-based): linear warm-up to `lr` over `warmup_steps`, then a cosine from `lr`
    down to ``min_lr_ratio * lr`` at the last step."""
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)  # in (0, 1]
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextmanager
def capture_layer_outputs(model: nn.Module, layers, states: dict[int, torch.Tensor]):
    """While active, ``states[i]`` receives the output (B, T, C) of decoder layer i for each i in `layers`."""

    def hook(i: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            states[i] = output

        return record

    handles = [model.layers[i].register_forward_hook(hook(i)) for i in set(layers)]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def check_student_teacher(student: nn.Module, teacher: nn.Module, tokenizer: Any) -> None:
    """The bad inputs of distillation, refused with a fix in the message."""
    if student is teacher:
        raise ValueError("the student is the teacher object: training it would change the teacher. "
                         "Make the student a copy: student = copy.deepcopy(teacher), then prune it")
    teacher_tensors = {p.data_ptr(): name for name, p in teacher.named_parameters()}
    shared = [(name, teacher_tensors[p.data_ptr()]) for name, p in student.named_parameters()
              if p.data_ptr() in teacher_tensors]
    if shared:
        raise ValueError(f"the student shares {len(shared)} parameter(s) with the teacher (student "
                         f"{shared[0][0]!r} is teacher {shared[0][1]!r}): training would change the teacher. "
                         "Build the student from copy.deepcopy(teacher)")
    ds, dt = next(student.parameters()).device, next(teacher.parameters()).device
    if ds != dt:
        raise ValueError(f"the student is on {ds} but the teacher on {dt}; move both to one device")
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise ValueError(f"student and teacher have different vocabularies ({vs} vs {vt} tokens): logit "
                         "distillation compares them token by token, so both must use the same tokenizer")
    special = {m: (model.config.bos_token_id, list(model.config.eos_token_ids)) for m, model in
               (("student", student), ("teacher", teacher))}
    if special["student"] != special["teacher"]:
        raise ValueError(f"student and teacher use different tokenizers: (bos, eos) token ids {special['student']} "
                         f"vs {special['teacher']}; logit distillation needs one tokenizer for both")
    if len(tokenizer) > vs:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models only {vs}: it is not the "
                         "tokenizer of these models")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    steps: int,
    data: torch.Tensor | list[str] | str | None = None,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    batch_size: int = 4,
    seq_len: int = 128,
    lr: float = 3e-4,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    freeze_embedding: bool = True,
    hidden_weight: float = 0.0,
    layer_map: list[int] | None = None,
    eval_every: int | None = None,
    eval_text: str | None = None,
    eval_tokens: int = 512,
    seed: int = 0,
    save_to: str | Path | None = None,
    progress: bool = True,
    callback: Callable[[DistillHistory], None] | None = None,
) -> DistillHistory:
    """Train `student` in place to imitate `teacher` for `steps` AdamW steps; return the history.

    data: training token ids (N,), text(s), or None for the shipped calibration text; each step draws `batch_size`
        random windows of `seq_len` tokens (seeded by `seed`). Never the held-out evaluation text (refused).
    kd_weight: 1 = logit distillation at `temperature` (``losses.kd_loss``), 0 = next-token loss only (the teacher
        is not run), in between a mix (``losses.mixed_loss``).
    lr, warmup_steps (None: 10% of steps), min_lr_ratio: the schedule of ``lr_at``. The defaults (4 x 128 tokens
        a step, peak lr 3e-4) are sized for a CPU: on a 20-layer SmolLM2 student, 3e-4 recovered more in 20-40 steps
        than 1e-4 or 1e-3. max_grad_norm: clip threshold of the global gradient norm (None: no clipping).
    freeze_embedding: do not train the embedding (and the LM head tied to it): the student keeps the teacher's.
    hidden_weight: add ``hidden_weight * hidden_state_loss`` between each student layer's output and that of teacher
        layer ``layer_map[i]`` (default: the same index; after ``drop_layers`` pass the kept indices it returned).
    eval_every: measure perplexity on `eval_text` (default: the shipped held-out text, first `eval_tokens` tokens)
        before training, every `eval_every` steps and after the last (None: before and after only).
    save_to: a folder to save the trained student in (``checkpoint.save_checkpoint``), loadable by load_model.
    callback: called with the history after every step (and its evaluation, if any): notebook 08 redraws its
        training curves from it while the training runs.
    """
    check_student_teacher(student, teacher, tokenizer)
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 or None, got {eval_every!r}")
    warmup_steps = max(1, steps // 10) if warmup_steps is None else warmup_steps
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be in [0, steps={steps}], got {warmup_steps}")
    layer_map = list(range(len(student.layers))) if layer_map is None else list(layer_map)
    if hidden_weight > 0 and (len(layer_map) != len(student.layers) or max(layer_map) >= len(teacher.layers)):
        raise ValueError(f"layer_map needs one teacher layer (< {len(teacher.layers)}) per student layer "
                         f"({len(student.layers)}), got {layer_map}")

    device = next(student.parameters()).device
    stream = data if isinstance(data, torch.Tensor) else token_stream(tokenizer, data)
    check_held_out(stream, tokenizer)
    eval_text = load_eval_text("offline") if eval_text is None else eval_text
    generator = torch.Generator().manual_seed(seed)
    student.embed_tokens.weight.requires_grad_(not freeze_embedding)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameter (all have requires_grad=False)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    teacher.eval()

    def evaluate(step: int) -> None:
        student.eval()
        history.eval_steps.append(step)
        history.perplexities.append(perplexity(student, tokenizer, text=eval_text, max_tokens=eval_tokens,
                                               window=min(eval_tokens, 512), stride=min(eval_tokens, 512),
                                               progress=False))
        student.train()

    # Hidden-state matching hooks every student layer and its teacher partner; without it, nothing is hooked.
    hooked_student = range(len(student.layers)) if hidden_weight > 0 else []
    hooked_teacher = layer_map if hidden_weight > 0 else []
    history = DistillHistory()
    evaluate(0)
    bar = tqdm(range(1, steps + 1), desc="distill", disable=not progress)
    for step in bar:
        start = time.perf_counter()
        ids = sample_batch(stream, batch_size, seq_len, generator).to(device)  # (B, T)
        student_states, teacher_states = {}, {}
        with capture_layer_outputs(student, hooked_student, student_states):
            student_logits = student(ids)  # (B, T, V)
        teacher_logits = None
        if kd_weight > 0 or hidden_weight > 0:
            with torch.no_grad(), capture_layer_outputs(teacher, hooked_teacher, teacher_states):
                teacher_logits = teacher(ids)  # (B, T, V)
        loss, parts = mixed_loss(student_logits, teacher_logits, ids, kd_weight, temperature)
        if hidden_weight > 0:
            student_h = [student_states[i] for i in range(len(layer_map))]
            teacher_h = [teacher_states[j] for j in layer_map]  # student layer i <-> teacher layer layer_map[i]
            loss = loss + hidden_weight * hidden_state_loss(student_h, teacher_h)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps, min_lr_ratio)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
        optimizer.step()
        elapsed = time.perf_counter() - start
        history.seconds += elapsed
        history.steps.append(step)
        history.losses.append(loss.item())
        history.kd_losses += [parts["kd"]] if "kd" in parts else []
        history.ce_losses += [parts["ce"]] if "ce" in parts else []
        history.learning_rates.append(optimizer.param_groups[0]["lr"])
        history.grad_norms.append(norm.item())
        history.tokens_per_s.append(ids.numel() / elapsed)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{ids.numel() / elapsed:.0f}")
        if step == steps or (eval_every is not None and step % eval_every == 0):
            evaluate(step)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{ids.numel() / elapsed:.0f}",
                            ppl=f"{history.perplexities[-1]:.1f}")
        if callback is not None:
            callback(history)
    student.eval()
    if save_to is not None:
        from minillm.distill.checkpoint import save_checkpoint

        save_checkpoint(student, tokenizer, save_to)
    return history
