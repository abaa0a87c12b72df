"""The load generator's summaries: the median run per server and the per-round paired ratios."""

from __future__ import annotations

import pytest

from specdec.serving.loadtest import LoadResult, median_run, paired_ratios


def result(server: str, concurrency: int, tokens_per_s: float) -> LoadResult:
    return LoadResult(server, concurrency, 8, 384, 1.0, tokens_per_s, 8.0, 0.1, 0.2, 0.3, 0.01, 0.02, 0.5, 1.0, 2.0)


def test_median_run_picks_the_middle_throughput() -> None:
    runs = [result("a", 4, t) for t in (300.0, 100.0, 200.0)]
    assert median_run(runs).tokens_per_s == 200.0
    assert median_run(runs[:2]).tokens_per_s == 100.0  # even count: the lower middle one


def test_paired_ratios_compare_servers_round_by_round() -> None:
    runs = {
        ("plain", 4): [result("plain", 4, t) for t in (100.0, 200.0)],
        ("spec", 4): [result("spec", 4, t) for t in (150.0, 180.0)],
    }
    assert paired_ratios(runs, "spec", "plain", 4) == pytest.approx([1.5, 0.9])
