"""Does our ablation agree with the paper's? Pure functions on numbers (no pandas, no MLflow).

A paper's table and ours are measured on different data at different scales, so their levels cannot be
compared; their *shape* can:

- which row is best on each side (`best_rows`), over the rows both have;
- whether the two rankings agree: Kendall's tau-b over the shared rows (`kendall_tau_b`; ties count as
  neither concordant nor discordant, and tau-b corrects its denominator for them);
- the trend along a numeric axis (mask ratio, depth, epochs): tau-b of each side against the axis value
  (`trend`), so "rises", "falls" or "flat", and where the best row sits;
- whether our differences are real: a 95 % interval per cell (`interval`: a t-interval of the mean over
  seeds when n > 1; for one run of an accuracy, a Wilson score interval from the test-set size), and which
  of our rows cannot be told apart from our best (`within_noise`: the best's value lies inside their
  interval, or theirs inside the best's).

`agree` puts these together for one paper column and one of our metrics; `Agreement.line` is the one-line
verdict the reports print ("paper's best 80%, ours 60%; τ = −0.33; our differences are within noise").
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

Z95 = 1.959963984540054   # the standard normal's 97.5 % quantile: two-sided 95 %
MINUS = "−"               # U+2212: a printed minus sign, as the tables print them


@functools.lru_cache(maxsize=None)  # a site asks for a few df thousands of times
def t_quantile(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom: scipy.special.stdtrit, which
    scipy.stats.t.ppf(0.975, df) calls (importing scipy.special takes ~0.1 s, scipy.stats ~0.5 s)."""
    from scipy.special import stdtrit
    return float(stdtrit(df, 0.975))


def interval(mean: float, std: float, n: int, test_images: float | None = None,
             accuracy: bool = False) -> tuple[float, float]:
    """The 95 % interval of one table cell, in the cell's units (percent for accuracies).

    n > 1 runs (seeds): mean ± t(0.975, n−1) · std / √n. One run of an accuracy metric with a known test-set
    size: the Wilson score interval of a proportion (mean / 100 correct out of `test_images`), which stays
    inside [0, 100] and is not degenerate at 0 or 100 % as the normal approximation is. Otherwise nothing is
    known: (nan, nan)."""
    if n is None or math.isnan(mean):
        return math.nan, math.nan
    n = int(n)
    if n > 1 and not math.isnan(std):
        half = t_quantile(n - 1) * std / math.sqrt(n)
        return mean - half, mean + half
    if n == 1 and accuracy and test_images and test_images > 0:
        lo, hi = wilson(mean / 100, test_images)
        return 100 * lo, 100 * hi
    return math.nan, math.nan


