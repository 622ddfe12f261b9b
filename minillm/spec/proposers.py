"""Proposers: where the guesses of speculative decoding come from, and when guessing is worth it.

A proposer has ``num_speculative_tokens`` (k) and ``propose(seqs)``: before each step the engine
(``engine/engine.py``) hands it the decoding sequences, and it sets each one's ``spec_token_ids`` (at most k guesses
for the tokens after ``seq.token_ids``) and ``spec_draft_probs`` (the distributions they were drawn from, or None).
The scheduler lets the guesses ride along when they fit; the verification (``verify.py``) keeps the ones the target
agrees with and reports back through ``observe``. Never more guesses than the request may still emit: the last
token of a step is always the target's own.

In doing so, you will learn about:
  * why speculation must be able to turn itself down: a verification step feeds k + 1 tokens and costs more than a
    plain decode step (on a 2-core CPU about 1.6x for SmolLM2, because a (k + 1)-row matmul leaves the matrix-vector
    path), so it pays only while enough guesses are accepted;
  * estimating the acceptance rate per sequence: each verification shows ``a`` accepted guesses, then one rejection
    unless all were accepted, so ``alpha = accepted / (accepted + rejections)`` (the maximum-likelihood estimate of
    a geometric run length), with old evidence decayed so the estimate follows the text as it changes;
  * the decision: speculate while the expected tokens per step ``(1 - alpha^(k+1)) / (1 - alpha)`` reach
    ``min_expected_tokens`` (what a verification step costs, in plain steps); otherwise decode plainly and probe
    again after 8 plain steps, then 16, 32, 64 while probes keep failing (on every eighth engine step, so that a
    batch probes together), so a sequence that starts copying its prompt is noticed and one that never will costs
    almost nothing;
  * guessing in the shadow: prompt lookup's guesses cost nothing, so a turned-down sequence still guesses one token
    and checks it against the token the target emits; its estimate keeps up, and speculation resumes as soon as the
    text starts copying (a draft model's guesses are not free: it only probes);
  * the batch: a verification step costs every sequence of the step, so the chosen sequences speculate only if
    their expected extra tokens, summed, pay for the whole batch's slower step (a single copying sequence in a batch
    of open chats does not).

``NgramProposer`` guesses by prompt lookup (``ngram.py``); ``draft.DraftModelProposer`` runs a smaller model.
Notebook 09 (``09_speculative_decoding``) compares them.
"""

from __future__ import annotations

from dataclasses import dataclass

from minillm.engine.request import Sequence
from minillm.spec.ngram import propose_ngram
from minillm.spec.verify import expected_tokens_per_step

DECAY = 0.8  # weight of older verifications in the acceptance estimate, per verification
PROBE_EVERY, MAX_PROBE_EVERY = 8, 64  # plain steps before a turned-down sequence verifies again; doubles per failure


@dataclass
class Evidence:
    """What the verifications of one sequence showed: decayed counts of accepted guesses and of rejections."""

    accepted: float = 0.0
    rejections: float = 0.0
    plain_steps: int = 0  # since speculation was turned down or last probed
    probe_every: int = PROBE_EVERY
    shadow: tuple[int, int] | None = None  # (position, guess) made while turned down, checked when the token comes


def guess_budget(seq: Sequence, k: int) -> int:
    """How many guesses `seq` can use: k, but leaving room for the target's own token within max_tokens and the
    context length."""
    left = min(seq.params.max_tokens - len(seq.output_token_ids), seq.max_model_len - seq.num_tokens)
    return max(0, min(k, left - 1))


def default_min_expected_tokens(device_type: str) -> float:
    """What a verification step costs, in plain decode steps, with a margin: a GPU reads the weights once for 1 or
    k + 1 tokens (nearly free extra rows); a CPU leaves its matrix-vector path for the general matrix-matrix one
    (SmolLM2 on 2 cores: a verification step with k = 4 took ~1.6x a plain step; notebook 09 measures it)."""
    return 1.2 if device_type == "cuda" else 2.0


