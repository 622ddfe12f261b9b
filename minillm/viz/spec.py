"""Speculative decoding, drawn: which guesses the target kept, why rejection sampling changes nothing, how the KV
cache rolls back, and when speculation pays.

In doing so, you will see:
  * a request's text as its steps made it (``trace_speculation``, ``render_trace``): accepted guesses in green,
    rejected ones struck through in red, and the target's own token of each verification (the correction at the
    first mismatch, or the bonus after k accepted guesses) in bold blue. Greedy speculation emits exactly the plain
    tokens, only in fewer steps;
  * the rejection rule (Leviathan et al., arXiv 2211.17192, algorithm 1; Chen et al., arXiv 2302.01318): accept a
    guess x drawn from q with probability ``min(1, p(x) / q(x))``, else draw from ``max(0, p - q)`` normalized. The
    accepted part ``min(p, q)`` and the residual part ``max(0, p - q)`` add up to p (``plot_rejection_rule``), and
    ``sample_histogram`` checks it on 20k draws of ``minillm.spec.verify.rejection_sample``;
  * the rollback (``rollback_demo``, ``plot_rollback``): a verification step reserves slots for all k guesses, then
    ``BlockManager.trim`` gives the blocks holding only rejected guesses back to the free list;
  * the pay-off (``plot_speculation_sweep``): tokens per verification step follow ``(1 - a^(k+1)) / (1 - a)``, and
    the speedup over plain decoding depends on the text (repetitive text is copied, chat is not).

Every trace comes from the real engine loop (``Engine.last_verifications``) and every block table from a real
``minillm.kvcache.blocks.BlockManager``. Used by notebooks/09_speculative_decoding.ipynb. Matplotlib and pandas;
``render_trace`` returns an ``IPython.display.HTML`` and ``trace_text`` is its plain-text twin;
``VerificationStepper.widget`` also needs ipywidgets, and ``verification_table`` is its static twin.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from minillm.engine.sampling import SamplingParams
from minillm.kvcache.blocks import BlockManager
from minillm.spec.verify import expected_tokens_per_step, rejection_sample

CONTEXT_TAIL = 8  # tokens of context kept in each trace record, for the stepper
COLORS = {"accepted": "#1a7f37", "rejected": "#cf222e", "target": "#0550ae", "plain": "#24292f", "prompt": "#8c959f"}


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"


def token_label(tokenizer, token_id: int) -> str:
    """A token as it reads in a table or plot: its text with visible spaces and newlines."""
    return repr(token_text(tokenizer, token_id))[1:-1].replace(" ", "␣") or "∅"


# ---- tracing one request -------------------------------------------------------------------------------------------
def trace_speculation(llm, prompt, params: SamplingParams | None = None) -> list[dict]:
    """Run one request to completion on ``llm``'s engine, one record per step that gave it tokens.

    A record: ``step`` (engine steps since the request arrived), ``kind`` ("verify" or "plain"), ``position`` (the
    sequence's length before the step: the first new token lands there), ``context`` (its last ``CONTEXT_TAIL``
    tokens), ``guesses`` (the proposed tokens, [] for a plain step), ``emitted`` (the tokens the step appended),
    ``accepted`` (how many guesses were kept) and ``target`` (the target's own token: the correction, the bonus or
    the plain step's token; None when the sequence stopped inside its accepted guesses). Concatenating every
    ``emitted`` gives the request's output. The engine must be idle; it is left idle (aborted on an error).
    """
    engine = llm.engine
    if engine.has_unfinished():
        raise ValueError("trace_speculation steps the engine for one request: finish or abort the running ones first")
    params = params or SamplingParams()
    if params.n != 1:
        raise ValueError(f"trace_speculation follows one completion, got n={params.n}")
    (seq,) = llm.add_request(prompt, params)
    records, step = [], 0
    try:
        while not seq.is_finished:
            before = list(seq.token_ids)
            engine.step()
            step += 1
            new = seq.token_ids[len(before):]
            if not new:  # a prefill chunk, or preempted: nothing to show for this request
                continue
            record = {"step": step, "position": len(before), "context": before[-CONTEXT_TAIL:], "emitted": new}
            verified = [v for v in engine.last_verifications if v[0] == seq.seq_id]
            if verified:
                _, guesses, emitted = verified[0]
                assert new == emitted[: len(new)], f"appended {new} but verification emitted {emitted}"
                accepted = min(len(emitted) - 1, len(new))  # a stop inside the guesses cuts the rest off
                target = new[accepted] if len(new) > accepted else None
                record.update(kind="verify", guesses=list(guesses), accepted=accepted, target=target)
            else:
                assert len(new) == 1, f"a plain step appended {len(new)} tokens"
                record.update(kind="plain", guesses=[], accepted=0, target=new[0])
            records.append(record)
    finally:
        if not seq.is_finished:
            engine.abort(seq.request_id)
    return records


def pieces(record: dict) -> list[tuple[str, int]]:
    """(role, token) in reading order: accepted guesses, rejected ones (the first mismatch and every guess after it),
    then the target's own token; a plain step is its one token."""
    if record["kind"] == "plain":
        return [("plain", t) for t in record["emitted"]]
    guesses, a = record["guesses"], record["accepted"]
    out = [("accepted", t) for t in guesses[:a]]
    if record["target"] is not None:
        out += [("rejected", t) for t in guesses[a:]] + [("target", record["target"])]
    return out


def render_trace(records: list[dict], tokenizer, prompt: list[int] | None = None):
    """The trace as colored text (an ``IPython.display.HTML``): accepted guesses green, rejected guesses red and
    struck through, the target's own token bold blue, plain-step tokens in the default color, the prompt gray.
    Hover a token to see its step."""
    from IPython.display import HTML

    style = {"accepted": f"color:{COLORS['accepted']};background:#dafbe1",
             "rejected": f"color:{COLORS['rejected']};text-decoration:line-through;background:#ffebe9",
             "target": f"color:{COLORS['target']};font-weight:bold", "plain": ""}
    parts = [f'<span style="color:{COLORS["prompt"]}">{html.escape(tokenizer.decode(prompt))}</span>'] if prompt else []
    for r in records:
        for role, token in pieces(r):
            text = html.escape(token_text(tokenizer, token)).replace("\n", "↵\n")
            parts.append(f'<span style="{style[role]}" title="step {r["step"]}: {role}">{text}</span>')
    legend = " ".join(f'<span style="{style[role]}">{role}</span>' for role in ("accepted", "rejected", "target"))
    return HTML(f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">{"".join(parts)}</div>'
                f'<div style="font-size:smaller;color:gray">{legend}; plain steps uncolored</div>')


def trace_text(records: list[dict], tokenizer, prompt: list[int] | None = None) -> str:
    """``render_trace`` in plain text, deterministic for a checked cell: accepted guesses as [x], rejected ones as
    ~~x~~, the target's own token as {x}, plain-step tokens as they are."""
    marks = {"accepted": "[{}]", "rejected": "~~{}~~", "target": "{{{}}}", "plain": "{}"}
    head = tokenizer.decode(prompt) if prompt else ""
    return head + "".join(marks[role].format(token_text(tokenizer, t)) for r in records for role, t in pieces(r))


def trace_summary(records: list[dict]) -> pd.DataFrame:
    """One row per step: kind, guesses proposed, accepted, tokens emitted and emitted so far (index: step)."""
    df = pd.DataFrame([{"step": r["step"], "kind": r["kind"], "guesses": len(r["guesses"]), "accepted": r["accepted"],
                        "emitted": len(r["emitted"])} for r in records], columns=["step", "kind", "guesses",
                                                                                   "accepted", "emitted"])
    df["tokens so far"] = df["emitted"].cumsum()
    return df.set_index("step")


def trace_stats(records: list[dict]) -> dict:
    """The trace's totals, in ``llm.stats()["speculative"]``'s words, plus tokens per step over all steps."""
    verify = [r for r in records if r["kind"] == "verify"]
    proposed, accepted = sum(len(r["guesses"]) for r in verify), sum(r["accepted"] for r in verify)
    tokens = sum(len(r["emitted"]) for r in records)
    return {"steps": len(records), "verification_steps": len(verify), "proposed": proposed, "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0, "tokens": tokens,
            "tokens_per_step": tokens / len(records) if records else 0.0}


# ---- the rejection rule on a small vocabulary ----------------------------------------------------------------------
def as_probs(x, name: str) -> torch.Tensor:
    """A (V,) float64 distribution, checked."""
    t = torch.as_tensor(x, dtype=torch.float64).flatten().clone()
    if t.numel() < 2 or (t < 0).any() or abs(float(t.sum()) - 1) > 1e-6:
        raise ValueError(f"{name} must be a distribution over V >= 2 tokens (nonnegative, sums to 1), got {x}")
    return t


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)`` normalized: what a rejection draws from (zeros when q = p: then nothing is ever rejected)."""
    r = torch.clamp(p - q, min=0.0)
    return r / r.sum() if r.sum() > 0 else r


def plot_rejection_rule(p, q, guess: int, labels: list[str] | None = None, title: str = ""):
    """Four panels over a small vocabulary (V,): p and q; the acceptance probability min(1, p/q) of every token, the
    guess's bar outlined; the residual a rejection draws from; and the output's two parts, ``min(p, q)`` (guesses
    kept) stacked under ``(1 - beta) r`` (replacements), which add up to p."""
    import matplotlib.pyplot as plt

    p, q = as_probs(p, "p"), as_probs(q, "q")
    V = p.numel()
    if q.numel() != V or not 0 <= guess < V or q[guess] <= 0:
        raise ValueError(f"need p and q of the same size and a guess q can draw (q[guess] > 0), got V={V}, "
                         f"{q.numel()} and guess={guess}")
    labels = labels or [str(i) for i in range(V)]
    x, w = np.arange(V), 0.4
    accept = torch.where(q > 0, torch.clamp(p / q.clamp_min(1e-300), max=1.0), torch.ones_like(p))
    beta = float(torch.minimum(p, q).sum())  # the chance that a guess drawn from q is kept
    r = residual(p, q)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    axes[0].bar(x - w / 2, p.tolist(), w, color="C0", label="p (target)")
    axes[0].bar(x + w / 2, q.tolist(), w, color="C1", label="q (draft)")
    axes[0].set_title(f"guess x = {labels[guess]} drawn from q", fontsize=9)
    axes[0].legend(fontsize="small")
    bars = axes[1].bar(x, accept.tolist(), color="C2")
    bars[guess].set_edgecolor("black")
    bars[guess].set_linewidth(2)
    axes[1].set_title(f"keep a guess with min(1, p/q): {float(accept[guess]):.2f} for x = {labels[guess]}\n"
                      f"any guess kept with beta = sum min(p, q) = {beta:.2f}", fontsize=9)
    axes[1].set_ylim(0, 1.05)
    axes[2].bar(x, r.tolist(), color="C3")
    axes[2].set_title("rejected: draw from max(0, p - q) / sum", fontsize=9)
    axes[3].bar(x, torch.minimum(p, q).tolist(), color="C2", label="min(p, q): guess kept")
    axes[3].bar(x, ((1 - beta) * r).tolist(), bottom=torch.minimum(p, q).tolist(), color="C3",
                label="(1 - beta) r: replaced")
    axes[3].plot(x, p.tolist(), "k_", markersize=18, markeredgewidth=2, label="p")
    axes[3].set_title("what comes out: the two parts add up to p", fontsize=9)
    axes[3].legend(fontsize="small")
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
    axes[0].set_ylabel("probability")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def hoeffding_bound(num_samples: int, vocab_size: int, delta: float = 0.01) -> float:
    """``sqrt(ln(2V / delta) / (2N))``: with probability 1 - delta every empirical frequency of N draws lies within
    this of its true probability (Hoeffding per token, a union bound over the V tokens)."""
    return math.sqrt(math.log(2 * vocab_size / delta) / (2 * num_samples))


def sample_histogram(p, q, num_samples: int = 20000, seed: int = 0, labels: list[str] | None = None,
                     sampler: Callable = rejection_sample, delta: float = 0.01):
    """Draw a guess from q and run ``sampler([guess], stack([p, p]), q[None], generator)`` ``num_samples`` times;
    the first emitted token of each run is one sample. Returns (fig, table, max |empirical - p|); the table has
    columns token, p, q, empirical. ``sampler`` defaults to ``minillm.spec.verify.rejection_sample``: pass your own
    to check it. About 1.5 s for 20k samples on a CPU."""
    import matplotlib.pyplot as plt

    p, q = as_probs(p, "p"), as_probs(q, "q")
    V = p.numel()
    if q.numel() != V or num_samples < 1:
        raise ValueError(f"need p and q of the same size and num_samples >= 1, got {V}, {q.numel()}, {num_samples}")
    generator = torch.Generator().manual_seed(seed)
    guesses = torch.multinomial(q, num_samples, replacement=True, generator=generator).tolist()
    target, draft = torch.stack([p, p]), q[None]  # (2, V): after the guess the target wants p again; (1, V)
    firsts = [sampler([x], target, draft, generator)[0] for x in guesses]
    empirical = np.bincount(firsts, minlength=V) / num_samples
    labels = labels or [str(i) for i in range(V)]
    table = pd.DataFrame({"token": labels, "p": p.numpy(), "q": q.numpy(), "empirical": empirical})
    max_dev = float(np.abs(empirical - p.numpy()).max())
    bound = hoeffding_bound(num_samples, V, delta)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * V + 2), 3.4))
    x, w = np.arange(V), 0.27
    ax.bar(x - w, q.tolist(), w, color="C1", label="q (draft: where guesses come from)")
    ax.bar(x, p.tolist(), w, color="C0", yerr=bound, capsize=3, label=f"p, ± Hoeffding bound (delta = {delta:g})")
    ax.bar(x + w, empirical, w, color="C2", label=f"empirical, {num_samples} samples")
    ax.set_xticks(x, labels)
    ax.set_ylabel("probability")
    ax.set_title(f"max |empirical - p| = {max_dev:.4f}, bound {bound:.4f}", fontsize=9)
    ax.set_ylim(0, 1.3 * max(float(p.max()), float(q.max()), float(empirical.max())))
    ax.legend(fontsize="small", ncol=3, loc="upper center")
    fig.tight_layout()
    return fig, table, max_dev


# ---- rolling the KV cache back -------------------------------------------------------------------------------------
SLOT_COLORS = {"context": "#afb8c1", "accepted": "#4ac26b", "rejected": "#ff8182", "next": "#80ccff", "empty": "white"}


@dataclass
class TableSnapshot:
    """One sequence's block table and what each of its slots holds: "context", "accepted", "rejected", "next" (the
    target's token, whose K/V the next step writes) or "empty"."""

    label: str
    block_table: list[int]
    slots: list[list[str]]  # (len(block_table), BS)
    num_free_blocks: int
    free_block_ids: list[int]


