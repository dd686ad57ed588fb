"""Benchmarks that cannot report the impossible: spread of repeated samples and checks of figures against what is
physically possible. Pure functions (no timing, no torch), shared by every benchmark in ``bench/``.

A benchmark reports each compared variant's samples (taken interleaved, so load changes hit all alike) with
:func:`spread`, builds :func:`check_at_most` / :func:`check_at_least` / :func:`check_noise` records for the bounds
physics sets (e.g. a 5-step sampler cannot be more than 50 / 5 = 10x faster than a 50-step one of the same model;
writing more data cannot make a run faster beyond the noise), and gets one :func:`verdict`. A goal is reported
"met" only from a valid run (:func:`goal_status`); an invalid run says which check failed instead.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence

# A check's tolerance: this many combined standard errors of the measured samples, and never below MIN_SLACK.
SIGMAS = 3.0
MIN_SLACK = 0.01
# Relative standard deviation above which a set of repeated timings is too noisy to compare at all.
MAX_NOISE = 0.5


def spread(samples: Sequence[float]) -> dict:
    """n, median, mean, min, max, relative standard deviation (robust: 1.4826 x MAD / median) and the relative
    standard error of the mean (``rel_std / sqrt(n)``) of repeated measurements."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("spread() needs at least one sample")
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    rel_std = 1.4826 * mad / abs(med) if med else 0.0
    return {"n": len(values), "median": med, "mean": statistics.fmean(values), "min": min(values),
            "max": max(values), "rel_std": rel_std, "rel_stderr": rel_std / math.sqrt(len(values))}


def ratio_noise(*spreads: dict) -> float:
    """Relative uncertainty of a ratio (or difference) of the means of these sample sets: ``SIGMAS`` combined
    standard errors, at least ``MIN_SLACK``."""
    combined = math.sqrt(sum(s["rel_stderr"] ** 2 for s in spreads))
    return max(MIN_SLACK, SIGMAS * combined)


def _check(name: str, ok: bool, value: float, bound: float, detail: str) -> dict:
    return {"name": name, "ok": bool(ok), "value": value, "bound": bound, "detail": detail}


def check_at_most(name: str, value: float, bound: float, noise: float = MIN_SLACK) -> dict:
    """``value`` may not exceed ``bound`` by more than the relative ``noise`` (e.g. a speedup over its
    call-count ratio)."""
    limit = bound * (1 + noise) if bound >= 0 else bound * (1 - noise)
    ok = math.isfinite(value) and value <= limit
    return _check(name, ok, value, bound, f"{value:.4g} {'<=' if ok else '>'} {bound:.4g} (+{noise:.1%} noise)")


def check_at_least(name: str, value: float, bound: float, noise: float = MIN_SLACK) -> dict:
    """``value`` may not fall below ``bound`` by more than ``noise`` (absolute, in the value's unit; e.g. an
    overhead fraction cannot be below 0 - noise)."""
    ok = math.isfinite(value) and value >= bound - noise
    return _check(name, ok, value, bound, f"{value:.4g} {'>=' if ok else '<'} {bound:.4g} (-{noise:.3g} noise)")


def check_noise(name: str, s: dict, limit: float = MAX_NOISE) -> dict:
    """The samples summarised by ``s`` (from :func:`spread`) must not scatter more than ``limit`` (relative std)."""
    ok = s["rel_std"] <= limit
    return _check(name, ok, s["rel_std"], limit,
                  f"relative spread {s['rel_std']:.1%} {'<=' if ok else '>'} {limit:.0%} over {s['n']} samples")


def verdict(checks: Iterable[dict]) -> dict:
    """``{"valid": all checks passed, "failed": [details of the failed ones], "checks": [...]}``."""
    checks = list(checks)
    failed = [f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]]
    return {"valid": not failed, "failed": failed, "checks": checks}


def goal_status(met: bool, valid: bool) -> str:
    """"met" / "not met" for a valid run; "invalid run" whatever the figure says otherwise."""
    if not valid:
        return "invalid run"
    return "met" if met else "not met"
