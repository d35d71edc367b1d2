"""reports/agreement.py against cases computed by hand (the arithmetic is in the comments), and against scipy."""
import math

import pytest

from reports import agreement

# MCM Table 2 (the paper's fine-tuning top-1) and a run of ours with a tie at 75% / 80%.
LABELS = ["60%", "75%", "80%", "90%"]
PAPER = [83.94, 84.82, 84.87, 84.19]
OURS = [72.55, 71.55, 71.55, 70.50]


def test_tau_b_of_a_reversed_ranking_is_minus_one():
    assert agreement.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert agreement.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0


def test_tau_b_with_a_tie_by_hand():
    # pairs (sign of paper difference, sign of ours):
    #   60-75 (-,+) D   60-80 (-,+) D   60-90 (-,+) D   75-80 (-,0) tied in ours   75-90 (+,+) C   80-90 (+,+) C
    # C = 2, D = 3, n0 = 6 pairs, tied in paper n1 = 0, tied in ours n2 = 1:
    # tau-b = (2 - 3) / sqrt((6 - 0) * (6 - 1)) = -1 / sqrt(30)
    assert agreement.kendall_tau_b(PAPER, OURS) == pytest.approx(-1 / math.sqrt(30))


def test_tau_b_with_ties_on_both_sides_by_hand():
    # x = [1, 1, 2], y = [1, 2, 2]: pairs 0-1 tied in x, 0-2 (-,-) C, 1-2 tied in y
    # C = 1, D = 0, n0 = 3, n1 = 1, n2 = 1: tau-b = 1 / sqrt(2 * 2) = 0.5
    assert agreement.kendall_tau_b([1, 1, 2], [1, 2, 2]) == pytest.approx(0.5)


def test_tau_b_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    cases = [(PAPER, OURS), ([85.3, 85.3, 85.1, 84.9, 85.1], [60.1, 61.0, 59.0, 59.0, 62.5]), ([1, 2, 2, 3], [3, 1, 1, 2])]
    for x, y in cases:
        assert agreement.kendall_tau_b(x, y) == pytest.approx(scipy_stats.kendalltau(x, y, variant="b").statistic)


def test_tau_of_a_constant_side_is_undefined():
    assert math.isnan(agreement.kendall_tau_b([1, 1, 1], [1, 2, 3]))
    assert math.isnan(agreement.kendall_tau_b([1], [2]))
    with pytest.raises(ValueError, match="one length"):
        agreement.kendall_tau_b([1, 2], [1])


def test_wilson_interval_by_hand():
    # p = 0.7255 on n = 2000, z = 1.96: z^2/n = 0.0019207; centre = (0.7255 + 0.00096037) / 1.0019207 = 0.725068
    # half = 1.96 * sqrt(0.7255 * 0.2745 / 2000 + z^2 / (4 * 2000^2)) / 1.0019207 = 0.019544
    lo, hi = agreement.interval(72.55, math.nan, 1, test_images=2000, accuracy=True)
    assert lo == pytest.approx(70.552, abs=2e-3) and hi == pytest.approx(74.461, abs=2e-3)
    # at 100 % the interval still has width (the normal approximation would give [100, 100])
    lo, hi = agreement.interval(100.0, math.nan, 1, test_images=256, accuracy=True)
    assert 98 < lo < 100 and hi == pytest.approx(100)


def test_t_interval_over_seeds_by_hand():
    # 40 and 44: mean 42, std sqrt(8); t(0.975, 1) = 12.706; half = 12.706 * sqrt(8) / sqrt(2) = 25.41
    lo, hi = agreement.interval(42.0, math.sqrt(8), 2, test_images=2000, accuracy=True)
    assert lo == pytest.approx(42 - 25.412, abs=1e-2) and hi == pytest.approx(42 + 25.412, abs=1e-2)


def test_no_interval_for_one_run_of_a_time_or_an_unknown_test_set():
    assert all(math.isnan(v) for v in agreement.interval(11.0, math.nan, 1, test_images=None, accuracy=True))
    assert all(math.isnan(v) for v in agreement.interval(11.0, math.nan, 1, test_images=2000, accuracy=False))


