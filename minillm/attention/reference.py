"""Exact attention with materialized scores: the oracle every faster attention in minillm is tested against.

This module teaches scaled dot-product attention as written in "Attention Is All You Need" (arXiv:1706.03762, §3.2.1),
softmax(q kᵀ / sqrt(D)) v, with the two masks an inference engine needs:

- a causal mask, bottom-right aligned when there are fewer queries than keys (T < S): query i sits at absolute
  position i + (S - T), so it sees keys j <= i + (S - T). A prefill chunk appended to an existing KV cache, or a
  single decode token (T = 1), is exactly this case;
- a key padding mask, for batches whose rows have different lengths.

Grouped-query attention (GQA, arXiv:2305.13245) shares one K/V head between H // Hkv query heads; here we simply
copy K/V with `repeat_kv`, which the Triton kernel in `flash.py` avoids by indexing.

The T x S score matrix is built in full, so memory grows as T * S: notebook 02_attention measures that and then
removes it with the online softmax (`online.py`) and a tiled kernel (`flash.py`).
"""

import torch


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each K/V head `n_rep` times so it lines up with its group of query heads.

    x: (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D); query head h uses KV head h // n_rep.
    """
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query i may attend key j, i.e. j <= i + (S - T) (bottom-right aligned)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (S - T)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: tuple[str, ...]) -> None:
    """Raise a clear error unless q, k, v are tensors with ``layout``'s axes that fit together.

    layout names the axes, heads second and head dim D last: ("B", "heads", "tokens", "D") here, ("packed tokens",
    "heads", "D") for packed batches (varlen.py). k and v must match; q shares D, dtype and device with them, and
    its H heads must be a multiple of their Hkv heads (GQA).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(layout):
            raise ValueError(f"{name} must have {len(layout)} dims ({', '.join(layout)}), got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"k/v head dim {k.shape[-1]} does not match q head dim {D}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error unless q (B, H, T, D), k, v (B, Hkv, S, D) fit together."""
    check_qkv(q, k, v, ("B", "heads", "tokens", "D"))
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch size")


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention, computed in fp32 and returned in the input dtype.

    q: (B, H, T, D); k, v: (B, Hkv, S, D) with H % Hkv == 0.
    causal: bottom-right aligned causal mask (query i sees keys j <= i + S - T).
    scale: multiplies the scores; default 1 / sqrt(D).
    key_padding_mask: optional (B, S) bool, True for real keys, False for padding.
    A query that sees no key at all (possible with T > S, or with padding) gets an all-zero output row.
    Returns o: (B, H, T, D).
    """
    check_attention_inputs(q, k, v)
    B, H, T, D = q.shape
    S = k.shape[2]
    if scale is None:
        scale = D**-0.5
    n_rep = H // k.shape[1]
    # fp16/bf16 scores overflow and round badly; the oracle works in fp32 throughout.
    qf = q.float()
    kf = repeat_kv(k.float(), n_rep)  # (B, H, S, D)
    vf = repeat_kv(v.float(), n_rep)  # (B, H, S, D)
    scores = (qf @ kf.transpose(-2, -1)) * scale  # (B, H, T, S)

    allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & causal_mask(T, S, q.device)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, S) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (B, S)={(B, S)}, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        allowed = allowed & key_padding_mask[:, None, None, :].to(q.device)  # (B, 1, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    # A row with every key masked is softmax(-inf, ..., -inf) = NaN; define its output as zero, like the kernel.
    probs = torch.nan_to_num(probs, nan=0.0)
    return (probs @ vf).to(q.dtype)  # (B, H, T, D)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """The (B, H, T, S) attention probabilities softmax(q kᵀ * scale), fp32, for plotting what heads look at."""
    B, H, T, D = q.shape
    S = k.shape[2]
    if scale is None:
        scale = D**-0.5
    scores = (q.float() @ repeat_kv(k.float(), H // k.shape[1]).transpose(-2, -1)) * scale  # (B, H, T, S)
    if causal:
        scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