def snapshot(bm: BlockManager, seq_id: int, label: str, roles: list[str]) -> TableSnapshot:
    """``roles``: one per position of the sequence; slots past them are "empty"."""
    table, bs = bm.block_table(seq_id), bm.block_size
    slots = [[roles[j * bs + o] if j * bs + o < len(roles) else "empty" for o in range(bs)] for j in range(len(table))]
    return TableSnapshot(label, table, slots, bm.num_free_blocks, list(bm.free_block_ids))


def rollback_demo(block_size: int = 4, prompt_len: int = 6, k: int = 6, accepted: int = 1,
                  num_blocks: int | None = None) -> tuple[TableSnapshot, TableSnapshot, dict]:
    """One verification step's KV bookkeeping on a real ``BlockManager``, as the engine does it.

    The sequence holds ``prompt_len`` tokens, the K/V of all but the newest written. The step feeds the newest token
    and k guesses, so ``ensure_capacity`` reserves slots up to ``prompt_len + k`` (snapshot "before": the guesses'
    K/V is written, ``accepted`` of them turn out right). Then ``commit`` records the K/V of the context and the
    accepted guesses, and ``trim`` keeps ``prompt_len + accepted + 1`` slots (the +1: the target's own token, written
    next step) and gives the rest back (snapshot "after"). Returns (before, after, facts).
    """
    if prompt_len < 1 or k < 1 or not 0 <= accepted <= k:
        raise ValueError(f"need prompt_len >= 1, k >= 1 and 0 <= accepted <= k, got {prompt_len}, {k}, {accepted}")
    n, a = prompt_len, accepted
    num_blocks = num_blocks or -(-(n + k + 1) // block_size) + 2  # two spare: the free list is never empty
    bm, seq_id = BlockManager(num_blocks, block_size), 0
    tokens = list(range(10, 10 + n + a + 1))  # context, accepted guesses, the target's token
    bm.allocate_prompt(seq_id, tokens[:n])
    bm.ensure_capacity(seq_id, n - 1)
    bm.commit(seq_id, tokens, n - 1)  # the previous step wrote all but the newest token
    bm.ensure_capacity(seq_id, n + k)  # this step: the newest token and k guesses
    before = snapshot(bm, seq_id, f"before: {k} guesses written, {a} accepted",
                      ["context"] * n + ["accepted"] * a + ["rejected"] * (k - a))
    bm.commit(seq_id, tokens, n + a)
    slots = len(bm.block_table(seq_id)) * block_size
    bm.trim(seq_id, min(n + a + 1, slots))  # as Engine._step: all accepted leaves the bonus for the next step
    after = snapshot(bm, seq_id, f"after trim to {min(n + a + 1, slots)} tokens",
                     ["context"] * n + ["accepted"] * a + ["next"])
    facts = {"blocks_before": len(before.block_table), "blocks_after": len(after.block_table),
             "free_blocks_before": before.num_free_blocks, "free_blocks_after": after.num_free_blocks,
             "blocks_freed": [b for b in before.block_table if b not in after.block_table],
             "num_tokens_kept": min(n + a + 1, slots)}
    return before, after, facts


def plot_rollback(before: TableSnapshot, after: TableSnapshot, block_size: int | None = None, title: str = ""):
    """The block table before and after the trim, one row each: every block split into its slots, colored by what
    they hold; blocks the trim freed are drawn dashed in the "after" row. Returns the figure (two axes)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    bs = block_size or len(before.slots[0])
    fig, axes = plt.subplots(2, 1, figsize=(1.5 * len(before.block_table) + 3.5, 3.6))
    for ax, snap in zip(axes, (before, after)):
        for j, block in enumerate(before.block_table):
            x = j * 1.25
            if j < len(snap.block_table):
                for o, role in enumerate(snap.slots[j]):
                    ax.add_patch(Rectangle((x + o / bs, 0), 1 / bs, 0.6, facecolor=SLOT_COLORS[role],
                                           edgecolor="gray", linewidth=0.5))
                ax.add_patch(Rectangle((x, 0), 1, 0.6, fill=False, edgecolor="black", linewidth=1.2))
                ax.text(x + 0.5, 0.68, f"block {snap.block_table[j]}", ha="center", fontsize=8)
            else:
                ax.add_patch(Rectangle((x, 0), 1, 0.6, fill=False, edgecolor="gray", linestyle="--"))
                ax.text(x + 0.5, 0.3, f"block {block}\nfreed", ha="center", va="center", fontsize=8, color="gray")
        ax.text(len(before.block_table) * 1.25 + 0.1, 0.3, f"free list:\n{snap.num_free_blocks} blocks",
                va="center", fontsize=8)
        ax.set_title(snap.label, fontsize=9, loc="left")
        ax.set_xlim(-0.1, len(before.block_table) * 1.25 + 1.6)
        ax.set_ylim(-0.1, 0.95)
        ax.set_axis_off()
    fig.legend(handles=[Patch(facecolor=c, edgecolor="gray", label=r) for r, c in SLOT_COLORS.items()],
               loc="lower center", ncol=len(SLOT_COLORS), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# ---- the benchmark sweep -------------------------------------------------------------------------------------------
SWEEP_KEYS = ("workload", "proposer", "k", "batch", "adaptive", "tokens_per_s", "plain_tokens_per_s", "speedup",
              "acceptance_rate", "tokens_per_verification")


def sweep_alphas(df: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(workload, proposer) -> the acceptance rate at the smallest k measured (k = 1 in the benchmark), preferring
    non-adaptive rows at the smallest batch: the a of the theory curve."""
    alphas = {}
    for key, group in df.groupby(["workload", "proposer"]):
        best = group.sort_values(["adaptive", "k", "batch"]).iloc[0]
        alphas[key] = float(best["acceptance_rate"])
    return alphas


def sweep_table(rows: list[dict]) -> pd.DataFrame:
    """The rows of ``python -m minillm.bench spec`` as a table, sorted, with the theory's tokens per verification
    ``(1 - a^(k+1)) / (1 - a)`` next to the measured ones (a: ``sweep_alphas``)."""
    for i, row in enumerate(rows):
        missing = [key for key in SWEEP_KEYS if key not in row]
        if missing:
            raise ValueError(f"sweep row {i} lacks {missing}; a row needs {list(SWEEP_KEYS)}")
    if not rows:
        raise ValueError("no sweep rows")
    df = pd.DataFrame([{key: row[key] for key in SWEEP_KEYS} for row in rows])
    df["adaptive"] = df["adaptive"].astype(bool)
    alphas = sweep_alphas(df)
    df["predicted tokens_per_verification"] = [
        expected_tokens_per_step(alphas[(w, p)], int(k)) for w, p, k in zip(df["workload"], df["proposer"], df["k"])]
    return df.sort_values(["workload", "proposer", "batch", "adaptive", "k"]).reset_index(drop=True)


def plot_speculation_sweep(rows: list[dict], batch: int | None = None, title: str = ""):
    """Two panels at one batch size (default: the smallest): (a) tokens per verification step against k, measured
    (markers, non-adaptive rows) and the theory with a from the smallest k (lines); (b) the speedup over plain
    decoding against k, per workload and proposer (adaptive runs hollow and dotted), dashed at 1.0."""
    import matplotlib.pyplot as plt

    df = sweep_table(rows)
    batch = int(df["batch"].min()) if batch is None else batch
    df = df[df["batch"] == batch]
    if df.empty:
        raise ValueError(f"no sweep rows at batch={batch}")
    alphas = sweep_alphas(df)
    workloads = list(dict.fromkeys(df["workload"]))
    markers = {"ngram": "o", "draft": "s"}
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4))
    for (workload, proposer), group in df.groupby(["workload", "proposer"], sort=False):
        color, marker = f"C{workloads.index(workload)}", markers.get(proposer, "^")
        name = f"{workload}, {proposer}"
        fixed = group[~group["adaptive"]] if (~group["adaptive"]).any() else group
        ax_t.plot(fixed["k"], fixed["tokens_per_verification"], marker, color=color, label=f"{name}: measured")
        ks = np.arange(0, int(df["k"].max()) + 1)
        a = alphas[(workload, proposer)]
        ax_t.plot(ks, [expected_tokens_per_step(a, int(k)) for k in ks], "-" if proposer == "ngram" else "--",
                  color=color, alpha=0.6, label=f"{name}: theory, a = {a:.2f}")
        ax_s.plot(fixed["k"], fixed["speedup"], marker + "-", color=color, label=name)
        adaptive = group[group["adaptive"]]
        if not adaptive.empty and (~group["adaptive"]).any():
            ax_s.plot(adaptive["k"], adaptive["speedup"], marker + ":", color=color, markerfacecolor="none",
                      label=f"{name}, adaptive")
    ax_t.set(xlabel="k (guesses per step)", ylabel="tokens per verification step",
             title="(1 - a^(k+1)) / (1 - a): each guess kept with probability a")
    ax_s.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax_s.set(xlabel="k (guesses per step)", ylabel="speedup over plain decoding",
             title=f"tokens/s with speculation / without, batch {batch}")
    for ax in (ax_t, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- one verification step at a time -------------------------------------------------------------------------------
RESULT_COLORS = {"accepted": "#dafbe1", "rejected": "#ffebe9", "target": "#ddf4ff", "discarded": "#f6f8fa"}


def verification_table(record: dict, tokenizer=None) -> pd.DataFrame:
    """One step of a trace, one row per position it fed: the guess there, the target's token there and the verdict.

    Guesses agree with the target up to the first mismatch (accepted); there the target's token replaces the guess
    (rejected), and the guesses after it were conditioned on a wrong token (discarded). After k accepted guesses the
    target's token is a bonus. A plain step is one row: the target's token, no guess.
    """
    label = (lambda t: token_label(tokenizer, t)) if tokenizer is not None else str
    rows, pos, a, target = [], record["position"], record["accepted"], record["target"]
    if record["kind"] == "plain":
        rows.append((pos, "", label(target), "plain decode: no guess"))
    else:
        for i, guess in enumerate(record["guesses"]):
            if i < a:
                rows.append((pos + i, label(guess), label(guess), "accepted"))
            elif i == a and target is not None:
                rows.append((pos + i, label(guess), label(target), "rejected: the target's token replaces it"))
            else:
                why = "discarded: after a rejection" if target is not None else "unused: the sequence stopped"
                rows.append((pos + i, label(guess), "", why))
        if a == len(record["guesses"]) and target is not None:
            rows.append((pos + a, "", label(target), "bonus: the target's token after the last guess"))
    return pd.DataFrame(rows, columns=["position", "guess", "target", "result"])


class VerificationStepper:
    """Steps through a trace's verification steps (or every step, ``only_verify=False``): the context's tail, each
    guess, the target's token at each position and the verdict. ``table(i)`` is the static twin of ``widget()``."""

    def __init__(self, records: list[dict], tokenizer=None, only_verify: bool = True):
        self.records = [r for r in records if r["kind"] == "verify" or not only_verify]
        if not self.records:
            raise ValueError("no verification step in the trace: did the request speculate (speculative_config)?")
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def table(self, i: int) -> pd.DataFrame:
        return verification_table(self.records[i], self.tokenizer)

    def describe(self, i: int) -> str:
        """Step ``i`` as HTML: a caption and the table with its rows colored by verdict."""
        r = self.records[i]
        tail = "".join(html.escape(token_label(self.tokenizer, t)) for t in r["context"])
        caption = (f"<b>step {r['step']}</b> ({r['kind']}): context …<code>{tail}</code>, "
                   f"{len(r['guesses'])} guesses, {r['accepted']} accepted, {len(r['emitted'])} tokens emitted")
        body = []
        for row in self.table(i).itertuples(index=False):
            color = RESULT_COLORS.get(row.result.split(":")[0].replace("bonus", "target"), "white")
            cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in row)
            body.append(f'<tr style="background:{color}">{cells}</tr>')
        head = "".join(f"<th>{c}</th>" for c in ("position", "guess", "target", "result"))
        return f"{caption}<table><tr>{head}</tr>{''.join(body)}</table>"

    def widget(self):
        """Prev / Next buttons and a slider over the steps, showing ``describe`` (needs ipywidgets). An HTML widget,
        no Output widget: it builds without a display and stores in a notebook run by nbclient."""
        import ipywidgets as widgets

        prev, nxt = widgets.Button(description="◀ prev"), widgets.Button(description="next ▶")
        slider = widgets.IntSlider(min=0, max=len(self) - 1, value=0, description="step")
        out = widgets.HTML()

        def show(change=None):
            out.value = self.describe(slider.value)

        prev.on_click(lambda _: setattr(slider, "value", max(0, slider.value - 1)))
        nxt.on_click(lambda _: setattr(slider, "value", min(len(self) - 1, slider.value + 1)))
        slider.observe(show, names="value")
        show()
        return widgets.VBox([widgets.HBox([prev, nxt, slider]), out])
