"""How many draft tokens per row to verify in the next batched pass (K as load changes).

Speculation trades extra target compute (B x (K+1) tokens per pass instead of B) for fewer
passes. At batch size 1 a pass is memory-bound and verifying K more tokens is almost free; as
the batch grows the pass becomes compute-bound and the extra tokens cost real time (Liu et al.
2024, "Optimizing Speculative Decoding for Serving Large Language Models Using Goodput";
Su et al. 2023, "The Synergy of Speculative Decoding and Batching").

The policy chooses K in ``0 .. max_draft_tokens`` maximising the estimated goodput::

    goodput(K) = B * e(K) / (a + b * B * (K+1) + d(B * K))

* ``e(K) = 1 + sum_{i=1..K} prod_{j<=i} alpha_j``: expected tokens committed per row, from the
  measured per-position acceptance ``alpha_j`` (Leviathan et al. 2023, Sec. 3.1);
* ``a + b * N``: the measured cost of a target pass over N tokens, a line fitted online
  (least squares with exponential forgetting, :class:`specdec.linefit.LineFit`) to every
  prefill and verify pass;
* ``d(N)``: the measured cost of drafting N tokens (all rows, K > 0), also a fitted line
  ``c0 + c * N``: a draft call has a fixed part (its first pass finds the draft's weights out
  of the CPU caches after a target pass), so its time per token overstates short drafts.
  Until calls of different sizes were seen, the mean time per token times N.

Where a K already has a measured mean step time in B's batch-size bucket (see the guard
below), that time replaces the denominator: the line is only the prior for K not yet seen.
K = 0 is plain batched decoding, so the model falls back to it when the estimates say
speculation would lower throughput.

**Measured-goodput guard.** The cost line is only a model, and a pass's real cost need not be
linear in N (on a CPU it can move in steps), so the model can prefer K > 0 where speculation
in fact loses. The guard therefore also measures what each step really achieved:
``observe_step`` takes the tokens committed across the batch and the wall time of the whole
step (drafting, verify pass, bookkeeping). Per batch-size bucket (1, 2-3, 4-7, 8-15, ...) and
per K it keeps exponentially forgotten sums (``step_decay`` per observation) of tokens, seconds
and steps: measured goodput = tokens / seconds. A pass over B rows picks between two arms of
B's bucket:

* plain, K = 0;
* speculative: the model's K, or, when the model says 0, the K > 0 with the best measured
  goodput in the bucket (K = 1 if none was measured).

An arm without a measurement is tried first (the model's K when neither has one). Once both
are measured, the pass speculates only if the speculative arm's measured goodput beats plain's
by more than ``margin``. To keep both estimates fresh when load or acceptance changes, the arm
not taken gets one pass whenever the bucket has spent ``explore_every`` times that arm's mean
step time since it last got one: exploration takes about 1/``explore_every`` of the bucket's
wall time however slow the losing arm is, which bounds what it can cost. While explorations keep
confirming the choice (the explored pass did worse than the chosen arm's measured goodput), the
interval doubles, up to ``max_backoff`` times: a bucket where speculation keeps losing (a large
batch on a compute-bound CPU) spends about 1/(``explore_every`` * ``max_backoff``) of its time
exploring instead of 1/``explore_every``. An explored pass that does better resets the
interval, so a change of load or acceptance is still found within a few explorations. A step
that paid a one-off cost of switching to speculation (``observe_step(warm=False)``: the batched
draft model catching up after plain steps) counts as time spent but not in the goodput, and
the exploration gets one more pass; the interval between explorations of speculation counts
that cold step as part of an exploration's cost, so the share of time stays bounded even when
catching up costs many steps (rows that joined during plain steps read their whole prompt).
The first step of each bucket and K is not counted either (one-off costs of a new shape).

Every 8th pass of a bucket, if it speculates and is not exploring, uses a neighbouring K
instead (K+1 and K-1 in turn) so the cost line keeps seeing different N.

With ``adaptive=False`` every pass drafts ``max_draft_tokens`` (no model, no guard).
"""

from __future__ import annotations

from specdec.linefit import LineFit


