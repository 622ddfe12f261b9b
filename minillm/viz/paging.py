"""Pictures of paged KV memory: where a batch's KV slots go, block tables, and a step-by-step block manager.

In doing so, you will see:
  * fragmentation: a contiguous cache reserves max_len slots per request up front, so a realistic mix of request
    lengths leaves most of its memory empty; a paged cache (Kwon et al., PagedAttention, arXiv:2309.06180,
    section 3 and figure 2) reserves one block of BS slots at a time, so at most BS - 1 slots per request idle;
  * block tables: each sequence's logical blocks 0, 1, 2, ... point to physical blocks anywhere in the pool;
  * sharing: prefix caching (full blocks found by their hash chain) and parallel sampling (fork) make several
    tables point at one block (reference count > 1), and copy-on-write un-shares a block just before a write.
Every picture is drawn from a real ``minillm.kvcache.blocks.BlockManager``, never from a mock-up.
Used by notebooks/04_paged_attention.ipynb. Matplotlib only; ``PagingStepper.widget`` also needs ipywidgets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from minillm.engine.engine import Engine
from minillm.engine.request import Sequence
from minillm.engine.sampling import SamplingParams
from minillm.engine.scheduler import Scheduler
from minillm.engine.simulate import StandInAttention, stand_in_model
from minillm.kvcache.blocks import BlockManager
from minillm.kvcache.memory import waste_fraction

FREE, RESERVED = 0, 1  # memory-map codes; request i is drawn with code i + 2


def sample_request_lengths(
    num_requests: int, max_len: int, seed: int = 0, median: int | None = None, sigma: float = 0.9
) -> list[int]:
    """Total lengths (prompt + output) of ``num_requests`` requests, log-normal and clipped to [1, max_len].

    Chat traces (ShareGPT, LMSYS-Chat) have heavy-tailed lengths with a median of a few hundred tokens; a log-normal
    with median ``max_len / 8`` (default) and sigma 0.9 has that shape. Seeded: the same list on every machine.
    """
    if num_requests < 1 or max_len < 1:
        raise ValueError(f"num_requests and max_len must be positive, got {num_requests} and {max_len}")
    rng = np.random.default_rng(seed)
    median = median or max(1, max_len // 8)
    lengths = rng.lognormal(np.log(median), sigma, num_requests)
    return [int(n) for n in np.clip(np.round(lengths), 1, max_len)]


def request_colors(num: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20" if num > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(num)]


# ---- memory maps: contiguous vs paged ------------------------------------------------------------------------------
@dataclass
class MemoryLayout:
    """Two maps of the same bytes, one row of ``row_slots`` KV slots per line; codes FREE, RESERVED, or request + 2.

    contiguous: (num_requests, row_slots), request i owns row i. paged: the pool, blocks in physical order, as
    allocated by a BlockManager growing every request one block at a time (so the requests' blocks interleave).
    """

    lengths: list[int]
    max_len: int
    block_size: int
    contiguous: np.ndarray
    paged: np.ndarray
    block_tables: list[list[int]]

    @property
    def contiguous_waste(self) -> float:
        """Reserved-but-unfilled slots over reserved slots."""
        return waste_fraction(self.contiguous.size, int((self.contiguous > RESERVED).sum()))

    @property
    def paged_waste(self) -> float:
        return waste_fraction(int((self.paged != FREE).sum()), int((self.paged > RESERVED).sum()))

    @property
    def num_blocks_used(self) -> int:
        return sum(len(t) for t in self.block_tables)


def layout_memory(lengths: list[int], max_len: int, block_size: int = 16) -> MemoryLayout:
    """Lay out requests of ``lengths`` tokens in a contiguous cache (max_len each) and in a paged pool of equal size."""
    if not lengths or any(n < 1 or n > max_len for n in lengths):
        raise ValueError(f"lengths must be in [1, max_len={max_len}], got {lengths}")
    n = len(lengths)
    row = np.arange(max_len)
    contiguous = np.where(row[None, :] < np.array(lengths)[:, None], np.arange(n)[:, None] + 2, RESERVED)

    blocks_per_row = -(-max_len // block_size)
    bm = BlockManager(n * blocks_per_row, block_size, enable_prefix_caching=False)
    for i in range(n):
        bm.allocate_prompt(i, [0])
    for j in range(blocks_per_row):  # every request grows by one block per round: the pool interleaves them
        for i, length in enumerate(lengths):
            if length > j * block_size:
                bm.ensure_capacity(i, min(length, (j + 1) * block_size))
    slots = np.full(bm.num_blocks * block_size, FREE)
    tables = [bm.block_table(i) for i in range(n)]
    for i, (table, length) in enumerate(zip(tables, lengths)):
        for j, block in enumerate(table):
            filled = min(block_size, length - j * block_size)
            slots[block * block_size : (block + 1) * block_size] = RESERVED
            slots[block * block_size : block * block_size + filled] = i + 2
    paged = slots.reshape(n, blocks_per_row * block_size)
    return MemoryLayout(list(lengths), max_len, block_size, contiguous, paged, tables)


def draw_memory_maps(layout: MemoryLayout, fig=None):
    """Contiguous and paged maps side by side: request colors are tokens, gray is reserved-but-empty, white free."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n = len(layout.lengths)
    cmap = ListedColormap([(1, 1, 1, 1), (0.78, 0.78, 0.78, 1)] + request_colors(n))
    fig = fig or plt.figure(figsize=(12, 0.28 * n + 1.6))
    axes = fig.subplots(1, 2)
    maps = [
        (layout.contiguous, f"contiguous: each request reserves max_len = {layout.max_len} slots\n"
         f"waste {100 * layout.contiguous_waste:.1f}% of reserved slots"),
        (layout.paged, f"paged (BS = {layout.block_size}): {layout.num_blocks_used} of "
         f"{layout.paged.size // layout.block_size} blocks reserved, white is free for more requests\n"
         f"waste {100 * layout.paged_waste:.1f}% of reserved slots"),
    ]
    for ax, (grid, title) in zip(axes, maps):
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=n + 1, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("KV slot within the row")
        ax.set_yticks([])
    axes[0].set_ylabel("one row per request")
    axes[1].set_ylabel("pool, same bytes, rows of blocks")
    fig.tight_layout()
    return fig


# ---- block tables and the pool -------------------------------------------------------------------------------------
def block_fill(bm: BlockManager, num_tokens: dict[int, int]) -> dict[int, int]:
    """Tokens held by each block some sequence (or the prefix cache) holds.

    ``num_tokens``: seq_id -> tokens whose K/V is written. The sequences own that count
    (``Sequence.num_computed_tokens``); the block manager only knows which blocks each one holds.
    """
    fill = {}
    for seq_id, table in bm.tables.items():
        n = num_tokens[seq_id]
        for j, block in enumerate(table):
            fill[block] = max(fill.get(block, 0), min(bm.block_size, max(0, n - j * bm.block_size)))
    for block in bm.evictable:
        fill[block] = bm.block_size  # cached blocks are full by construction
    return fill


def draw_blocks(bm: BlockManager, num_tokens: dict[int, int], names: dict[int, str] | None = None, ax=None,
                title: str = "", cols: int = 8):
    """Block tables (top) and the physical pool (bottom) of ``bm`` in one axes; returns the axes.

    ``num_tokens``: seq_id -> tokens whose K/V is written, for every sequence ``bm`` holds. Pool: each block is split
    into its BS slots, filled slots in the owner's color (the first table listing it), reserved-but-empty slots light
    gray; hatched blocks are shared (their reference count is printed); dashed ones are free but still cached
    (findable by their hash until evicted); plain white ones are free.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = names or {seq_id: str(seq_id) for seq_id in bm.tables}
    if ax is None:
        _, ax = plt.subplots(figsize=(0.9 * cols + 2, 0.5 * len(bm.tables) + 0.75 * (bm.num_blocks // cols + 1) + 0.6))
    seq_ids = sorted(bm.tables, key=lambda s: list(names).index(s) if s in names else len(names) + s)
    all_ids = list(names)
    colors = request_colors(max(len(all_ids), 1))
    color_of = {s: colors[all_ids.index(s) % len(colors)] if s in all_ids else (0.5, 0.5, 0.5, 1) for s in seq_ids}
    owner = {}
    for s in seq_ids:
        for block in bm.tables[s]:
            owner.setdefault(block, s)
    fill, bs = block_fill(bm, num_tokens), bm.block_size
    w, gap = 1.0, 0.18
    rows = -(-bm.num_blocks // cols)
    for block in range(bm.num_blocks):
        x, y = (block % cols) * (w + gap), -(block // cols) * 0.95
        ref = bm.ref_counts[block]
        cached = block in bm.evictable
        if ref:
            for slot in range(bs):
                face = color_of[owner[block]] if slot < fill.get(block, 0) else (0.85, 0.85, 0.85, 1)
                ax.add_patch(Rectangle((x + slot * w / bs, y), w / bs, 0.6, facecolor=face, edgecolor="none"))
        elif cached:
            ax.add_patch(Rectangle((x, y), w, 0.6, facecolor=(0.93, 0.93, 0.93, 1), edgecolor="none"))
        edge = dict(linestyle="--", edgecolor="gray") if cached else dict(edgecolor="black")
        ax.add_patch(Rectangle((x, y), w, 0.6, fill=False, hatch="///" if ref > 1 else None, linewidth=1, **edge))
        ax.text(x + 0.03, y + 0.62, str(block), fontsize=7, va="bottom", color="dimgray")
        if ref > 1:
            ax.text(x + w - 0.03, y + 0.62, f"x{ref}", fontsize=7, va="bottom", ha="right", weight="bold")
        elif cached:
            ax.text(x + w / 2, y + 0.3, "cached", fontsize=6, va="center", ha="center", color="gray")
    top = 1.0
    for k, s in enumerate(reversed(seq_ids)):  # first sequence on top
        y = top + k * 0.55
        ax.text(-0.15, y + 0.22, f"{names.get(s, s)}:", ha="right", va="center", fontsize=8)
        for j, block in enumerate(bm.tables[s]):
            x = j * 0.55
            ax.add_patch(Rectangle((x, y), 0.5, 0.44, facecolor=color_of[s], alpha=0.45, edgecolor="black"))
            ax.text(x + 0.25, y + 0.22, str(block), ha="center", va="center", fontsize=7)
    ax.text(-0.15, top + len(seq_ids) * 0.55 + 0.1, "block tables", fontsize=8, ha="right", style="italic")
    ax.text(-0.15, 0.3, "pool", fontsize=8, ha="right", style="italic")
    ax.set_xlim(-1.6, cols * (w + gap))
    ax.set_ylim(-(rows - 1) * 0.95 - 0.15, top + max(len(seq_ids), 1) * 0.55 + 0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


# ---- the stepper ---------------------------------------------------------------------------------------------------
@dataclass
class StepperRequest:
    """A scripted request: its prompt arrives before step ``arrival + 1``; it stops after ``max_new_tokens`` tokens.

    ``n > 1`` forks the prompt into n sequences (parallel sampling) that share its blocks until they write.
    """

    name: str
    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0
    n: int = 1


@dataclass
class Snapshot:
    step: int
    block_manager: BlockManager
    names: dict[int, str]
    num_tokens: dict[int, int] = field(default_factory=dict)  # seq_id -> tokens whose K/V is written
    events: list[str] = field(default_factory=list)


class PagingStepper:
    """Runs scripted requests through the real engine loop (``Engine``: scheduler, block manager, commit, free).

    The model and the attention backend are stand-ins that hold no tensors and "sample" token 0, so a step is pure
    bookkeeping: arriving prompts are admitted (prefix hits reuse cached blocks) and prefilled, parallel samples are
    forked from them once their prompt is written, every other running sequence appends one token (a new block when
    it crosses a block boundary, copy-on-write when it writes into a shared block), finished sequences are freed, and
    when a decode finds no free block the newest sequence is preempted. After each step the block manager is kept as a
    snapshot, with the events read off the step, so any step can be drawn again (``draw``, ``snapshots``, ``widget``).
    """

    def __init__(self, requests: list[StepperRequest], num_blocks: int = 24, block_size: int = 4,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 16, max_num_batched_tokens: int = 256):
        self.requests = list(requests)
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens)
        self.engine = Engine(self._stand_in_model, scheduler, StandInAttention(forks_share_kv=True))
        self.seqs: dict[int, Sequence] = {}
        self.names: dict[int, str] = {}
        self.step_index = 0
        self.history = [Snapshot(0, copy.deepcopy(self.bm), {}, {}, ["empty pool"])]
        self._tables_in_step: dict[int, list[int]] = {}

    @property
    def is_done(self) -> bool:
        return not self.engine.has_unfinished() and all(r.arrival < self.step_index for r in self.requests)

    def _stand_in_model(self, input_ids, positions, attention, metadata, logits_at):
        """While the model "runs", the step's blocks are allocated and none is freed yet: look at the tables here."""
        self._tables_in_step = {seq_id: list(table) for seq_id, table in self.bm.tables.items()}
        return stand_in_model(input_ids, positions, attention, metadata, logits_at)

    def _add(self, req: StepperRequest) -> None:
        params = SamplingParams(max_tokens=req.max_new_tokens, ignore_eos=True, n=req.n, temperature=float(req.n > 1))
        first = None
        for i in range(req.n):
            seq_id = len(self.seqs)
            seq = Sequence(seq_id, req.name, list(req.prompt), params, eos_token_ids=[], max_model_len=10**9)
            self.engine.add(seq, parent=first)
            self.seqs[seq_id], self.names[seq_id] = seq, req.name if req.n == 1 else f"{req.name}{i + 1}"
            first = first or seq

    def step(self) -> list[str]:
        """Advance one step; returns what happened (also stored in ``history[-1].events``)."""
        self.step_index += 1
        for req in self.requests:
            if req.arrival == self.step_index - 1:
                self._add(req)
        before = self.history[-1].block_manager.tables
        sampled = self.engine.step()
        events = self._events(before, self.engine.last_step, sampled)
        computed = {seq_id: self.seqs[seq_id].num_computed_tokens for seq_id in self.bm.tables}
        self.history.append(Snapshot(self.step_index, copy.deepcopy(self.bm), dict(self.names), computed,
                                     events or ["(nothing)"]))
        return events

    def _events(self, before: dict[int, list[int]], out, sampled: list[Sequence]) -> list[str]:
        """What the step did, read off its plan (``out``), the tables while it ran, and who sampled."""
        bs, during, name = self.bm.block_size, self._tables_in_step, self.names
        decodes = [seq for seq, n in zip(out.seqs, out.num_new_tokens) if n == 1 and seq.seq_id in before]
        events = [f"+1 token each: {', '.join(name[s.seq_id] for s in decodes)}"] if decodes else []
        for seq in out.preempted:
            events.append(f"{name[seq.seq_id]}: preempted, blocks {before[seq.seq_id]} freed; it will be recomputed")
        owner_of = {block: seq_id for seq_id, table in during.items() for block in table}
        for src, dst in out.copies:
            events.append(f"{name[owner_of[dst]]}: copy-on-write, block {src} (shared) copied to {dst} before writing")
        for seq, n in zip(out.seqs, out.num_new_tokens):
            start, table = seq.num_computed_tokens - n, during[seq.seq_id]
            if seq.seq_id not in before:
                what = (f"back after preemption, {start + n} tokens" if seq.num_preemptions
                        else f"prompt of {len(seq.prompt_token_ids)} tokens")
                blocks = f"{start // bs} block{'s' if start // bs > 1 else ''}"
                hit = f", {start} tokens ({blocks}) found in the prefix cache" if start else ""
                events.append(f"{name[seq.seq_id]}: {what} -> blocks {table}{hit}")
            elif len(table) > len(before[seq.seq_id]):
                events.append(f"{name[seq.seq_id]}: block {table[-1]} allocated for token {start + n - 1}")
        stepped = {seq.seq_id for seq in out.seqs}
        for child in sampled:
            if child.seq_id not in stepped:
                parent = next(s for s in out.seqs if s.request_id == child.request_id)
                events.append(f"{name[child.seq_id]}: forked from {name[parent.seq_id]}, shares all its blocks")
        for seq in sampled:
            if seq.is_finished:
                parent = next(s for s in out.seqs if s.request_id == seq.request_id)
                table = during.get(seq.seq_id, during[parent.seq_id])  # a child forked this step holds its parent's
                events.append(f"{name[seq.seq_id]}: finished, released blocks {table}")
        return events

    def run(self, max_steps: int = 1000) -> "PagingStepper":
        """Step until every request has arrived and finished."""
        while not self.is_done and self.step_index < max_steps:
            self.step()
        return self

    def draw(self, step: int | None = None, ax=None, cols: int = 8, events: bool = True):
        """Draw the pool and block tables after ``step`` (default: the latest), with that step's events below."""
        snap = self.history[-1 if step is None else step]
        ax = draw_blocks(snap.block_manager, snap.num_tokens, snap.names, ax=ax, cols=cols,
                         title=f"after step {snap.step}")
        if events:
            ax.text(-1.6, ax.get_ylim()[0] - 0.1, "\n".join(snap.events), fontsize=7, va="top", family="monospace")
        return ax

    def snapshots(self, steps: list[int] | None = None, ncols: int = 3, cols: int = 8):
        """The static fallback of the widget: a grid of ``draw`` panels (default: every step)."""
        import matplotlib.pyplot as plt

        steps = list(range(len(self.history))) if steps is None else steps
        nrows = -(-len(steps) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.3 * nrows), squeeze=False)
        for ax, step in zip(axes.flat, steps):
            self.draw(step, ax=ax, cols=cols)
        for ax in axes.flat[len(steps):]:
            ax.set_axis_off()
        fig.tight_layout()
        return fig

    def widget(self, cols: int = 8):
        """A Play button and a slider over the recorded steps, redrawing the pool (needs ipywidgets)."""
        import ipywidgets as widgets
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.run()
        last = len(self.history) - 1
        play = widgets.Play(min=0, max=last, value=0, interval=900, description="play")
        slider = widgets.IntSlider(min=0, max=last, value=0, description="step")
        widgets.jslink((play, "value"), (slider, "value"))
        out = widgets.Output()

        def show(change=None):
            with out:
                out.clear_output(wait=True)
                fig, ax = plt.subplots(figsize=(7.5, 5))
                self.draw(slider.value, ax=ax, cols=cols)
                fig.tight_layout()
                display(fig)
                plt.close(fig)

        slider.observe(show, names="value")
        show()
        return widgets.VBox([widgets.HBox([play, slider]), out])
