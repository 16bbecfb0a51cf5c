"""The soak script's arithmetic: windows, p95, 5xx count, RSS growth, the verdict, the back-off."""

from collections import Counter

import httpx
import pytest

from benchmarks import soak
from benchmarks.soak import Sample, passed, rss_growth, server_errors, verdict, windows


def test_samples_are_grouped_by_the_window_their_request_started_in() -> None:
    samples = [
        Sample(1.0, "200", 2.0, False),
        Sample(299.0, "400", 0.01, True),
        Sample(301.0, "200", 4.0, False),
    ]
    first, second = windows(samples, window_s=300)
    assert (first.index, first.requests, first.statuses) == (0, 2, Counter({"200": 1, "400": 1}))
    assert first.p95_s == 2.0  # hostile requests do not count towards latency
    assert (second.index, second.requests, second.p95_s) == (1, 1, 4.0)


def test_a_stream_with_an_error_event_counts_as_a_server_error() -> None:
    samples = [Sample(0, "503", 1, False), Sample(0, "stream-error", 1, False)]
    assert server_errors(samples) == 2


@pytest.mark.parametrize(
    ("start", "end", "growth"),
    [({"m": 1000.0}, {"m": 1050.0}, 0.05), ({}, {"m": 1.0}, None), ({"m": 0.0}, {"m": 1.0}, None)],
)
def test_rss_growth(start, end, growth) -> None:
    assert rss_growth(start, end) == (None if growth is None else pytest.approx(growth))


def test_verdict_passes_only_without_5xx_transport_errors_or_10_percent_growth() -> None:
    clean = [Sample(0, "200", 1, False), Sample(0, "429", 0, True)]
    assert passed(clean, 0.05)
    assert verdict(clean, 0.05).startswith("VERDICT PASS: requests=2 5xx=0")
    assert not passed(clean, 0.12)
    assert not passed(clean, None)
    assert not passed([*clean, Sample(0, "ReadTimeout", 300, False)], 0.0)
    assert not passed([*clean, Sample(0, "500", 1, True)], 0.0)


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (429, {"Retry-After": "3"}, 3.0),
        (503, {"Retry-After": "1"}, 1.0),
        (429, {}, 1.0),
        (429, {"Retry-After": "soon"}, 1.0),
        (429, {"Retry-After": "86400"}, soak.MAX_RETRY_WAIT_S),
        (429, {"Retry-After": "-5"}, 0.0),
        (200, {"Retry-After": "3"}, 0.0),
        (400, {}, 0.0),
    ],
)
def test_a_refused_worker_waits_what_retry_after_says_capped(status, headers, wait) -> None:
    assert soak.retry_wait(status, httpx.Headers(headers)) == wait
