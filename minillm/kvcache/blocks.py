"""Block manager: the bookkeeping behind a paged KV cache (no tensors here).

Teaches: how vLLM's PagedAttention (Kwon et al., SOSP 2023, arXiv:2309.06180, sections 4.2-4.4) stores each
sequence's KV cache in fixed-size blocks named by a per-sequence *block table*, so memory is reserved one block at a
time instead of one maximum-length sequence at a time; reference counts let sequences *share* blocks (parallel
sampling forks a sequence without copying its prompt), *copy-on-write* un-shares a block just before it is written,
and *prefix caching* (vLLM's automatic prefix caching, SGLang's RadixAttention, arXiv:2312.07104) finds blocks
whose content is already cached by hashing the token ids that produced them, chained through the parent block's
hash so a hash names a whole prefix. Freed cached blocks stay findable until a fresh block is needed, then the least
recently freed one is evicted. Explained in notebooks/04_paged_attention.ipynb.

Conventions. A sequence's tokens live at positions 0, 1, ...; position p sits in block ``block_table[p // BS]`` at
offset ``p % BS``, i.e. in slot ``block_table[p // BS] * BS + p % BS`` of the flat pool. How many tokens' K/V is
written belongs to the sequence (``Sequence.num_computed_tokens``), which passes it to ``commit``; the manager keeps
only block-level facts: the hash chain of each sequence's *full, written* blocks. Its length says where the next write
starts (block ``len(chain)``), so it knows which blocks that write touches (the ones copy-on-write must un-share).
"""

from collections import OrderedDict, deque


def check_block_size(block_size: int) -> None:
    """Block sizes are powers of two: ``p // BS`` and ``p % BS`` become a shift and a mask in every kernel."""
    if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two (1, 2, 4, ..., 16, ...), got {block_size!r}")


class OutOfBlocksError(RuntimeError):
    """No free KV block is left; callers check ``can_allocate(num_blocks_needed(...))`` first."""