def wilson(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials."""
    p = min(max(p, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences: (concordant − discordant) / √((n0 − n1)(n0 − n2)),
    n0 = all pairs, n1 / n2 = pairs tied in x / in y. NaN when either side is constant (or < 2 values)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b needs sequences of one length, got {len(x)} and {len(y)}")
    concordant = discordant = tied_x = tied_y = pairs = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            pairs += 1
            dx, dy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            tied_x += dx == 0
            tied_y += dy == 0
            if dx and dy:
                concordant += dx == dy
                discordant += dx != dy
    denom = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denom if denom else math.nan


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def best_rows(values: dict[str, float], lowest: bool = False) -> list[str]:
    """The rows holding the best value (all of them when tied), in the given order; NaNs ignored."""
    have = {k: v for k, v in values.items() if not math.isnan(v)}
    if not have:
        return []
    target = min(have.values()) if lowest else max(have.values())
    return [k for k, v in have.items() if v == target]


def within_noise(values: dict[str, float], intervals: dict[str, tuple[float, float]],
                 lowest: bool = False) -> list[str]:
    """Our rows that cannot be told apart from our best (the best themselves included): the best's value
    lies inside the row's 95 % interval, or the row's value inside the best's. A pair where neither has an
    interval is told apart by its values alone (FLOPs, or one run of a time: nothing says how noisy it is)."""
    best = best_rows(values, lowest)
    if not best:
        return []
    b = best[0]
    out = []
    for k, v in values.items():
        if math.isnan(v):
            continue
        if k in best or _inside(values[b], intervals.get(k)) or _inside(v, intervals.get(b)):
            out.append(k)
    return out


def _inside(v: float, iv: tuple[float, float] | None) -> bool:
    return iv is not None and not math.isnan(iv[0]) and iv[0] <= v <= iv[1]


def axis_value(label: str) -> float | None:
    """A row label as a number on the swept axis ("75%" -> 75, "8" -> 8, "1e-3" -> 0.001); None if it is not one."""
    m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*%?\s*", label)
    return float(m.group(1)) if m else None


def trend(labels: Sequence[str], values: Sequence[float]) -> float:
    """tau-b of the values against the rows' numeric axis: +1 = strictly rising along it, −1 = falling. NaN
    unless at least 3 rows are numbers."""
    pts = [(axis_value(lab), v) for lab, v in zip(labels, values)]
    pts = [(a, v) for a, v in pts if a is not None and not math.isnan(v)]
    if len(pts) < 3:
        return math.nan
    return kendall_tau_b([a for a, _ in pts], [v for _, v in pts])


def trend_word(tau: float, labels: Sequence[str], values: Sequence[float], lowest: bool = False) -> str:
    """"rises", "falls" or "is flat" along the axis, with "peaks at X" (or "dips at X" where lower is better)
    when the best row lies strictly inside the axis range and the values are not monotone."""
    if math.isnan(tau):
        return "has no trend (fewer than 3 numeric rows)"
    word = "rises" if tau > 0 else "falls" if tau < 0 else "is flat"
    pts = sorted((axis_value(lab), lab, v) for lab, v in zip(labels, values)
                 if axis_value(lab) is not None and not math.isnan(v))
    best = best_rows({lab: v for _, lab, v in pts}, lowest)
    if abs(tau) < 1 and len(best) == 1 and best[0] not in (pts[0][1], pts[-1][1]):
        word += f", {'dips' if lowest else 'peaks'} at {best[0]}"
    return word


def fmt_tau(tau: float) -> str:
    """τ with a printed minus sign and a plus for positive values; "n/a" when undefined."""
    if math.isnan(tau):
        return "n/a"
    return (MINUS if tau < 0 else "+" if tau > 0 else "") + f"{abs(tau):.2f}"


@dataclass
class Agreement:
    """One paper column against one of our metrics, over the rows both have."""
    column: str                   # the paper's column
    metric: str                   # our MLflow key
    heading: str                  # our column's heading
    stand_in: bool                # ours is not the paper's protocol (its counterpart has no runs yet)
    rows: list[str]               # shared rows, table order
    paper_best: list[str]
    our_best: list[str]
    tau: float                    # ranking agreement over `rows`
    paper_trend: float            # tau-b against the axis (NaN: no numeric axis)
    our_trend: float
    paper_trend_word: str = ""
    our_trend_word: str = ""
    tied: list[str] = field(default_factory=list)   # our rows within noise of our best (best included)
    noise_known: bool = True      # at least one of our cells has an interval

    @property
    def all_within_noise(self) -> bool:
        return self.noise_known and len(self.rows) > 1 and set(self.rows) <= set(self.tied)

    @property
    def best_agrees(self) -> bool:
        return bool(set(self.paper_best) & set(self.our_best))

    @property
    def paper_best_within_noise(self) -> bool:
        """The paper's best row cannot be told apart from our best: the disagreement is inside our noise."""
        return bool(set(self.paper_best) & set(self.tied))

    def noise_clause(self) -> str:
        if len(self.rows) < 2:
            return "nothing to rank"
        if not self.noise_known:
            return "our noise is unknown (one run, no interval)"
        if self.all_within_noise:
            return "our differences are within noise"
        if self.best_agrees:
            return "our best is beyond noise of " + ", ".join(r for r in self.rows if r not in self.tied)
        if self.paper_best_within_noise:
            return "the paper's best is within our noise of our best"
        return "the paper's best is beyond our noise: a real disagreement"

    def line(self) -> str:
        """The one-line verdict."""
        ours = f"our {self.heading}" + (" (stand-in)" if self.stand_in else "")
        if len(self.rows) < 2:
            return f"{self.column} vs {ours}: {len(self.rows)} shared row(s), nothing to rank."
        parts = [f"paper's best {_names(self.paper_best)}, ours {_names(self.our_best)}",
                 f"τ = {fmt_tau(self.tau)} over {len(self.rows)} rows"]
        if not math.isnan(self.paper_trend) and not math.isnan(self.our_trend):
            agree = "agree" if _sign(self.paper_trend) == _sign(self.our_trend) else "disagree"
            parts.append(f"trends {agree} (paper {self.paper_trend_word}, τ = {fmt_tau(self.paper_trend)}; "
                         f"ours {self.our_trend_word}, τ = {fmt_tau(self.our_trend)})")
        parts.append(self.noise_clause())
        return f"{self.column} vs {ours}: " + "; ".join(parts) + "."


def _names(rows: Sequence[str]) -> str:
    return " = ".join(rows) + (" (tie)" if len(rows) > 1 else "") if rows else "none"


def agree(column: str, metric: str, heading: str, labels: Sequence[str], paper: Sequence[float],
          ours: Sequence[float], intervals: Sequence[tuple[float, float]], lowest: bool = False,
          stand_in: bool = False) -> Agreement:
    """The agreement of one paper column with one of our metrics. `labels`, `paper`, `ours`, `intervals`:
    the table's rows in order (NaN where a side has no number; our values as displayed); only rows with
    both numbers are compared."""
    shared = [i for i in range(len(labels)) if not math.isnan(paper[i]) and not math.isnan(ours[i])]
    rows = [labels[i] for i in shared]
    p = {labels[i]: paper[i] for i in shared}
    o = {labels[i]: ours[i] for i in shared}
    iv = {labels[i]: intervals[i] for i in shared}
    # both sides rank in the same direction (a paper column and our metric are both higher- or both
    # lower-is-better), so tau of the raw values is the agreement of the rankings
    tau = kendall_tau_b([p[r] for r in rows], [o[r] for r in rows]) if len(rows) >= 2 else math.nan
    pt, ot = trend(rows, [p[r] for r in rows]), trend(rows, [o[r] for r in rows])
    return Agreement(
        column=column, metric=metric, heading=heading, stand_in=stand_in, rows=rows,
        paper_best=best_rows(p, lowest), our_best=best_rows(o, lowest), tau=tau, paper_trend=pt, our_trend=ot,
        paper_trend_word=trend_word(pt, rows, [p[r] for r in rows], lowest),
        our_trend_word=trend_word(ot, rows, [o[r] for r in rows], lowest),
        tied=within_noise(o, iv, lowest), noise_known=any(not math.isnan(v[0]) for v in iv.values()))
