"""Server-wide metrics for Prometheus, through ``prometheus_client``, one registry per app.

The engine thread writes, HTTP handlers read; one lock guards the counters. They are kept as
plain numbers (the engine's :class:`SpecStats` among them) and turned into metric families at
scrape time, because several gauges are ratios of them (acceptance rate, mean accepted length,
acceptance per draft position, mean batch size). Request latency and rows per verify pass are
``prometheus_client`` histograms. Names follow Prometheus conventions: ``_total`` counters,
``_seconds`` units, labels for finish status, phase and draft position.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from specdec.engine.stats import SpecStats

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    """The server's counters and gauges; :meth:`render` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.request_seconds = Histogram(
            "specdec_request_duration_seconds",
            "Time from admission to the last token of finished requests.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "specdec_batch_size",
            "Rows (sequences) per batched verify pass.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.requests: Counter[str] = Counter()  # finish status -> count
        self.rejected: Counter[str] = Counter()  # reason -> count (queue full, shutting down)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.verify_passes = 0  # batched target passes
        # Per-sequence verify steps (a pass of B rows counts B), counted like a request's stats.
        self.steps = SpecStats()
        self.phase_seconds: defaultdict[str, float] = defaultdict(float)
        self.queue_depth = 0
        self.active = 0
        self.batch_size_sum = 0
        self.last_num_draft_tokens = 0
        self.passes_by_k: Counter[int] = Counter()  # draft tokens per row chosen -> passes

    def record_step(self, num_drafted: int, num_accepted: int, num_nodes: int | None = None) -> None:
        """One row's verify step: ``num_drafted`` positions (``num_nodes`` tokens in a tree),
        ``num_accepted`` of them kept."""
        with self._lock:
            self.steps.record(num_drafted, num_accepted, num_nodes)

    def record_pass(self, batch_size: int, num_draft_tokens: int) -> None:
        with self._lock:
            self.verify_passes += 1
            self.batch_size_sum += batch_size
            self.last_num_draft_tokens = num_draft_tokens
            self.passes_by_k[num_draft_tokens] += 1
        self.batch_rows.observe(batch_size)

    def add_phase(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.phase_seconds[phase] += seconds

    def finish(self, status: str, prompt_tokens: int, generation_tokens: int) -> None:
        with self._lock:
            self.requests[status] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens

    def observe_request(self, seconds: float) -> None:
        """A finished request's time from admission to its last event."""
        self.request_seconds.observe(seconds)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def set_load(self, queue_depth: int, active: int) -> None:
        with self._lock:
            self.queue_depth, self.active = queue_depth, active

    @property
    def row_steps(self) -> int:
        return self.steps.verify_steps

    @property
    def draft_tokens(self) -> int:
        return self.steps.draft_tokens

    @property
    def accepted_tokens(self) -> int:
        return self.steps.accepted_tokens

    @property
    def drafted_per_position(self) -> list[int]:
        return self.steps.drafted_per_position

    @property
    def accepted_per_position(self) -> list[int]:
        return self.steps.accepted_per_position

    @property
    def acceptance_rate(self) -> float:
        return self.steps.acceptance_rate

    @property
    def mean_accepted_length(self) -> float:
        return self.steps.mean_accepted_length

    def render(self) -> str:
        """The Prometheus text format of this server's registry."""
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Metric]:
        """The counters and gauges as metric families (``prometheus_client``'s collector protocol)."""
        with self._lock:
            statuses = sorted(set(self.requests) | {"stop", "length", "cancelled", "error"})
            requests = CounterMetricFamily(
                "specdec_requests_total", "Finished requests by finish status.", labels=["model", "status"]
            )
            for status in statuses:
                requests.add_metric([self.model_name, status], self.requests[status])
            yield requests
            rejected = CounterMetricFamily(
                "specdec_rejected_requests_total", "Requests refused before admission.", labels=["reason"]
            )
            for reason in sorted(set(self.rejected) | {"queue_full", "shutting_down"}):
                rejected.add_metric([reason], self.rejected[reason])
            yield rejected
            yield CounterMetricFamily(
                "specdec_prompt_tokens_total", "Prompt tokens of finished requests.", value=self.prompt_tokens
            )
            yield CounterMetricFamily(
                "specdec_generation_tokens_total", "Tokens returned to clients.", value=self.generation_tokens
            )
            yield CounterMetricFamily(
                "specdec_verify_passes_total", "Batched target verify passes.", value=self.verify_passes
            )
            by_k = CounterMetricFamily(
                "specdec_passes_by_draft_tokens_total",
                "Batched passes by the draft tokens per row chosen for them (0: plain decoding).",
                labels=["k"],
            )
            for k in sorted(self.passes_by_k):
                by_k.add_metric([str(k)], self.passes_by_k[k])
            yield by_k
            yield CounterMetricFamily(
                "specdec_sequence_steps_total", "Per-sequence verify steps.", value=self.row_steps
            )
            yield CounterMetricFamily(
                "specdec_draft_tokens_total", "Draft tokens proposed.", value=self.draft_tokens
            )
            yield CounterMetricFamily(
                "specdec_accepted_tokens_total", "Draft tokens accepted.", value=self.accepted_tokens
            )
            yield GaugeMetricFamily(
                "specdec_acceptance_rate", "Accepted / proposed draft tokens.", value=self.acceptance_rate
            )
            yield GaugeMetricFamily(
                "specdec_mean_accepted_length",
                "Tokens committed per sequence step, counting the recovered/bonus token.",
                value=self.mean_accepted_length,
            )
            positions = GaugeMetricFamily(
                "specdec_position_acceptance_rate",
                "Acceptance rate of the i-th draft token.",
                labels=["position"],
            )
            pairs = zip(self.accepted_per_position, self.drafted_per_position, strict=True)
            for i, (accepted, drafted) in enumerate(pairs):
                positions.add_metric([str(i)], accepted / drafted if drafted else 0.0)
            yield positions
            phases = CounterMetricFamily(
                "specdec_phase_seconds_total", "Engine wall time by phase.", labels=["phase"]
            )
            for phase in ("prefill", "draft", "verify", "commit"):
                phases.add_metric([phase], self.phase_seconds[phase])
            yield phases
            yield GaugeMetricFamily(
                "specdec_queue_depth", "Requests waiting for a batch row.", value=self.queue_depth
            )
            yield GaugeMetricFamily(
                "specdec_active_requests", "Requests holding a batch row.", value=self.active
            )
            mean_batch = self.batch_size_sum / self.verify_passes if self.verify_passes else 0.0
            yield GaugeMetricFamily("specdec_mean_batch_size", "Mean rows per verify pass.", value=mean_batch)
            yield GaugeMetricFamily(
                "specdec_num_draft_tokens",
                "Draft tokens per row chosen for the last pass.",
                value=self.last_num_draft_tokens,
            )