class BlockManager:
    """Free list, reference counts, block tables, prefix cache and copy-on-write for ``num_blocks`` blocks.

    Prefix-cache statistics count *prompt tokens*: ``prefix_cache_queries`` is the number of prompt tokens seen by
    ``allocate_prompt`` and ``prefix_cache_hits`` the number whose K/V was found cached.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        check_block_size(block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks  # hash of a cached full block, else None
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # its tokens: rules out hash collisions
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # ref 0, nothing cached: take these first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached, least recently freed first
        self.hash_to_block: dict[int, int] = {}
        self.tables: dict[int, list[int]] = {}
        self.seq_hashes: dict[int, list[int]] = {}  # hash chain of each sequence's full blocks whose K/V is written
        self.prefix_cache_hits = 0
        self.prefix_cache_queries = 0

    # ---- counts ----------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: never-used or freed ones, plus cached ones no sequence holds."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of prompt tokens whose K/V came from the prefix cache (0.0 before any prompt)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def stats(self) -> dict[str, float]:
        return {
            "num_blocks": self.num_blocks,
            "num_used_blocks": self.num_used_blocks,
            "num_free_blocks": self.num_free_blocks,
            "num_cached_blocks": self.num_cached_blocks,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
        }

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _check_seq(self, seq_id: int) -> list[int]:
        if seq_id not in self.tables:
            raise ValueError(f"sequence {seq_id} has no blocks (never allocated, or already freed: double free?)")
        return self.tables[seq_id]

    def _shared_in_write_range(self, seq_id: int, num_tokens: int) -> list[int]:
        """Indices into the table of shared blocks the next write, up to position num_tokens, would touch.

        A full written block is never written again, so the write starts in the first block past the hash chain.
        """
        table = self.tables[seq_id]
        first, last = len(self.seq_hashes[seq_id]), min(self._blocks_for(num_tokens), len(table))
        return [i for i in range(first, last) if self.ref_counts[table[i]] > 1]

    def num_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Fresh blocks ``seq_id`` needs to hold ``num_tokens`` tokens, copy-on-write copies included.

        For a sequence not allocated yet this is the upper bound ``ceil(num_tokens / BS)`` (prefix hits may need fewer).
        """
        if seq_id not in self.tables:
            return self._blocks_for(num_tokens)
        growth = max(0, self._blocks_for(num_tokens) - len(self.tables[seq_id]))
        return growth + len(self._shared_in_write_range(seq_id, num_tokens))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    # ---- allocate / free ---------------------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        elif self.evictable:
            block_id, _ = self.evictable.popitem(last=False)  # LRU: the block freed longest ago
            del self.hash_to_block[self.block_hashes[block_id]]
            self.block_hashes[block_id] = self.block_tokens[block_id] = None
        else:
            raise OutOfBlocksError(
                f"no free KV block left (all {self.num_blocks} in use); check can_allocate(num_blocks_needed(...))"
            )
        assert self.ref_counts[block_id] == 0, f"free block {block_id} has ref count {self.ref_counts[block_id]}"
        self.ref_counts[block_id] = 1
        return block_id

    def allocate_prompt(self, seq_id: int, token_ids: list[int]) -> int:
        """Create ``seq_id``'s block table, reusing cached blocks for the longest cached prefix of ``token_ids``.

        Returns how many prompt tokens already have their K/V cached: a multiple of BS, always < len(token_ids),
        since the last prompt token must be computed to get the next-token logits.
        """
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} is already allocated")
        table, hashes, bs = [], [], self.block_size
        if self.enable_prefix_caching:
            parent = None
            for i in range((len(token_ids) - 1) // bs):  # full blocks strictly before the last token
                tokens = tuple(token_ids[i * bs : (i + 1) * bs])
                h = hash((parent, tokens))
                block_id = self.hash_to_block.get(h)
                if block_id is None or self.block_tokens[block_id] != tokens:
                    break
                if self.ref_counts[block_id] == 0:
                    del self.evictable[block_id]
                self.ref_counts[block_id] += 1
                table.append(block_id)
                hashes.append(h)
                parent = h
        num_cached = len(table) * bs
        self.tables[seq_id], self.seq_hashes[seq_id] = table, hashes
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += num_cached
        return num_cached

    def undo_allocate_prompt(self, seq_id: int, num_prompt_tokens: int) -> None:
        """Take back ``allocate_prompt`` for a sequence that was not scheduled after all: its blocks, and its count in
        the prefix-cache statistics (it will be looked up again when it is)."""
        self._check_seq(seq_id)
        self.prefix_cache_queries -= num_prompt_tokens
        self.prefix_cache_hits -= len(self.seq_hashes[seq_id]) * self.block_size  # just allocated: chain = its hits
        self.free(seq_id)

    def ensure_capacity(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
        """Give positions [0, num_tokens) slots; un-share (copy-on-write) any shared block the next write touches.

        Returns the (src, dst) block pairs whose K/V the cache must copy before writing (``PagedKVCache.copy_blocks``).
        Raises ``ValueError`` if the sequence can never fit in the pool, ``OutOfBlocksError`` if it does not fit now.
        """
        table = self._check_seq(seq_id)
        if self._blocks_for(num_tokens) > self.num_blocks:
            raise ValueError(
                f"sequence {seq_id} needs {self._blocks_for(num_tokens)} blocks for {num_tokens} tokens but the pool "
                f"only has {self.num_blocks}: it can never fit (use more KV blocks or a shorter request)"
            )
        needed = self.num_blocks_needed(seq_id, num_tokens)
        if not self.can_allocate(needed):
            raise OutOfBlocksError(f"sequence {seq_id} needs {needed} blocks, only {self.num_free_blocks} free")
        copies = []
        for i in self._shared_in_write_range(seq_id, num_tokens):
            src = table[i]
            self.ref_counts[src] -= 1  # still > 0: someone else holds it
            table[i] = self._take_free_block()
            copies.append((src, table[i]))
        while len(table) < self._blocks_for(num_tokens):
            table.append(self._take_free_block())
        return copies

    def commit(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Record that the K/V of ``token_ids[:num_computed]`` is written; newly full blocks enter the prefix cache.

        ``num_computed`` is the sequence's own count (``Sequence.num_computed_tokens``): counts only grow, so it cannot
        fall back into a block already written and hashed.
        """
        table, hashes, bs = self._check_seq(seq_id), self.seq_hashes[seq_id], self.block_size
        if not len(hashes) * bs <= num_computed <= min(len(token_ids), len(table) * bs):
            raise ValueError(
                f"commit of sequence {seq_id}: num_computed={num_computed} must lie in "
                f"[{len(hashes) * bs} (its written full blocks), min(len(token_ids)={len(token_ids)}, "
                f"slots={len(table) * bs})]"
            )
        for i in range(len(hashes), num_computed // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash((hashes[-1] if hashes else None, tokens))
            hashes.append(h)
            block_id = table[i]
            # The same content may already be cached in another block (computed concurrently): keep that one.
            if self.enable_prefix_caching and h not in self.hash_to_block and self.block_hashes[block_id] is None:
                self.hash_to_block[h] = block_id
                self.block_hashes[block_id], self.block_tokens[block_id] = h, tokens

    def trim(self, seq_id: int, num_tokens: int) -> None:
        """Give back the blocks past position ``num_tokens`` (speculative decoding's rollback, chapter 09).

        A verification step reserves slots for every guessed token; the rejected guesses' K/V is garbage, so the
        sequence keeps only ``num_tokens`` positions and the blocks holding nothing else return to the pool. Only
        unhashed tail blocks can go: ``commit`` was given the accepted count, so no rejected token was ever hashed
        into the prefix cache, and a trim into a written full block is refused.
        """
        table, hashes, bs = self._check_seq(seq_id), self.seq_hashes[seq_id], self.block_size
        if not len(hashes) * bs <= num_tokens <= len(table) * bs:
            raise ValueError(
                f"trim of sequence {seq_id} to {num_tokens} tokens: must lie in [{len(hashes) * bs} (its written full "
                f"blocks), {len(table) * bs} (its slots)]"
            )
        while len(table) > self._blocks_for(num_tokens):
            block_id = table.pop()
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} ref count went negative"
            if self.ref_counts[block_id] == 0:  # as in free(): a block cached by someone else stays findable
                if self.block_hashes[block_id] is None:
                    self.free_block_ids.append(block_id)
                else:
                    self.evictable[block_id] = None

    def fork(self, parent_id: int, child_id: int) -> None:
        """``child_id`` shares every block of ``parent_id`` (parallel sampling, n > 1); nothing is copied yet."""
        table = self._check_seq(parent_id)
        if child_id in self.tables:
            raise ValueError(f"cannot fork into sequence {child_id}: it is already allocated")
        for block_id in table:
            self.ref_counts[block_id] += 1
        self.tables[child_id] = list(table)
        self.seq_hashes[child_id] = list(self.seq_hashes[parent_id])

    def free(self, seq_id: int) -> None:
        """Drop ``seq_id``'s references; blocks nobody holds become free (cached ones stay findable until evicted)."""
        table = self._check_seq(seq_id)
        # Reverse order: a prefix's tail blocks are evicted before its head, which more requests share.
        for block_id in reversed(table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} ref count went negative"
            if self.ref_counts[block_id] == 0:
                if self.block_hashes[block_id] is None:
                    self.free_block_ids.append(block_id)
                else:
                    self.evictable[block_id] = None
        del self.tables[seq_id], self.seq_hashes[seq_id]

    # ---- addressing --------------------------------------------------------------------------------------------
    def block_table(self, seq_id: int) -> list[int]:
        return list(self._check_seq(seq_id))

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat pool slots of positions [start, end): ``block_table[p // BS] * BS + p % BS``."""
        table, bs = self._check_seq(seq_id), self.block_size
        if not 0 <= start <= end <= len(table) * bs:
            raise ValueError(
                f"positions [{start}, {end}) of sequence {seq_id} are outside its {len(table) * bs} slots; "
                "call ensure_capacity first"
            )
        return [table[p // bs] * bs + p % bs for p in range(start, end)]
