"""benchmarks/paired.py: the paired-t interval the ladder and PTQ benchmarks report, against published t quantiles."""

import math
import statistics

import pytest

from benchmarks.paired import describe, paired, t_quantile


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_paired_interval_is_mean_difference_plus_minus_t_times_standard_error():
    a = {0: 81.0, 1: 80.2, 2: 82.5, 3: 79.9, 4: 81.4}
    b = {0: 80.1, 1: 79.0, 2: 81.9, 3: 80.3, 4: 80.0, 7: 99.0}  # seed 7 has no partner: left out
    r = paired(a, b)
    diffs = [0.9, 1.2, 0.6, -0.4, 1.4]
    se = statistics.stdev(diffs) / math.sqrt(5)
    assert r["n"] == 5 and r["seeds"] == [0, 1, 2, 3, 4] and r["wins"] == 4
    assert r["mean"] == pytest.approx(statistics.fmean(diffs)) and r["se"] == pytest.approx(se)
    assert r["ci"] == pytest.approx((r["mean"] - 2.7764 * se, r["mean"] + 2.7764 * se), abs=1e-3)
    assert r["ci"][0] < 0 < r["ci"][1]  # 4 wins of 5, but one loss of 0.4 points: no difference shown at 95%
    assert describe(r, "vaq", "lsq").endswith("vaq better on 4/5 seeds: no difference shown")


def test_pairing_finds_a_consistent_gap_that_overlapping_spreads_hide():
    base = {s: 80.0 + 2.0 * ((s * 7) % 5) for s in range(5)}  # a seed spread of about 3 points ...
    better = {s: v + 0.5 + 0.05 * s for s, v in base.items()}  # ... and a method 0.5-0.7 points better on every seed
    assert statistics.stdev(better.values()) + statistics.stdev(base.values()) > 5  # the old rule: "not shown"
    assert paired(better, base)["ci"][0] > 0.4
    assert paired({0: 1.0}, {0: 2.0}) is None and "no comparison" in describe(None, "a", "b")
