"""Contiguous KV cache: one preallocated slab of keys and values per sequence, filled one column per step.

In doing so, you will learn about:
  * why decoding needs a cache at all: step t of generation needs the keys and values of all t earlier tokens, and
    they never change, so we compute them once and store them (the "incremental decoding" every Transformer
    decoder uses since "Attention Is All You Need", arXiv:1706.03762; Pope et al., "Efficiently Scaling Transformer
    Inference", arXiv:2211.05102, section 2 analyses its memory);
  * prefill vs decode: the first forward pass writes the whole prompt (T = prompt length), every later one writes
    T = 1 token and attends over all S cached ones, with the causal mask bottom-right aligned (query i sees keys
    j <= i + S - T);
  * left padding: prompts of different lengths share a batch by padding them on the LEFT, so every row's next
    token lands in the same column of the slab. The write offset is then one number for the whole batch, a decode
    step is one (B, Hkv, 1, D) copy, and the bottom-right causal mask stays right for every row; the only extra is a
    key padding mask that hides each row's leading pads. (Right padding would put each row's next token in a
    different column: a scatter per row and a per-row causal mask.)

Layout: ``k_cache``, ``v_cache`` are (L, B, Hkv, S_max, D). A layer's slice ``k_cache[layer, :B, :, :S]`` is already
the (B, Hkv, S, D) tensor attention wants, with no copy: contiguous in S for each head, which is what a decode step
streams through. The price is the reservation: every row holds S_max columns whether it uses them or not
(``minillm.kvcache.memory`` counts that waste; paging, chapter 04, removes it).
The cache only stores; ``minillm.attention.backends.ContiguousAttention`` appends each layer's new K/V and attends.
Explained in notebooks/03_kv_cache.ipynb; ``minillm.engine.contiguous`` drives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minillm.kvcache.memory import check_fits, dtype_bytes


@dataclass
class ContiguousBatch:
    """Where one forward pass writes in a left-padded contiguous cache, and what each row may see.

    start: the column of this step's first new token, the same in every row (left padding lines rows up).
    num_pads: (B,) long, the left pads of each row; row b's real tokens start at column num_pads[b].
    positions: (B, T) long, position ids of the new tokens: column - num_pads (pads get 0; their output is unused).
    key_padding_mask: (B, start + T) bool, True for real tokens, False for pads; None when no row is padded.
    """

    start: int
    num_pads: torch.Tensor
    positions: torch.Tensor
    key_padding_mask: torch.Tensor | None

    @classmethod
    def prefill(cls, prompt_lens: list[int], device: torch.device | str = "cpu") -> ContiguousBatch:
        """The batch of a left-padded prefill: prompts of `prompt_lens` tokens, padded to P = max(prompt_lens)."""
        if not prompt_lens or any(not isinstance(n, int) or n < 1 for n in prompt_lens):
            raise ValueError(f"prompt_lens must be a non-empty list of positive ints, got {prompt_lens!r}")
        P = max(prompt_lens)
        num_pads = torch.tensor([P - n for n in prompt_lens], dtype=torch.long, device=device)  # (B,)
        return cls.at(0, P, num_pads)

    @classmethod
    def at(cls, start: int, num_new: int, num_pads: torch.Tensor) -> ContiguousBatch:
        """The batch writing `num_new` tokens at columns [start, start + num_new) of rows padded by `num_pads`."""
        columns = torch.arange(start + num_new, device=num_pads.device)  # (S,)
        key_padding_mask = columns[None, :] >= num_pads[:, None]  # (B, S)
        positions = (columns[None, start:] - num_pads[:, None]).clamp(min=0)  # (B, T)
        has_pads = bool((num_pads > 0).any())
        return cls(start, num_pads, positions, key_padding_mask if has_pads else None)

    def next_decode(self) -> ContiguousBatch:
        """The batch of the decode step after this one: one new token per row, right after this step's tokens."""
        return ContiguousBatch.at(self.start + self.positions.shape[1], 1, self.num_pads)