class SpeculationPolicy:
    def __init__(
        self,
        max_draft_tokens: int,
        adaptive: bool = True,
        decay: float = 0.98,
        prior_acceptance: float = 0.6,
        step_decay: float = 0.9,
        margin: float = 0.05,
        explore_every: int = 16,
        max_backoff: int = 8,
    ) -> None:
        self.max_draft_tokens = max_draft_tokens
        self.adaptive = adaptive
        self.decay = decay
        self.prior_acceptance = prior_acceptance
        self.step_decay = step_decay
        self.margin = margin
        self.explore_every = explore_every
        self.max_backoff = max_backoff
        self._steps: dict[tuple[int, int], list[float]] = {}  # (bucket, K) -> [tokens, seconds, steps]
        self._bucket_passes: dict[int, int] = {}
        self._since_explore: dict[int, float] = {}  # bucket -> wall seconds since its last exploration
        self._backoff: dict[int, int] = {}  # bucket -> multiple of explore_every (1 .. max_backoff)
        self._explored: dict[int, tuple[int, int]] = {}  # bucket -> (explored K, chosen K), until judged
        self._last_rate: dict[tuple[int, int], float] = {}  # (bucket, K) -> goodput of its latest step
        self._cold: set[int] = set()  # buckets whose latest step was not counted (warm=False)
        self._seen: set[tuple[int, int]] = set()  # (bucket, K) with a step observed
        self._cold_seconds: dict[int, float] = {}  # bucket -> time of its latest cold step
        self._drafted = [0.0] * max_draft_tokens
        self._accepted = [0.0] * max_draft_tokens
        self._fit = LineFit(decay)  # target passes: seconds against tokens per pass
        self._draft_fit = LineFit(decay)  # draft calls: seconds against draft tokens
        self._draft_cost = 0.0  # seconds per draft token and row
        self._draft_samples = 0

    # ---------------------------------------------------------------- observations
    def observe_pass(self, num_tokens: int, seconds: float) -> None:
        """A target pass (prefill or verify) over ``num_tokens`` tokens took ``seconds``."""
        self._fit.add(num_tokens, seconds)

    def observe_draft(self, num_draft_tokens: int, seconds: float) -> None:
        """Drafting ``num_draft_tokens`` tokens (all rows together) took ``seconds``."""
        if num_draft_tokens > 0:
            self._draft_fit.add(num_draft_tokens, seconds)
            per_token = seconds / num_draft_tokens
            self._draft_samples += 1
            w = max(1.0 / self._draft_samples, 1.0 - self.decay)
            self._draft_cost += w * (per_token - self._draft_cost)

    def observe_acceptance(self, num_drafted: int, num_accepted: int) -> None:
        """A row verified ``num_drafted`` drafts and accepted the first ``num_accepted``.

        Only positions that were reached (every draft before them accepted) count, so
        ``acceptance(i)`` is conditional on the earlier positions, as ``expected_tokens`` needs."""
        for i in range(min(num_drafted, num_accepted + 1, self.max_draft_tokens)):
            self._drafted[i] = self.decay * self._drafted[i] + 1.0
            self._accepted[i] = self.decay * self._accepted[i] + float(i < num_accepted)

    def observe_step(
        self, batch_size: int, k: int, committed_tokens: float, seconds: float, warm: bool = True
    ) -> None:
        """A whole step over ``batch_size`` rows that used K = ``k`` committed ``committed_tokens``
        tokens (all rows together) in ``seconds`` of wall time.

        ``warm=False``: the step also paid a one-off cost of switching to speculation (a batched
        draft model catching up on the tokens of the plain steps before it). Counting it would
        charge every exploration of speculation with that cost, which steady speculation never
        pays, so it only counts as time spent; the guard explores once more.

        The first step of each batch-size bucket and K is treated the same way: it pays the
        one-off costs of a new shape (allocations, first calls). Measured goodput pools tokens
        and seconds, so one such step, counted, stays in an arm's seconds and leaves them only
        as fast as new steps of that arm come in: few, for an arm the guard has backed off."""
        if seconds <= 0.0:
            return
        bucket = self.bucket(batch_size)
        self._since_explore[bucket] = self._since_explore.get(bucket, 0.0) + seconds
        first = (bucket, k) not in self._seen
        self._seen.add((bucket, k))
        if not warm or first:
            self._cold.add(bucket)
            self._cold_seconds[bucket] = seconds
            return
        self._cold.discard(bucket)
        sums = self._steps.setdefault((bucket, k), [0.0, 0.0, 0.0])
        for i, value in enumerate((committed_tokens, seconds, 1.0)):
            sums[i] = self.step_decay * sums[i] + value
        self._last_rate[(bucket, k)] = committed_tokens / seconds

    # ---------------------------------------------------------------- estimates
    def acceptance(self, position: int) -> float:
        """Smoothed acceptance of draft ``position`` (0-based) given all before it passed."""
        prior_weight = 2.0
        return (self._accepted[position] + prior_weight * self.prior_acceptance) / (
            self._drafted[position] + prior_weight
        )

    def expected_tokens(self, k: int) -> float:
        total, survive = 1.0, 1.0
        for i in range(k):
            survive *= self.acceptance(i)
            total += survive
        return total

    def pass_cost(self) -> tuple[float, float] | None:
        """``(a, b)`` of the fitted cost line, or None while the fit is undetermined."""
        return self._line(self._fit)

    def draft_cost(self, num_draft_tokens: int) -> float:
        """Estimated seconds to draft ``num_draft_tokens`` tokens (all rows together)."""
        if num_draft_tokens <= 0:
            return 0.0
        line = self._line(self._draft_fit)
        if line is None:  # one size of call so far: time per token
            return self._draft_cost * num_draft_tokens
        return line[0] + line[1] * num_draft_tokens

    @staticmethod
    def _line(fit: LineFit) -> tuple[float, float] | None:
        """``(intercept, slope)`` of a fit once it has about two points' weight, or None."""
        return fit.line() if fit.weight >= 2.0 else None

    @staticmethod
    def bucket(batch_size: int) -> int:
        """Batch sizes 1, 2-3, 4-7, 8-15, ... share one measured-goodput estimate."""
        return max(batch_size, 1).bit_length()

    def measured_goodput(self, batch_size: int, k: int) -> float | None:
        """Measured tokens per second of steps with K = ``k`` in ``batch_size``'s bucket."""
        sums = self._steps.get((self.bucket(batch_size), k))
        return None if sums is None else sums[0] / sums[1]

    def measured_step_time(self, batch_size: int, k: int) -> float | None:
        """Measured mean seconds of a step with K = ``k`` in ``batch_size``'s bucket."""
        sums = self._steps.get((self.bucket(batch_size), k))
        return None if sums is None else sums[1] / sums[2]

    def model_k(self, batch_size: int, measured: bool = True) -> int:
        """K maximising the estimated goodput ``B * e(K) / step time``.

        The step time of a K is its measured mean in ``batch_size``'s bucket where there is one
        (``measured``), else the fitted cost line's estimate; ``max_draft_tokens`` while neither
        exists. Measured times correct the line where the real cost is not linear (on a CPU a
        verify pass over 5 tokens can cost the same as one over 1), and the neighbouring-K
        passes of :meth:`_guard` keep measuring new K, so the choice climbs to the K that
        measures best."""
        cost = self.pass_cost()

        def step_time(k: int) -> float | None:
            seen = self.measured_step_time(batch_size, k) if measured else None
            if seen is not None:
                return seen
            if cost is None:
                return None
            a, b = cost
            return a + b * batch_size * (k + 1) + self.draft_cost(batch_size * k)

        times = {k: step_time(k) for k in range(self.max_draft_tokens + 1)}
        if any(t is None for t in times.values()):
            return self.max_draft_tokens
        return max(times, key=lambda k: batch_size * self.expected_tokens(k) / (times[k] + 1e-12))  # type: ignore[operator]

    # ---------------------------------------------------------------- decision
    def choose(self, batch_size: int) -> int:
        """K for the next pass over ``batch_size`` rows."""
        if not self.adaptive or self.max_draft_tokens == 0:
            return self.max_draft_tokens
        return self._guard(batch_size, self.model_k(batch_size))

    def _guard(self, batch_size: int, model_k: int) -> int:
        """Plain or speculative for this pass, from measured goodput (see the module docstring)."""
        bucket = self.bucket(batch_size)
        passes = self._bucket_passes[bucket] = self._bucket_passes.get(bucket, 0) + 1
        spec = model_k or self._best_measured_k(batch_size) or 1
        plain_rate = self.measured_goodput(batch_size, 0)
        spec_rate = self.measured_goodput(batch_size, spec)
        if plain_rate is None and spec_rate is None:
            return model_k
        if plain_rate is None:
            return 0
        if spec_rate is None:
            return spec
        explored = self._explored.get(bucket)
        if explored is not None and bucket in self._cold:
            self._cold.discard(bucket)
            return explored[0]  # the exploring pass was not counted: once more, warm
        pick = spec if spec_rate > (1.0 + self.margin) * plain_rate else 0
        other = 0 if pick else spec
        self._judge_exploration(batch_size)
        # What one exploration costs: a step of the other arm, plus the cold step before it when
        # the other arm is speculation (it can cost many steps: every row's draft catches up).
        other_step = self.measured_step_time(batch_size, other) or 0.0
        if other > 0:
            other_step += self._cold_seconds.get(bucket, 0.0)
        interval = self.explore_every * self._backoff.get(bucket, 1) * other_step
        if self._since_explore.get(bucket, 0.0) >= interval:
            self._since_explore[bucket] = 0.0
            self._explored[bucket] = (other, pick)
            return other  # refresh the arm not taken
        if pick > 0 and passes % 8 == 0:  # vary N for the cost line
            return min(self.max_draft_tokens, pick + 1) if (passes // 8) % 2 else pick - 1
        return pick

    def _judge_exploration(self, batch_size: int) -> None:
        """After an exploration in ``batch_size``'s bucket: back off if the explored pass did worse
        than the arm that was chosen, start over if it did better."""
        bucket = self.bucket(batch_size)
        if bucket not in self._explored:
            return
        explored, chosen = self._explored.pop(bucket)
        explored_rate = self._last_rate.get((bucket, explored), 0.0)
        chosen_rate = self.measured_goodput(batch_size, chosen) or 0.0
        backoff = self._backoff.get(bucket, 1)
        self._backoff[bucket] = min(2 * backoff, self.max_backoff) if explored_rate < chosen_rate else 1

    def _best_measured_k(self, batch_size: int) -> int:
        """The K > 0 with the best measured goodput in ``batch_size``'s bucket (0: none measured)."""
        rates = {k: self.measured_goodput(batch_size, k) for k in range(1, self.max_draft_tokens + 1)}
        measured = {k: r for k, r in rates.items() if r is not None}
        return max(measured, key=measured.__getitem__) if measured else 0
