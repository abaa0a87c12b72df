"""Server-wide counters, rendered in the Prometheus text exposition format (version 0.0.4).

The engine thread writes, HTTP handlers read; one lock guards both. Names follow Prometheus
conventions: ``_total`` counters, ``_seconds`` units, labels for finish status, phase and
draft position.
"""

from __future__ import annotations

import threading
from collections import Counter

from specdec.engine.stats import SpecStats


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # finish status -> count
        self.rejected: Counter[str] = Counter()  # reason -> count (queue full, shutting down)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.verify_passes = 0  # batched target passes
        # Per-sequence verify steps (a pass of B rows counts B), counted like a request's stats.
        self.steps = SpecStats()
        self.phase_seconds: Counter[str] = Counter()
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

    def add_phase(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.phase_seconds[phase] += seconds

    def finish(self, status: str, prompt_tokens: int, generation_tokens: int) -> None:
        with self._lock:
            self.requests[status] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens

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
        """The Prometheus text format."""
        with self._lock:
            out: list[str] = []

            def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                out.append(f"# HELP specdec_{name} {help_text}")
                out.append(f"# TYPE specdec_{name} {kind}")
                for labels, value in samples:
                    out.append(
                        f"specdec_{name}{labels} {value:g}"
                        if isinstance(value, float)
                        else f"specdec_{name}{labels} {value}"
                    )

            model = f'model="{self.model_name}"'
            statuses = sorted(set(self.requests) | {"stop", "length", "cancelled", "error"})
            metric(
                "requests_total",
                "counter",
                "Finished requests by finish status.",
                [(f'{{{model},status="{s}"}}', self.requests[s]) for s in statuses],
            )
            reasons = sorted(set(self.rejected) | {"queue_full", "shutting_down"})
            metric(
                "rejected_requests_total",
                "counter",
                "Requests refused before admission.",
                [(f'{{reason="{r}"}}', self.rejected[r]) for r in reasons],
            )
            metric(
                "prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                [("", self.prompt_tokens)],
            )
            metric(
                "generation_tokens_total",
                "counter",
                "Tokens returned to clients.",
                [("", self.generation_tokens)],
            )
            metric(
                "verify_passes_total", "counter", "Batched target verify passes.", [("", self.verify_passes)]
            )
            metric(
                "passes_by_draft_tokens_total",
                "counter",
                "Batched passes by the draft tokens per row chosen for them (0: plain decoding).",
                [(f'{{k="{k}"}}', self.passes_by_k[k]) for k in sorted(self.passes_by_k)],
            )
            metric("sequence_steps_total", "counter", "Per-sequence verify steps.", [("", self.row_steps)])
            metric("draft_tokens_total", "counter", "Draft tokens proposed.", [("", self.draft_tokens)])
            metric("accepted_tokens_total", "counter", "Draft tokens accepted.", [("", self.accepted_tokens)])
            metric(
                "acceptance_rate",
                "gauge",
                "Accepted / proposed draft tokens.",
                [("", float(self.acceptance_rate))],
            )
            metric(
                "mean_accepted_length",
                "gauge",
                "Tokens committed per sequence step, counting the recovered/bonus token.",
                [("", float(self.mean_accepted_length))],
            )
            metric(
                "position_acceptance_rate",
                "gauge",
                "Acceptance rate of the i-th draft token.",
                [
                    (f'{{position="{i}"}}', float(a / d if d else 0.0))
                    for i, (a, d) in enumerate(
                        zip(self.accepted_per_position, self.drafted_per_position, strict=True)
                    )
                ],
            )
            metric(
                "phase_seconds_total",
                "counter",
                "Engine wall time by phase.",
                [
                    (f'{{phase="{p}"}}', float(self.phase_seconds[p]))
                    for p in ("prefill", "draft", "verify", "commit")
                ],
            )
            metric("queue_depth", "gauge", "Requests waiting for a batch row.", [("", self.queue_depth)])
            metric("active_requests", "gauge", "Requests holding a batch row.", [("", self.active)])
            mean_batch = self.batch_size_sum / self.verify_passes if self.verify_passes else 0.0
            metric("mean_batch_size", "gauge", "Mean rows per verify pass.", [("", float(mean_batch))])
            metric(
                "num_draft_tokens",
                "gauge",
                "Draft tokens per row chosen for the last pass.",
                [("", self.last_num_draft_tokens)],
            )
            return "\n".join(out) + "\n"
