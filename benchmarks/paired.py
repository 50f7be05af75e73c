"""Paired comparison of two methods over seeds: mean difference, 95% confidence interval (paired t), wins out of seeds.

In the benchmarks every seed shares its FP model, calibration images and data order across methods, so
the right question is whether the per-seed differences `a - b` are consistently positive, not whether two
independent spreads overlap. `paired(a, b)` takes {seed: value} dicts and uses the seeds both have.
"""

from __future__ import annotations

import math
import statistics


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (p > 0.5) of Student's t with `df` degrees of freedom (bisection on its CDF)."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError("need df >= 1 and 0.5 < p < 1")

    def cdf(t: float) -> float:  # 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2), via the pdf integrated from 0 (Simpson)
        n = 2000
        h = t / n
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        pdf = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        area = h / 3 * (pdf[0] + pdf[-1] + 4 * sum(pdf[1:-1:2]) + 2 * sum(pdf[2:-1:2]))
        return 0.5 + area

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict | None:
    """`a - b` over the seeds both have: n, mean, its standard error, the `level` CI (paired t), wins and ties of a.

    None when fewer than two seeds are shared (no interval exists).
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * se
    return {"n": len(diffs), "mean": mean, "se": se, "ci": (mean - half, mean + half), "level": level,
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "seeds": seeds}


def describe(result: dict | None, a: str, b: str) -> str:
    """One line: `a - b = +1.13 [95% CI +0.09, +2.17], a better on 8/10 seeds: a > b` (or `not shown`)."""
    if result is None:
        return f"{a} - {b}: fewer than two shared seeds, no comparison"
    lo, hi = result["ci"]
    verdict = f"{a} > {b}" if lo > 0 else f"{a} < {b}" if hi < 0 else "no difference shown"
    ties = f", {result['ties']} tied" if result["ties"] else ""
    return (f"{a} - {b} = {result['mean']:+.2f} points [{result['level']:.0%} CI {lo:+.2f}, {hi:+.2f}; SE {result['se']:.2f}], "
            f"{a} better on {result['wins']}/{result['n']} seeds{ties}: {verdict}")
