"""The losses of knowledge distillation: match the teacher's whole distribution, not just the next token.

In doing so, you will learn about:
  * logit distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531,
    section 2): soften both distributions with a temperature T, ``p = softmax(z / T)``, and minimize
    ``KL(p_teacher || p_student)``. The teacher's small probabilities ("a 2 looks a bit like a 3") carry far more
    information per token than the one-hot next token does;
  * the T² factor: the gradient of the softened KL with respect to a student logit is ``(q_i - p_i) / T``
    (Hinton eq. 2 with q the student and p the teacher), and it shrinks like 1/T² once T is large, because then
    ``q_i - p_i ~ (z_i - v_i) / (V T)`` (z student, v teacher logits, both zero-mean). Multiplying the loss by T²
    keeps its gradient on the same scale whatever T is, so changing T does not silently change the learning rate
    or the balance with the next-token loss;
  * the two limits: as T -> inf both softened distributions tend to uniform, the KL itself tends to 0, and
    ``T² KL`` tends to ``sum_i (d_i - mean(d))² / (2V)`` with ``d = z_teacher - z_student``: matching logits with
    a squared error (Hinton section 2.1). As T -> 0 the teacher becomes one-hot on its argmax a, and ``T KL`` tends
    to ``max_j z_student_j - z_student_a``: zero when the student's argmax agrees, a hinge when it does not;
  * with a one-hot teacher at T = 1 the KL is exactly the cross-entropy of the next-token loss, which is why the
    mix ``kd_weight * KD + (1 - kd_weight) * CE`` is a blend of two losses of the same kind and scale;
  * hidden-state matching (FitNets, Romero et al., arXiv 1412.6550; Minitron, Muralidharan et al., arXiv
    2407.14679): a pruned width keeps the residual stream C, so student layer outputs can be compared
    with the teacher's directly; normalizing by the teacher's size makes every layer count alike.

Shapes: B batch, T tokens, V vocab, C model dim (in code the temperature is always spelled ``temperature``).
Notebook 08 (``08_distillation``) compares these losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logit distillation: ``T² * KL(softmax(teacher / T) || softmax(student / T))``, averaged over tokens.

    student_logits, teacher_logits: (..., V), any leading shape (every position is one token, so the last position
    of a sequence counts too: it needs no target). Computed in float32 at least (bf16 logits would round the small
    probabilities that carry the teacher's knowledge), float64 stays float64. Teacher logits may be -inf (a token the
    teacher rules out: it contributes 0, as ``0 * log 0 = 0``). Returns a scalar.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; distillation needs one vocabulary for both"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    V = student_logits.shape[-1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype).reshape(-1, V) / temperature, dim=-1)  # (N, V) student
    log_p = F.log_softmax(teacher_logits.to(dtype).reshape(-1, V) / temperature, dim=-1)  # (N, V) teacher
    p = log_p.exp()
    # xlogy(p, p) is 0 where p == 0, so a teacher that rules a token out (-inf logit) adds no NaN.
    kl = (torch.special.xlogy(p, p) - p * log_q).sum(dim=-1)  # (N,)
    return temperature**2 * kl.mean()


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The plain language-model loss: cross-entropy of position t's logits against token t + 1.

    logits (B, T, V), input_ids (B, T) -> scalar, the mean over the B * (T - 1) predicted tokens.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape[1] < 2:
        raise ValueError(
            f"need logits (B, T, V) and input_ids (B, T) with T >= 2, got {tuple(logits.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    V = logits.shape[-1]
    preds = logits[:, :-1].float().reshape(-1, V)  # (B * (T-1), V): position t predicts token t + 1
    return F.cross_entropy(preds, input_ids[:, 1:].reshape(-1))


def mixed_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kd_weight * kd_loss + (1 - kd_weight) * next_token_loss`` and the two parts as floats.

    kd_weight = 1: pure distillation (the Minitron recipe); 0: plain next-token training, and teacher_logits may be
    None (the teacher is not needed). A part whose weight is 0 is neither computed nor reported.
    """
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight!r}")
    total, parts = student_logits.new_zeros((), dtype=torch.float32), {}
    if kd_weight > 0:
        if teacher_logits is None:
            raise ValueError(f"kd_weight={kd_weight} needs teacher logits")
        kd = kd_loss(student_logits, teacher_logits, temperature)
        total, parts["kd"] = total + kd_weight * kd, kd.item()
    if kd_weight < 1:
        ce = next_token_loss(student_logits, input_ids)
        total, parts["ce"] = total + (1 - kd_weight) * ce, ce.item()
    return total, parts


def hidden_state_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layer pairs of ``||h_s - h_t||² / ||h_t||²`` per token, for matched residual streams (B, T, C).

    Dividing by the teacher's norm makes late layers (the residual stream grows with depth, as every layer adds to
    it) count no more than early ones. Both lists hold the pairs in the same order (the caller picks which teacher
    layer each student layer is matched with).
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(
            f"need the same non-zero number of states, got {len(student_states)} and {len(teacher_states)}"
        )
    losses = []
    for h_s, h_t in zip(student_states, teacher_states):
        if h_s.shape != h_t.shape:
            raise ValueError(f"hidden states differ in shape: {tuple(h_s.shape)} vs {tuple(h_t.shape)}")
        err = (h_s.float() - h_t.float()).pow(2).sum(-1)  # (B, T)
        losses.append((err / h_t.float().pow(2).sum(-1).clamp_min(1e-6)).mean())
    return torch.stack(losses).mean()
