"""The study tables' helpers in capsim.studies.report: the worst minute's p99 TTFT and ``median (min to max)``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from capsim.studies.report import median_range, worst_minute_p99


def requests(rows: list[tuple[float, float | None, str]]) -> pd.DataFrame:
    """(arrival_s, TTFT or None for a failure, outcome) rows as a SimResult's requests frame."""
    return pd.DataFrame({"arrival_s": [a for a, _, _ in rows],
                         "first_token_s": [a + t if t is not None else np.nan for a, t, _ in rows],
                         "outcome": [o for _, _, o in rows]})


def test_the_worst_minute_is_the_bin_of_arrivals_with_the_highest_p99():
    # minute 0: a hundred at 0.1 s; minute 1: a hundred at 0.2 s and one at 9 s (its p99 between them)
    rows = [(k * 0.5, 0.1, "ok") for k in range(100)] + [(60 + k * 0.5, 0.2, "ok") for k in range(100)]
    rows.append((100.0, 9.0, "ok"))
    got = worst_minute_p99(requests(rows))
    assert got == pytest.approx(np.quantile([0.2] * 100 + [9.0], 0.99))
    assert 0.2 < got < 9.0
    frame = requests(rows)
    assert worst_minute_p99(frame[frame.arrival_s < 60.0]) == pytest.approx(0.1)  # a window without minute 1
    # bins count from time 0, not from the window's first request: from 30 s the window still has minutes 0 and 1
    assert worst_minute_p99(frame[frame.arrival_s >= 30.0]) == pytest.approx(got)


def test_failures_are_left_out_of_the_p99_and_a_window_with_none_served_is_nan():
    rows = [(k * 0.5, 0.1, "ok") for k in range(100)] + [(10.0, None, "failed")] * 5
    assert worst_minute_p99(requests(rows)) == pytest.approx(0.1)
    assert math.isnan(worst_minute_p99(requests([(1.0, None, "failed")])))
    frame = requests(rows)
    assert math.isnan(worst_minute_p99(frame[frame.arrival_s >= 500.0]))  # no arrival in the window


def test_median_range_quotes_median_min_and_max_scaled():
    assert median_range(pd.Series([0.01, 0.03, 0.02]), 1, scale=100) == "2.0 (1.0 to 3.0)"
    assert median_range(pd.Series([np.nan, 5.0]), 0) == "5 (5 to 5)"
    assert median_range(pd.Series([np.nan, np.nan]), 2) == "-"