def test_within_noise_and_beyond_it():
    iv = lambda v: agreement.interval(v, math.nan, 1, 2000, True)  # noqa: E731
    # 72.55 vs 70.50 on 2,000 images: 72.55 lies inside 70.50's interval [68.46, 72.46]? No: 72.55 > 72.46;
    # but 70.50 lies inside 72.55's [70.55, 74.46]? No: 70.50 < 70.55. So 90% is distinguishable; 75% is not.
    values = dict(zip(LABELS, OURS))
    assert agreement.within_noise(values, {k: iv(v) for k, v in values.items()}) == ["60%", "75%", "80%"]
    # 90 against 80: far apart
    assert agreement.within_noise({"a": 90.0, "b": 80.0}, {"a": iv(90.0), "b": iv(80.0)}) == ["a"]
    # no intervals at all: only exact ties are within noise
    assert agreement.within_noise({"a": 2.0, "b": 2.0, "c": 1.0}, {}) == ["a", "b"]
    # lower is better
    assert agreement.within_noise({"a": 2.0, "b": 1.0}, {}, lowest=True) == ["b"]


def test_trend_along_the_axis_by_hand():
    # paper against gamma: pairs 60-75 (-,-) C, 60-80 C, 60-90 C, 75-80 C, 75-90 (-,+) D, 80-90 D -> (4 - 2) / 6
    assert agreement.trend(LABELS, PAPER) == pytest.approx(1 / 3)
    assert agreement.trend_word(1 / 3, LABELS, PAPER) == "rises, peaks at 80%"
    assert agreement.trend_word(-1.0, LABELS, [4, 3, 2, 1]) == "falls"
    assert math.isnan(agreement.trend(["a", "b", "c"], [1, 2, 3]))        # no numeric axis
    assert agreement.axis_value("75%") == 75 and agreement.axis_value("1e-3") == 0.001
    assert agreement.axis_value("K=5") is None


def test_verdict_of_the_mask_ratio_table():
    intervals = [agreement.interval(v, math.nan, 1, 2000, True) for v in OURS]
    a = agreement.agree("IN-1k FT top-1", "linear_top1", "linear top-1", LABELS, PAPER, OURS, intervals, stand_in=True)
    assert a.paper_best == ["80%"] and a.our_best == ["60%"]
    assert a.tied == ["60%", "75%", "80%"]
    # the paper's best (80%) lies within our noise of our best (60%): the disagreement is not shown to be real
    assert a.line() == ("IN-1k FT top-1 vs our linear top-1 (stand-in): paper's best 80%, ours 60%; "
                        "τ = −0.18 over 4 rows; trends disagree (paper rises, peaks at 80%, τ = +0.33; "
                        "ours falls, τ = −0.91); the paper's best is within our noise of our best.")


def test_verdict_all_within_noise_and_a_real_disagreement():
    wide = [(0.0, 100.0)] * 3
    a = agreement.agree("c", "m", "m", ["1", "2", "3"], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], wide)
    assert a.tau == -1.0 and a.noise_clause() == "our differences are within noise"
    narrow = [(v - .1, v + .1) for v in (3.0, 2.0, 1.0)]
    a = agreement.agree("c", "m", "m", ["1", "2", "3"], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], narrow)
    assert a.noise_clause() == "the paper's best is beyond our noise: a real disagreement"
    a = agreement.agree("c", "m", "m", ["1", "2", "3"], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0], narrow)
    assert a.tau == 1.0 and a.noise_clause() == "our best is beyond noise of 2, 3"


def test_a_tie_for_best_is_named_and_rows_without_both_numbers_are_left_out():
    nan = math.nan
    a = agreement.agree("c", "m", "m", ["a", "b", "c", "d"], [85.3, 85.3, 84.0, nan], [1.0, 2.0, 0.5, 9.0],
                        [(nan, nan)] * 4)
    assert a.rows == ["a", "b", "c"] and a.paper_best == ["a", "b"]
    assert "paper's best a = b (tie), ours b" in a.line()
    assert a.noise_clause() == "our noise is unknown (one run, no interval)"
    one = agreement.agree("c", "m", "m", ["a", "b"], [1.0, nan], [1.0, 2.0], [(nan, nan)] * 2)
    assert one.line() == "c vs our m: 1 shared row(s), nothing to rank."