class Proposer:
    """k, the per-sequence acceptance estimate and the turn-down rule; subclasses implement ``guess``."""

    free_guesses = False  # True when guessing costs nothing next to a model step (prompt lookup)

    def __init__(self, num_speculative_tokens: int, min_expected_tokens: float = 1.5):
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {num_speculative_tokens!r}")
        if not 0 <= min_expected_tokens <= num_speculative_tokens + 1:
            raise ValueError(f"min_expected_tokens must lie in [0, k + 1 = {num_speculative_tokens + 1}] (a step "
                             f"emits at most k + 1 tokens; 0 always speculates), got {min_expected_tokens}")
        self.num_speculative_tokens, self.min_expected_tokens = num_speculative_tokens, min_expected_tokens
        self.evidence: dict[int, Evidence] = {}  # per running sequence
        self.step = 0  # calls of propose: one per engine step

    def acceptance_estimate(self, seq_id: int) -> float:
        """accepted / (accepted + rejections), decayed; 1.0 before any evidence (try speculating first)."""
        ev = self.evidence.get(seq_id, Evidence())
        return 1.0 if ev.accepted + ev.rejections == 0 else ev.accepted / (ev.accepted + ev.rejections)

    def worth_speculating(self, seq: Sequence) -> bool:
        ev = self.evidence.setdefault(seq.seq_id, Evidence())
        alpha = self.acceptance_estimate(seq.seq_id)
        if expected_tokens_per_step(alpha, self.num_speculative_tokens) >= self.min_expected_tokens:
            ev.plain_steps, ev.probe_every = 0, PROBE_EVERY
            return True
        ev.plain_steps += 1
        # A probe: verify once more, to notice when guessing starts to pay. Probes fall on every eighth engine step
        # only, so that the turned-down sequences of a batch probe together: on a CPU a step costs about the same
        # with one verifying sequence as with eight, and staggered probes would make many steps expensive.
        if ev.plain_steps >= ev.probe_every and self.step % PROBE_EVERY == 0:
            ev.plain_steps, ev.probe_every = 0, min(2 * ev.probe_every, MAX_PROBE_EVERY)
            return True
        return False

    def observe(self, seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """The verification kept `num_accepted` of `num_proposed` guesses (then one rejection, if any was rejected)."""
        ev = self.evidence.setdefault(seq.seq_id, Evidence())
        ev.accepted = DECAY * ev.accepted + num_accepted
        ev.rejections = DECAY * ev.rejections + (num_accepted < num_proposed)

    def propose(self, seqs: list[Sequence]) -> None:
        """Set ``spec_token_ids`` / ``spec_draft_probs`` of every sequence in `seqs` (the decoding ones)."""
        self.step += 1
        chosen, budgets, extra_tokens, probing = [], [], 0.0, False
        for seq in seqs:
            seq.spec_token_ids, seq.spec_draft_probs = [], None
            self.check_shadow(seq)
            k = guess_budget(seq, self.num_speculative_tokens)
            if k and self.worth_speculating(seq):
                chosen.append(seq)
                budgets.append(k)
                expected = expected_tokens_per_step(self.acceptance_estimate(seq.seq_id), self.num_speculative_tokens)
                extra_tokens += expected - 1
                probing |= expected < self.min_expected_tokens  # chosen although not worth it: a probe
        # A verification step costs the whole batch about min_expected_tokens plain steps, however few of its
        # sequences verify. It pays only if the chosen sequences' expected extra tokens cover that for all len(seqs)
        # (at batch 1 this is the per-sequence rule again). A probe runs anyway, and the others ride along.
        if not probing and extra_tokens < (self.min_expected_tokens - 1) * len(seqs):
            chosen = []
        if chosen:
            for seq, (tokens, probs) in zip(chosen, self.guess(chosen, budgets)):
                seq.spec_token_ids, seq.spec_draft_probs = tokens, probs
        if self.free_guesses:  # the others guess one token in the shadow: the estimate keeps up while they wait
            waiting = [seq for seq in seqs if not seq.spec_token_ids and guess_budget(seq, 1)]
            for seq, (tokens, _) in zip(waiting, self.guess(waiting, [1] * len(waiting))):
                if tokens:
                    self.evidence.setdefault(seq.seq_id, Evidence()).shadow = (seq.num_tokens, tokens[0])

    def check_shadow(self, seq: Sequence) -> None:
        """Score the guess made while `seq` did not speculate against the token the target emitted there."""
        ev = self.evidence.get(seq.seq_id)
        if ev is not None and ev.shadow is not None and seq.num_tokens > ev.shadow[0]:
            position, guess = ev.shadow
            ev.shadow = None
            self.observe(seq, 1, int(seq.token_ids[position] == guess))

    def guess(self, seqs: list[Sequence], budgets: list[int]) -> list[tuple[list[int], object]]:
        """For each sequence at most `budget` guesses, and their draft distributions (budget, V) or None."""
        raise NotImplementedError

    def forget(self, live: set[int]) -> None:
        """Drop the state of every sequence not in `live` (finished, aborted or preempted: the engine calls this)."""
        for seq_id in [i for i in self.evidence if i not in live]:
            del self.evidence[seq_id]


class NgramProposer(Proposer):
    """Prompt lookup (``ngram.propose_ngram``): no model, guesses copied from earlier in the sequence."""

    free_guesses = True

    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int = 3, prompt_lookup_min: int = 1,
                 min_expected_tokens: float = 1.5):
        super().__init__(num_speculative_tokens, min_expected_tokens)
        if not (isinstance(prompt_lookup_min, int) and isinstance(prompt_lookup_max, int)
                and 1 <= prompt_lookup_min <= prompt_lookup_max):
            raise ValueError(f"need ints 1 <= prompt_lookup_min <= prompt_lookup_max, got {prompt_lookup_min!r} and "
                             f"{prompt_lookup_max!r}")
        self.max_n, self.min_n = prompt_lookup_max, prompt_lookup_min

    def guess(self, seqs: list[Sequence], budgets: list[int]) -> list[tuple[list[int], None]]:
        return [(propose_ngram(seq.token_ids, k, self.max_n, self.min_n), None) for seq, k in zip(seqs, budgets)]
