"""Which rank holds which attention heads: tensor parallelism meets grouped-query attention.

Megatron-LM (arXiv 1909.08053) splits attention by heads: each rank computes some query heads end to end, so the
only communication of the attention block is one all-reduce after ``o_proj``. With grouped-query attention (GQA) a
query head also needs the key/value head of its group, which gives two cases:

  * ``world_size <= num_kv_heads``: whole groups go to ranks (each KV head lives on one rank, with its query heads);
  * ``world_size > num_kv_heads``: there are more ranks than KV heads, so a group's query heads are spread over
    several ranks, and each of those ranks holds a copy of the group's KV head: it is **replicated**.

Inside a rank every local KV head must serve the same number of local query heads (the attention kernels map local
query head h to local KV head ``h // (H_local / Hkv_local)``), which is why a rank takes whole groups or part of
exactly one group, never a mix. When the counts do not divide, ranks get unequal shares: SmolLM2-135M (9 query
heads, 3 KV heads) at world size 2 puts two groups (6 heads) on rank 0 and one (3 heads) on rank 1, so rank 0 does
twice the attention work. vLLM refuses such sizes (it needs num_heads % world_size == 0); minillm allows them so
that a 2-process CPU run works, and reports the imbalance. Notebook 11 draws the assignment for world sizes 1-4.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_evenly(n: int, parts: int) -> list[int]:
    """n items into `parts` contiguous chunks whose sizes differ by at most one, the larger ones first."""
    if parts < 1 or n < 0:
        raise ValueError(f"need parts >= 1 and n >= 0, got n={n}, parts={parts}")
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


@dataclass(frozen=True)
class HeadShard:
    """The heads one rank holds: global query head ids and global KV head ids, both contiguous and ascending."""

    rank: int
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]


def assign_heads(num_heads: int, num_kv_heads: int, world_size: int) -> list[HeadShard]:
    """Query and KV heads of every rank (see the module docstring); raises if some rank would get no query head."""
    check_head_split(num_heads, num_kv_heads, world_size)
    group = num_heads // num_kv_heads  # query heads per KV head
    shards = []
    if world_size <= num_kv_heads:  # whole groups per rank, no replication
        start = 0
        for rank, count in enumerate(split_evenly(num_kv_heads, world_size)):
            kv = tuple(range(start, start + count))
            shards.append(HeadShard(rank, tuple(h for g in kv for h in range(g * group, (g + 1) * group)), kv))
            start += count
        return shards
    # More ranks than KV heads: spread the ranks over the groups, then each group's query heads over its ranks.
    rank = 0
    for kv, num_ranks in enumerate(split_evenly(world_size, num_kv_heads)):
        start = kv * group
        for count in split_evenly(group, num_ranks):
            shards.append(HeadShard(rank, tuple(range(start, start + count)), (kv,)))
            start, rank = start + count, rank + 1
    return shards


def check_head_split(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    """Refuse a world size that leaves some rank without a query head (before any process starts).

    That is the only impossible case here: up to num_heads ranks, a group spreads over at most
    ceil(world_size / num_kv_heads) <= num_heads / num_kv_heads ranks, so every rank gets a query head and a copy
    of its KV head.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {world_size!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if world_size > num_heads:
        raise ValueError(
            f"tensor_parallel_size={world_size} is larger than the model's {num_heads} query heads: attention is split "
            f"by heads, so some rank would hold none; use at most {num_heads}"
        )


def replication(shards: list[HeadShard], num_kv_heads: int) -> int:
    """KV heads stored beyond one copy each, summed over ranks (0 when whole groups fit on ranks)."""
    return sum(len(s.kv_heads) for s in shards) - num_kv_heads
