"""Adaptive draft length: choose K each step from an online cost model.

With per-position conditional acceptance rates ``alpha_j`` (the chance that draft ``j`` is
accepted given drafts ``1..j-1`` were), a chain of K drafts commits in expectation

    E[accepted + 1 | K] = 1 + sum_{i=1..K} prod_{j=1..i} alpha_j

tokens (Leviathan et al. 2023, Sec. 3.1, with i.i.d. alpha; here alpha varies by position as
measured), and costs ``t_draft(K) + t_step(K)`` seconds, where ``t_draft(K) = a + b K`` is the
draft call (0 for K = 0) and ``t_step(K)`` is the target's verify pass over K+1 tokens plus the
engine's per-step bookkeeping. Each step picks

    K* = argmax_{K in 0..K_max}  E[accepted + 1 | K] / (t_draft(K) + t_step(K))

and K = 0 (plain decoding, the draft model idles) when drafting does not pay. This is the
throughput-optimal rule of Leviathan et al. (2023, Sec. 3.4, "optimal gamma") made online,
in the spirit of dynamic draft lengths (HF transformers' heuristic schedule; Liu et al. 2024,
"Optimizing speculative decoding for serving", goodput-based K).

Everything is measured online with exponential moving averages (EMA):

* ``a``, ``b`` — a line fitted to the wall times of ``inner.propose`` against the K it proposed
  (least squares with exponential forgetting, :class:`specdec.linefit.LineFit`, as the server's
  policy fits its cost lines). The fixed part ``a`` matters: the first draft pass
  after a target pass finds the draft's weights evicted from the CPU caches, so on the demo
  pair a K = 1 call costs 0.6 ms and a K = 5 call 1.2 ms inside the engine (0.2 and 0.7 ms
  in a loop of draft calls alone). Time per token (``a / K + b``) made K = 1 look five times
  as costly per token as it is at K = 5, and pinned ``adaptive`` at K = 1-2 on the ``edit``
  task where fixed K = 4 was faster. Until two different K were seen, ``a`` keeps its last
  fit (0 at first: time per token);
* ``t_step(K)`` — wall time from the end of one ``propose`` to the start of the next (verify
  pass, cache rollback, engine overhead), kept per K. An unmeasured K is priced optimistically
  either way, so the model explores: above every measured K at the largest one's time, below
  them halfway between the lowest one's time and that time scaled by token count, between two
  on the line through them; every
  measurement also rescales the other K's times by the drift it shows (the machine's speed
  moves them all alike). The first step of each K is not counted: it pays one-off costs, and
  a K's time is refreshed only when that K is chosen, so one slow first step could keep it
  from ever being chosen again (seen on the demo pair under sampling: a first K = 4 step of
  5.2 ms, against 4.4 ms for the K = 3 steps after it, kept ``adaptive`` at K <= 3 while fixed
  K = 4 was faster). The server's policy skips first steps for the same reason;
* ``alpha_j`` — position j is *tried* when drafts 1..j-1 were accepted; it scores 1 if
  accepted, 0 if it was the first rejection (moving average, weight 0.15: at 0.3 three
  rejections in a row under sampling could switch speculation off for 16 steps). After a fully
  accepted chain the next position relaxes slowly toward the chain's last estimate, so a K
  that was once bad is retried when acceptance improves.

While K = 0 the acceptance estimates cannot change, so every ``probe_interval`` consecutive
plain steps one K = 1 step probes whether drafting pays again (e.g. on repetitive text).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from specdec.drafters.base import DraftContext, Drafter, DraftProposal, TargetOutput, empty_proposal
from specdec.linefit import LineFit
from specdec.verify.chain import VerifyResult


@dataclass
class CostModel:
    """Online estimates of draft/step times and per-position acceptance; picks K."""

    max_draft_tokens: int
    ema: float = 0.3  # weight of a new step time
    acceptance_ema: float = 0.15  # weight of a new acceptance outcome (module docstring)
    relax: float = 0.02  # per fully accepted step, the next position moves this far toward the last
    prior_acceptance: float = 0.6
    fit_decay: float = 0.95  # forgetting per draft call in the fit of t_draft(K) = a + b K
    t_draft: float | None = None  # b: seconds per draft token
    t_draft_fixed: float = 0.0  # a: seconds per draft call
    t_step: dict[int, float] = field(default_factory=dict)  # K -> seconds per verify step
    acceptance: list[float] = field(default_factory=list)  # (K_max,) conditional alpha_j
    _draft_fit: LineFit | None = None
    _first_step_seen: set[int] = field(default_factory=set)  # K whose first (uncounted) step is done

    def __post_init__(self) -> None:
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if not self.acceptance:
            self.acceptance = [self.prior_acceptance] * self.max_draft_tokens
        self._draft_fit = LineFit(self.fit_decay)

    @staticmethod
    def _update(old: float | None, new: float, weight: float) -> float:
        return new if old is None else (1 - weight) * old + weight * new

    def record_draft(self, num_tokens: int, seconds: float) -> None:
        """Refit ``t_draft(K) = a + b K`` with a call of ``num_tokens`` drafts."""
        if num_tokens <= 0:
            return
        fit = self._draft_fit
        assert fit is not None
        fit.add(num_tokens, seconds)
        mean_k, mean_s, _ = fit.means()
        line = fit.line(min_var=0.1, min_slope=0.1 * mean_s / mean_k)  # (noise must not make drafts look free)
        if line is not None:  # calls of different K seen: the line through them
            self.t_draft_fixed, self.t_draft = line
        else:  # one K so far: keep the fixed part, the per-token part follows the level
            a = min(self.t_draft_fixed, 0.9 * mean_s)
            self.t_draft, self.t_draft_fixed = (mean_s - a) / mean_k, a

    def record_step(self, num_drafted: int, seconds: float) -> None:
        """Update ``t_step(num_drafted)``; the other K's times move by the same factor.

        The machine's speed drifts (other jobs, caches, clocks) and moves every K's step time
        alike, while a K not chosen lately keeps its old time: left alone, a stale K = 2 at
        3.0 ms next to a fresh K = 1 at 2.0 ms would pin K at 1. The ratios between K's times
        change only when those K are measured. A K's first step is not counted (module
        docstring); until its second, it borrows the nearest measured K's time."""
        if num_drafted not in self._first_step_seen:
            self._first_step_seen.add(num_drafted)
            return
        old = self.t_step.get(num_drafted)
        new = self._update(old, seconds, self.ema)
        if old:
            drift = new / old
            for k in self.t_step:
                self.t_step[k] *= drift
        self.t_step[num_drafted] = new

    def record_acceptance(self, num_drafted: int, num_accepted: int) -> None:
        """Update alpha_j for the tried positions ``1 .. min(num_accepted + 1, num_drafted)``.

        When the whole chain was accepted, the next position relaxes toward the last one's
        estimate (else a pessimistic old estimate, never tried again, would pin K low for
        good); a chain that broke says nothing in its favour. Only the next one: K grows one
        step at a time, each step on measured evidence.
        """
        tried = min(num_accepted + 1, num_drafted)
        for j in range(tried):
            accepted = 1.0 if j < num_accepted else 0.0
            self.acceptance[j] = self._update(self.acceptance[j], accepted, self.acceptance_ema)
        if 0 < num_drafted == num_accepted < self.max_draft_tokens:
            anchor = self.acceptance[num_drafted - 1]
            self.acceptance[num_drafted] = self._update(self.acceptance[num_drafted], anchor, self.relax)

    def step_time(self, k: int) -> float | None:
        """``t_step(k)``: measured, else estimated from the measured K (module docstring):
        between two measured K on the line through them; above them the largest's time; below
        them halfway between the lowest measured K's time and that time scaled by token count
        (never less than the line through the two lowest measured K gives); K = 0, which
        drafts nothing, at the lowest measured K's time until it is measured itself."""
        if k in self.t_step:
            return self.t_step[k]
        if not self.t_step:
            return None
        measured = sorted(self.t_step)
        above = [m for m in measured if m > k]
        below = [m for m in measured if m < k]
        if not above:  # longer than any measured chain: optimistic, so longer chains get tried
            return self.t_step[measured[-1]]
        hi = above[0]
        if below:  # between two measured K
            lo = below[-1]
            return self.t_step[lo] + (self.t_step[hi] - self.t_step[lo]) * (k - lo) / (hi - lo)
        if k == 0:
            return self.t_step[hi]
        # Below every measured K: cheaper, so shorter chains get tried. Borrowing the lowest
        # measured K's time priced K = 2 like K = 4 on the demo pair's `edit` task, where K = 2
        # was the fastest, and kept the policy at K = 4; halfway to scaling by token count
        # (a pass bound by arithmetic) did best in replays (docs/benchmarks.md section 3).
        estimate = self.t_step[hi] * (1 + (k + 1) / (hi + 1)) / 2
        if len(above) > 1:  # the line through the two lowest measured K, where it is dearer
            nxt = above[1]
            slope = max(0.0, (self.t_step[nxt] - self.t_step[hi]) / (nxt - hi))
            estimate = max(estimate, self.t_step[hi] - slope * (hi - k))
        return estimate

    def expected_tokens(self, k: int) -> float:
        """E[accepted + 1 | K = k] under the per-position acceptance estimates."""
        total, prefix = 1.0, 1.0
        for j in range(k):
            prefix *= self.acceptance[j]
            total += prefix
        return total

    def tokens_per_second(self, k: int) -> float | None:
        step = self.step_time(k)
        if step is None or (k > 0 and self.t_draft is None):
            return None
        cost = (self.t_draft_fixed + k * (self.t_draft or 0.0) if k > 0 else 0.0) + step
        return self.expected_tokens(k) / cost if cost > 0 else None

    def best_k(self) -> int | None:
        """The K maximising expected tokens per second; None until timings are known."""
        rates = {k: self.tokens_per_second(k) for k in range(self.max_draft_tokens + 1)}
        known = {k: r for k, r in rates.items() if r is not None}
        if len(known) < len(rates):
            return None
        return max(known, key=lambda k: (known[k], -k))


