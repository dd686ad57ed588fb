"""The physical-possibility checks of the benchmarks (``bench/validity.py``) and how a failed check marks a run:
pure functions on given numbers, no timing."""
from __future__ import annotations

import pytest

from bench.validity import (MIN_SLACK, check_at_least, check_at_most, check_noise, goal_status, ratio_noise, spread,
                            verdict)


def test_spread_is_robust_to_one_outlier():
    s = spread([1.0, 1.02, 0.98, 1.01, 9.0])
    assert s["n"] == 5 and s["median"] == pytest.approx(1.01) and s["max"] == 9.0
    assert s["rel_std"] < 0.05  # the MAD ignores the outlier; the min/max still show it
    assert s["rel_stderr"] == pytest.approx(s["rel_std"] / 5 ** 0.5)
    assert spread([2.0])["rel_std"] == 0.0
    with pytest.raises(ValueError):
        spread([])


def test_ratio_noise_combines_standard_errors_with_a_floor():
    quiet = spread([1.0] * 8)
    assert ratio_noise(quiet, quiet) == MIN_SLACK
    noisy = spread([1.0, 1.2, 0.8, 1.1, 0.9, 1.3, 0.7, 1.0])
    assert ratio_noise(noisy, quiet) == pytest.approx(3 * noisy["rel_stderr"])
    assert ratio_noise(noisy, noisy) == pytest.approx(3 * 2 ** 0.5 * noisy["rel_stderr"])


def test_the_reported_impossible_figures_are_invalid():
    """The run of the issue: sampling 25.2x from 50 vs 5 calls, end-to-end 13.86x, dump overhead -90 %."""
    teacher = spread([0.60, 0.62, 0.58, 0.61, 0.59, 0.63])
    student = spread([0.024, 0.025, 0.023, 0.024, 0.026, 0.022])
    noise = ratio_noise(teacher, student)
    sampling = check_at_most("sampling speedup <= 50/5", 25.2, 10.0, noise)
    e2e = check_at_most("end-to-end <= sampling", 13.86, 25.2, noise)
    overhead = check_at_least("dump overhead >= 0", -0.90, 0.0, noise)
    v = verdict([sampling, e2e, overhead])
    assert not sampling["ok"] and e2e["ok"] and not overhead["ok"]
    assert not v["valid"] and len(v["failed"]) == 2 and "25.2 > 10" in v["failed"][0]
    assert goal_status(True, v["valid"]) == "invalid run"  # "met" is never reported from such a run


def test_figures_within_the_noise_pass():
    assert check_at_most("sampling", 10.02, 10.0, 0.01)["ok"]  # measured 10.02x: 0.2 % above, within 1 %
    assert not check_at_most("sampling", 10.3, 10.0, 0.01)["ok"]
    assert check_at_least("overhead", -0.033, 0.0, 0.05)["ok"]  # -3.3 % with 5 % noise
    assert not check_at_least("overhead", -0.033, 0.0, 0.01)["ok"]
    assert not check_at_most("nan", float("nan"), 1.0)["ok"] and not check_at_least("inf", float("-inf"), 0.0)["ok"]
    v = verdict([check_at_most("a", 1.0, 2.0)])
    assert v["valid"] and v["failed"] == []
    assert goal_status(True, True) == "met" and goal_status(False, True) == "not met"


def test_noise_check():
    assert check_noise("t", spread([1.0, 1.1, 0.9, 1.05]))["ok"]
    bad = check_noise("t", spread([1.0, 3.0, 0.2, 2.5, 0.4]))
    assert not bad["ok"] and "over 5 samples" in bad["detail"]


def test_bench_runner_marks_an_invalid_run():
    from bench.__main__ import validity_line

    v = verdict([check_at_most("sampling speedup <= 10", 25.2, 10.0)])
    assert validity_line(v).startswith("**INVALID RUN, goals not judged**: sampling speedup <= 10: 25.2 > 10")
    ok = verdict([check_at_most("sampling speedup <= 10", 9.9, 10.0)])
    assert validity_line(ok).startswith("Checks (all passed): sampling speedup <= 10: 9.9 <= 10")
