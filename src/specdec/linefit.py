"""A least-squares line ``y = a + b x`` that follows drift: each new point multiplies the weight
of every older point by ``decay`` (exponential forgetting).

Both cost models fit one: ``adaptive``'s draft time per call against K
(:class:`specdec.drafters.adaptive.CostModel`) and the server's pass and draft times against
tokens per pass (:class:`specdec.serving.policy.SpeculationPolicy`). A draft call has a large
fixed part (the first pass after a target pass finds the draft's weights evicted from the
caches), which a time per token would spread over the tokens and so overprice short calls.
"""

from __future__ import annotations


class LineFit:
    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.weight = 0.0  # sum of the points' weights
        self._sums = [0.0, 0.0, 0.0, 0.0]  # weighted sums of x, x^2, y, x y

    def add(self, x: float, y: float) -> None:
        self.weight = self.decay * self.weight + 1.0
        for i, value in enumerate((x, x * x, y, x * y)):
            self._sums[i] = self.decay * self._sums[i] + value

    def means(self) -> tuple[float, float, float]:
        """``(mean x, mean y, variance of x)`` under the weights (zeros before any point)."""
        if self.weight == 0.0:
            return 0.0, 0.0, 0.0
        sx, sxx, sy, _ = (s / self.weight for s in self._sums)
        return sx, sy, max(sxx - sx * sx, 0.0)

    def line(self, min_var: float = 1e-9, min_slope: float = 0.0) -> tuple[float, float] | None:
        """``(a, b)`` with ``b >= min_slope`` and ``a >= 0``, or None while the points do not
        determine a line (x varies by less than ``min_var``)."""
        mean_x, mean_y, var_x = self.means()
        if var_x <= min_var:
            return None
        cov = self._sums[3] / self.weight - mean_x * mean_y
        b = max(cov / var_x, min_slope)
        return max(mean_y - b * mean_x, 0.0), b