class AdaptiveDrafter:
    """Wrap a chain drafter (anything with a settable ``num_draft_tokens``) and choose its K.

    ``num_draft_tokens`` of the wrapper is the cap K_max (the engine sizes caches with it).
    Until the cost model has timings it drafts ``initial_draft_tokens``.
    """

    def __init__(
        self,
        inner: Drafter,
        max_draft_tokens: int = 8,
        initial_draft_tokens: int | None = None,
        probe_interval: int = 16,
        ema: float = 0.3,
        acceptance_ema: float = 0.15,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.inner = inner
        self.num_draft_tokens = max_draft_tokens
        self.cost = CostModel(max_draft_tokens, ema=ema, acceptance_ema=acceptance_ema)
        start = initial_draft_tokens if initial_draft_tokens is not None else inner.num_draft_tokens
        self.initial_draft_tokens = max(1, min(start, max_draft_tokens))
        self.probe_interval = probe_interval
        self.clock = clock  # seconds; scripts/adaptive_replay.py replays recorded steps on a fake one
        # The inner drafter's needs, with room for K_max drafts; never batched (K varies per row).
        room = max(inner.capabilities.max_tree_nodes, max_draft_tokens)
        self.capabilities = replace(inner.capabilities, max_tree_nodes=room, batchable=False)
        self.chosen: list[int] = []  # K chosen per step (for reports and tests)
        self._plain_streak = 0
        self._last_k: int | None = None
        self._last_end = 0.0

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self._last_k = None  # the prefill is no verify step: do not time it
        self._plain_streak = 0
        self.inner.prefill(prompt_ids, target_out)

    def choose_k(self) -> int:
        best = self.cost.best_k()
        if best is None:
            return self.initial_draft_tokens
        if best == 0:
            self._plain_streak += 1
            if self._plain_streak >= self.probe_interval:
                self._plain_streak = 0
                return 1
            return 0
        self._plain_streak = 0
        return best

    def propose(self, ctx: DraftContext) -> DraftProposal:
        start = self.clock()
        if self._last_k is not None:
            self.cost.record_step(self._last_k, start - self._last_end)
        k = min(self.choose_k(), ctx.max_draft_tokens)
        self.chosen.append(k)
        if k == 0:
            proposal = empty_proposal()
        else:
            self.inner.num_draft_tokens = k
            proposal = self.inner.propose(ctx)
        end = self.clock()
        self.cost.record_draft(proposal.num_tokens, end - start)
        self._last_k, self._last_end = proposal.num_tokens, end
        return proposal

    def on_verified(self, result: VerifyResult) -> None:
        self.cost.record_acceptance(result.num_drafted, result.num_accepted)
        self.inner.on_verified(result)
