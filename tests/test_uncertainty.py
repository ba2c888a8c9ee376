"""Uncertainty of compared numbers and "best only beyond the uncertainty", on hand-made numbers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from moescope.analysis.evaluation.uncertainty import (
    Z95,
    Interval,
    best_beyond_noise,
    differs,
    mean_loss_se,
    perplexity_interval,
    stderr_interval,
)
from moescope.analysis.run import experiments as X


def test_two_equal_windows_give_half_the_difference_as_standard_error():
    # windows of 10 tokens with mean losses 2.0 and 3.0: m = 2.5, se = |a - b| / 2 = 0.5
    m, se = mean_loss_se([20.0, 30.0], [10, 10])
    assert m == 2.5 and se == pytest.approx(0.5)
    iv = perplexity_interval([20.0, 30.0], [10, 10])
    assert iv.value == pytest.approx(math.exp(2.5))
    assert iv.low == pytest.approx(math.exp(2.5 - Z95 * 0.5)) and iv.high == pytest.approx(math.exp(2.5 + Z95 * 0.5))


def test_unequal_windows_use_the_ratio_estimator():
    # sums 4, 9, 2 nats over 2, 3, 1 tokens: m = 15 / 6 = 2.5; residuals 4-5, 9-7.5, 2-2.5 = -1, 1.5, -0.5
    # se² = 3/2 · (1 + 2.25 + 0.25) / 36 = 0.1458333
    m, se = mean_loss_se([4.0, 9.0, 2.0], [2, 3, 1])
    assert m == 2.5 and se == pytest.approx(math.sqrt(1.5 * 3.5 / 36))
    # identical windows: no spread, a zero-width interval; one window: no standard error
    assert mean_loss_se([6.0, 6.0], [3, 3]) == (2.0, 0.0)
    assert mean_loss_se([6.0], [3]) == (2.0, None)


def test_task_scores_use_lm_eval_standard_error():
    iv = stderr_interval(0.33, 0.047)
    assert (iv.low, iv.high) == (pytest.approx(0.33 - Z95 * 0.047), pytest.approx(0.33 + Z95 * 0.047))
    assert stderr_interval(0.5, None) == Interval(0.5, 0.5, 0.5)


def test_best_only_where_it_exceeds_the_uncertainty():
    # the accuracy on 100 samples: 0.33 vs 0.34 with stderr ≈ 0.047 each: no best
    acc = {"a": stderr_interval(0.33, 0.047), "b": stderr_interval(0.34, 0.047)}
    assert best_beyond_noise(acc, "higher") is None
    # 0.30 vs 0.60 with the same stderr: 0.60's range (0.508–0.692) is clear of 0.30's (0.208–0.392)
    assert best_beyond_noise({"a": stderr_interval(0.30, 0.047), "b": stderr_interval(0.60, 0.047)}, "higher") == "b"
    # lower is better: the best must be clear of every other, not only of the runner-up's value
    ppl = {"a": Interval(10.0, 9.5, 10.5), "b": Interval(11.0, 10.4, 11.6), "c": Interval(14.0, 13.0, 15.0)}
    assert best_beyond_noise(ppl, "lower") is None  # 10.5 ≥ 10.4: a and b overlap
    ppl["b"] = Interval(11.0, 10.6, 11.4)
    assert best_beyond_noise(ppl, "lower") == "a"
    # a noisy value (a speed on a busy machine) neither wins nor blocks: the 3.73× in bold
    speed = {"a": Interval(3.73, 0.9, 4.1, noisy="measured while other processes kept 1.3 cores busy"),
             "b": Interval(1.25, 1.2, 1.3), "c": Interval(0.98, 0.95, 1.02)}
    assert best_beyond_noise(speed, "higher") == "b"
    assert best_beyond_noise({"a": Interval(1.0, 1.0, 1.0)}, "higher") is None  # nothing to beat
    assert differs(Interval(1.25, 1.2, 1.3), Interval(1.0, 1.0, 1.0)) is True
    assert differs(Interval(1.01, 0.97, 1.05), Interval(1.0, 1.0, 1.0)) is False
    with pytest.raises(ValueError, match="lower' or 'higher"):
        best_beyond_noise(acc, "up")


def _table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_best_and_noise_marks_of_a_comparison_table_follow_its_paired_verdicts():
    # two settings; the marks come from the paired columns compare() writes (tests/test_paired.py),
    # never from whether the rows' own intervals overlap
    t = _table([
        {"experiment": "original", "name": "original · A", "group": 0, "ppl x": 10.0, "ppl x low": 9.6, "ppl x high": 10.4},
        {"experiment": "e1", "name": "one", "group": 0, "ppl x": 10.2, "ppl x low": 9.8, "ppl x high": 10.6,
         "ppl x verdict": "worse", "ppl x best": True},
        {"experiment": "e2", "name": "two", "group": 0, "ppl x": 13.0, "ppl x low": 12.5, "ppl x high": 13.5,
         "ppl x verdict": "worse", "ppl x best": False},
        {"experiment": "original", "name": "original · B", "group": 1, "ppl x": 5.0, "ppl x low": 4.9, "ppl x high": 5.1},
        {"experiment": "e3", "name": "three", "group": 1, "ppl x": 6.0, "ppl x low": 5.5, "ppl x high": 6.5,
         "ppl x verdict": "within noise", "ppl x best": False},
        {"experiment": "e4", "name": "four", "group": 1, "ppl x": 6.2, "ppl x low": 5.7, "ppl x high": 6.7,
         "ppl x verdict": "worse", "ppl x best": False},
    ])
    assert X.best_marks(t, "ppl x", "lower") == {1}  # e1 (its range overlaps the original's: no matter)
    assert X.noise_marks(t, "ppl x") == {4}  # e3, though its own range is clear of its original's
    # a quality column without paired verdicts (no per-window losses stored) is neither best nor noise
    bare = t.drop(columns=["ppl x verdict", "ppl x best"])
    assert X.best_marks(bare, "ppl x", "lower") == set() and X.noise_marks(bare, "ppl x") == set()
    # a speed ratio within noise (busy machine) is drawn as noise and never best
    s = _table([
        {"experiment": "original", "name": "original", "group": 0, "prefill speed ratio": 1.0},
        {"experiment": "e1", "name": "one", "group": 0, "prefill speed ratio": 3.73, "prefill speed ratio low": 0.5,
         "prefill speed ratio high": 4.0, "prefill speed ratio noise": "measured while other processes kept 1.3 cores busy"},
        {"experiment": "e2", "name": "two", "group": 0, "prefill speed ratio": 1.30, "prefill speed ratio low": 1.25,
         "prefill speed ratio high": 1.35, "prefill speed ratio noise": ""},
        {"experiment": "e3", "name": "three", "group": 0, "prefill speed ratio": 0.31, "prefill speed ratio low": 0.2,
         "prefill speed ratio high": 1.1, "prefill speed ratio noise": "the repeats' range 0.20–1.10× covers 1.0×"},
    ])
    assert X.best_marks(s, "prefill speed ratio", "higher") == set()  # e2 alone is usable: nothing to beat
    assert X.noise_marks(s, "prefill speed ratio") == {1, 3}
    # an exact quantity (no range columns) is compared as it is
    p = _table([{"experiment": "original", "name": "o", "group": 0, "params ratio": 1.0},
                {"experiment": "e1", "name": "one", "group": 0, "params ratio": 0.8},
                {"experiment": "e2", "name": "two", "group": 0, "params ratio": 0.9}])
    assert X.best_marks(p, "params ratio", "lower") == {1}


def test_setting_names_say_what_reproduces_the_original():
    spec = {"ppl": ["demo:all"], "samples": 48, "seq_len": 256, "sampling": "first", "seed": 0, "stride": None,
            "tasks": ["moescope_demo_continuation"], "limit": 100.0, "num_fewshot": None, "efficiency": True,
            "efficiency_params": {"repeats": 3}}
    assert X.setting_name(spec) == "ppl demo:all 48×256 · moescope_demo_continuation ≤100 · speed ×3"
    assert X.setting_name({**spec, "tasks": [], "efficiency": False}) == "ppl demo:all 48×256"