def left_pad(
    token_ids: list[list[int]], pad_token_id: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, ContiguousBatch]:
    """Token lists of different lengths -> left-padded input_ids (B, P) and the prefill's ContiguousBatch."""
    batch = ContiguousBatch.prefill([len(ids) for ids in token_ids], device)
    P = batch.positions.shape[1]
    input_ids = torch.tensor([[pad_token_id] * (P - len(ids)) + list(ids) for ids in token_ids], device=device)
    return input_ids, batch


class ContiguousKVCache:
    """K and V slabs for every layer, (L, B_max, Hkv, S_max, D) each, and how many columns each layer has filled.

    ``lengths[layer]`` counts filled columns (pads included); with left padding it is the same for every row, so
    the cache keeps one number per layer. Rows [0, B) of the slab serve a batch of B sequences.
    """

    def __init__(
        self,
        num_layers: int,
        max_batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        for name, value in [("num_layers", num_layers), ("max_batch_size", max_batch_size), ("max_len", max_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_batch_size, self.max_len = max_batch_size, max_len
        shape = (num_layers, max_batch_size, num_kv_heads, max_len, head_dim)  # (L, B, Hkv, S_max, D)
        check_fits(2 * math.prod(shape) * dtype_bytes(dtype), device,
                   f"a contiguous KV cache of {max_batch_size} rows x {max_len} tokens",
                   "use a smaller max_num_seqs or max_model_len (or kv_cache='paged', which reserves what is used)")
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_layers

    @classmethod
    def for_model(cls, config, max_batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> ContiguousKVCache:
        """A cache shaped for `config` (a ModelConfig): its layers, KV heads and head dim."""
        return cls(config.num_layers, max_batch_size, max_len, config.num_kv_heads, config.head_dim, dtype, device)

    @property
    def nbytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes

    def reset(self) -> None:
        """Forget every stored token (the memory stays reserved; stale values are overwritten before being read)."""
        self.lengths = [0] * len(self.lengths)

    def truncate(self, length: int) -> None:
        """Forget the columns past `length` in every layer, e.g. to time the same decode step twice."""
        if not 0 <= length <= min(self.lengths):
            raise ValueError(f"can only truncate to 0..{min(self.lengths)} filled columns, got {length}")
        self.lengths = [length] * len(self.lengths)

    def append(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at columns [start, start + T) of rows [0, B) of layer `layer_idx`.

        `start` must be where this layer's filled columns end (an append, not an overwrite). Returns views of
        everything stored in those rows, k_all, v_all (B, Hkv, start + T, D).
        """
        if not 0 <= layer_idx < len(self.lengths):
            raise ValueError(f"layer_idx must be in [0, {len(self.lengths)}), got {layer_idx}")
        if k.dim() != 4 or k.shape != v.shape or k.shape[1:2] + k.shape[3:] != self.k_cache.shape[2:3] + self.k_cache.shape[4:]:
            raise ValueError(
                f"k and v must both be (B, Hkv={self.k_cache.shape[2]}, T, D={self.k_cache.shape[4]}), "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.dtype != self.k_cache.dtype or v.dtype != self.k_cache.dtype:
            raise TypeError(f"the cache holds {self.k_cache.dtype}, got k {k.dtype} and v {v.dtype}; "
                            "build the cache with the model's dtype")
        if k.device != self.k_cache.device or v.device != self.k_cache.device:
            raise ValueError(f"the cache lives on {self.k_cache.device}, got k on {k.device} and v on {v.device}")
        B, _, T, _ = k.shape
        if B > self.max_batch_size:
            raise ValueError(f"a batch of {B} sequences does not fit a cache reserved for {self.max_batch_size}")
        if start != self.lengths[layer_idx]:
            raise ValueError(
                f"layer {layer_idx} holds {self.lengths[layer_idx]} columns; an append must start there, not at {start}"
            )
        if start + T > self.max_len:
            raise ValueError(
                f"appending {T} tokens after {start} needs {start + T} columns, but the cache reserved max_len="
                f"{self.max_len}; reserve prompt length + max_tokens"
            )
        self.k_cache[layer_idx, :B, :, start : start + T] = k
        self.v_cache[layer_idx, :B, :, start : start + T] = v
        self.lengths[layer_idx] = start + T
        return self.k_cache[layer_idx, :B, :, : start + T], self.v_cache[layer_idx, :B, :, : start + T]
