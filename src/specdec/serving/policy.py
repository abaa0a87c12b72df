"""How many draft tokens per row to verify in the next batched pass (K as load changes).

Speculation trades extra target compute (B x (K+1) tokens per pass instead of B) for fewer
passes. At batch size 1 a pass is memory-bound and verifying K more tokens is almost free; as
the batch grows the pass becomes compute-bound and the extra tokens cost real time (Liu et al.
2024, "Optimizing Speculative Decoding for Serving Large Language Models Using Goodput";
Su et al. 2023, "The Synergy of Speculative Decoding and Batching").

The policy chooses K in ``0 .. max_draft_tokens`` maximising the estimated goodput::

    goodput(K) = B * e(K) / (a + b * B * (K+1) + c * B * K)

* ``e(K) = 1 + sum_{i=1..K} prod_{j<=i} alpha_j``: expected tokens committed per row, from the
  measured per-position acceptance ``alpha_j`` (Leviathan et al. 2023, Sec. 3.1);
* ``a + b * N``: the measured cost of a target pass over N tokens, a line fitted online
  (exponentially forgotten least squares) to every prefill and verify pass;
* ``c``: the measured drafting cost per draft token and row.

K = 0 is plain batched decoding, so the choice falls back to it exactly when the estimates say
speculation would lower throughput. Every 8th pass tries a neighbouring K so the cost line
keeps seeing different N. With ``adaptive=False`` every pass drafts ``max_draft_tokens``.
"""

from __future__ import annotations


class SpeculationPolicy:
    def __init__(
        self, max_draft_tokens: int, adaptive: bool = True, decay: float = 0.98, prior_acceptance: float = 0.6
    ) -> None:
        self.max_draft_tokens = max_draft_tokens
        self.adaptive = adaptive
        self.decay = decay
        self.prior_acceptance = prior_acceptance
        self._drafted = [0.0] * max_draft_tokens
        self._accepted = [0.0] * max_draft_tokens
        self._fit = [0.0] * 5  # decayed sums: w, sum N, sum N^2, sum t, sum N t
        self._draft_cost = 0.0  # seconds per draft token and row
        self._draft_samples = 0
        self._passes = 0

    # ---------------------------------------------------------------- observations
    def observe_pass(self, num_tokens: int, seconds: float) -> None:
        """A target pass (prefill or verify) over ``num_tokens`` tokens took ``seconds``."""
        s = self._fit
        for i in range(5):
            s[i] *= self.decay
        s[0] += 1.0
        s[1] += num_tokens
        s[2] += num_tokens * num_tokens
        s[3] += seconds
        s[4] += num_tokens * seconds

    def observe_draft(self, num_draft_tokens: int, seconds: float) -> None:
        if num_draft_tokens > 0:
            per_token = seconds / num_draft_tokens
            self._draft_samples += 1
            w = max(1.0 / self._draft_samples, 1.0 - self.decay)
            self._draft_cost += w * (per_token - self._draft_cost)

    def observe_acceptance(self, num_drafted: int, num_accepted: int) -> None:
        for i in range(min(num_drafted, self.max_draft_tokens)):
            self._drafted[i] = self.decay * self._drafted[i] + 1.0
            self._accepted[i] = self.decay * self._accepted[i] + float(i < num_accepted)

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
        w, sn, snn, st, snt = self._fit
        if w < 2.0:
            return None
        var = snn / w - (sn / w) ** 2
        if var <= 1e-9:
            return None
        b = max((snt / w - (sn / w) * (st / w)) / var, 0.0)
        a = max(st / w - b * sn / w, 0.0)
        return a, b

    def choose(self, batch_size: int) -> int:
        """K for the next pass over ``batch_size`` rows."""
        self._passes += 1
        cost = self.pass_cost()
        if cost is None or not self.adaptive or self.max_draft_tokens == 0:
            return self.max_draft_tokens
        a, b = cost
        c = self._draft_cost

        def goodput(k: int) -> float:
            return (
                batch_size
                * self.expected_tokens(k)
                / (a + b * batch_size * (k + 1) + c * batch_size * k + 1e-12)
            )

        best = max(range(self.max_draft_tokens + 1), key=goodput)
        if self._passes % 8 == 0:  # explore a neighbour so the cost line stays determined
            best = min(self.max_draft_tokens, best + 1) if (self._passes // 8) % 2 else max(0, best - 1)
        return best
