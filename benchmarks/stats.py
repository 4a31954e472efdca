"""Statistics that decide a comparison of two methods measured on the same seeds.

A table may say "A beats B" only with at least :data:`MIN_SEEDS` paired seeds and a 95 %
interval of the paired difference that excludes 0 (:func:`verdict`); otherwise it says
no difference was detected at that many seeds. Where learning is a phase transition
(a student learns to carry or does not), :func:`share_reaching` reports how many seeds
reach a threshold. No scipy needed: the t quantiles are tabulated.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

MIN_SEEDS = 5

# Two-sided 95 %: the 0.975 quantile of Student's t by degrees of freedom.
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
    9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
    17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
    25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000,
    120: 1.980,
}  # fmt: skip
Z975 = 1.960


def t975(df: int) -> float:
    """The 0.975 quantile of t with ``df`` degrees of freedom; between tabulated values the
    next smaller df (a slightly wider, conservative interval); 1.960 beyond 120."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df > 120:
        return Z975
    return T975[max(d for d in T975 if d <= df)]


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """The per-seed differences ``a - b`` (same seeds, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} vs {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b, strict=True)]


def t_interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the paired t 95 % interval of the mean difference
    (``mean ± t975(n - 1) * sd / sqrt(n)``); needs n >= 2."""
    n = len(diffs)
    if n < 2:
        raise ValueError("a t interval needs at least 2 paired seeds")
    mean = statistics.mean(diffs)
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def bootstrap_interval(diffs: Sequence[float], reps: int = 10000,
                       seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """``(mean, low, high)``: the percentile bootstrap 95 % interval of the mean difference
    (``reps`` resamples of the seeds with replacement, a fixed RNG seed). With few seeds
    it is too narrow (n = 3 has 10 distinct resamples): the t interval is the default."""
    n = len(diffs)
    if n < 2:
        raise ValueError("a bootstrap interval needs at least 2 paired seeds")
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(diffs, k=n)) for _ in range(reps))
    return statistics.mean(diffs), means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def share_reaching(values: Sequence[float], threshold: float,
                   higher: bool = True) -> tuple[int, int]:  # fmt: skip
    """``(k, n)``: how many of the ``n`` values reach ``threshold`` (>=, or <= if not
    ``higher``)."""
    k = sum(1 for v in values if (v >= threshold if higher else v <= threshold))
    return k, len(values)


def verdict(diffs: Sequence[float], higher: bool = True, a: str = "A", b: str = "B",
            word: str = "better") -> str:  # fmt: skip
    """What a table may say about ``a`` vs ``b`` from their paired differences ``a - b``:
    "``a`` better" or "``b`` better" only with n >= :data:`MIN_SEEDS` and a 95 % t
    interval excluding 0; "no difference detected at n = k seeds" when the interval holds
    0; "not decided" when it excludes 0 at fewer than :data:`MIN_SEEDS` seeds. ``word``
    replaces "better" for a quantity that is neither good nor bad (``"higher"``)."""
    n = len(diffs)
    if n < 2:
        return f"not decided: n = {n} seed{'s' if n != 1 else ''}"
    _, low, high = t_interval(diffs)
    if low <= 0 <= high:
        return f"no difference detected at n = {n} seeds"
    if n < MIN_SEEDS:
        return f"not decided: n = {n} < {MIN_SEEDS} seeds (the interval excludes 0)"
    a_higher = low > 0
    return f"{a if a_higher == higher else b} {word} (n = {n}, 95 % interval excludes 0)"


def interval_text(diffs: Sequence[float], fmt: str = "+.3f") -> str:
    """``+0.141 [-0.20, +0.48]``: mean paired difference and its 95 % t interval."""
    if len(diffs) < 2:
        return f"{statistics.mean(diffs):{fmt}} (n = {len(diffs)}: no interval)" if diffs else ""
    mean, low, high = t_interval(diffs)
    return f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def paired_section(rows: Sequence[str], noun: str = "method") -> str:
    """The paragraph above a table of paired comparisons (``rows``: its Markdown lines,
    header included), saying what "better" takes; empty without rows."""
    if not rows:
        return ""
    return (f"\nPaired by seed; a {noun} is called better only with at least {MIN_SEEDS} "
            "seeds and a 95 % interval that excludes 0:\n\n" + "\n".join(rows) + "\n")  # fmt: skip
