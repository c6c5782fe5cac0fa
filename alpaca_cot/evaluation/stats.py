"""Proportions with their Wilson 95% confidence intervals, as evaluate.py reports every score."""

from __future__ import annotations

import math

Z_95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, trials: int) -> dict:
    """A proportion with its Wilson 95% interval: ``{value, correct, records, ci95}``."""
    low, high = wilson_interval(successes, trials)
    return {"value": successes / trials if trials else None, "correct": successes, "records": trials,
            "ci95": [low, high]}


def percent(p: dict) -> str:
    """A proportion as "31.2% [14.2, 56.0]" ("n/a" without records)."""
    if p["value"] is None:
        return "n/a"
    low, high = p["ci95"]
    return f"{100 * p['value']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
