"""A sweep's results in its paper's layout: pure functions on pandas frames and the sweep spec (no MLflow).

    finished runs (one row per run) --aggregate--> one row per label --build--> Report
    Report --> to_markdown / to_latex / to_html / to_csv; the figure: reports/figures.py

Rows are the swept values (grid order), then the paper's reference rows that our grid lacks (e.g. the
paper's 300/1600 epochs next to our 1..8), with empty "ours" cells. Our columns are, by default, the
frozen-feature top-1 accuracies and their random-init floors (mean ± std over seeds, and n); a spec may
name other MLflow metrics (`report.metrics: {key: heading}`, e.g. time per epoch or FLOPs), say whether
higher or lower is better (`report.best: highest | lowest`), and add each metric relative to one of its
rows (`report.relative_to: {label: ROW, as: ratio | percent}`). The paper's columns come from the spec's
`report.reference` (null = the paper printed no number there). Every format marks the best value of each
metric column and the paper's default row, so they all say the same thing.

Paper columns and ours meet only where they measure the same thing: `report.compare: {paper column: MLflow
key}` (e.g. `IN-1k FT top-1: finetune_top1`) puts our mean beside the paper's number. Their difference (Δ =
ours − paper) is shown only where both are the same protocol on the same data (`{paper column: {metric: KEY,
same_data: true}}`, e.g. FLOPs of the same model); across datasets a level difference answers nothing, so
the report answers the question that matters instead (reports/agreement.py): which row is best on each side,
Kendall's τ between the two rankings, the trends along a numeric axis, and whether our differences are
outside the noise. A compared metric no run has yet stands in with our own main metrics (marked as
stand-ins) and a note says which protocol fills it. Protocol metrics the runs have (`finetune_top1`,
`seg_miou`, the linear views `linear_top1/l<block>/<pool>`, and their `floor_` twins) join the default
columns; they are absent when no run has them. Each row also shows the device-hours its runs cost when the
runs carry a `device_h` (and `pretrained_by` / `pretrain_device_h`: a reused pre-training is counted once).

Noise: every cell of ours has a 95 % interval (`<metric>_lo` / `_hi`): a t-interval of the mean over seeds
when n > 1, else for one run of an accuracy a Wilson score interval from the test-set size (`test_images`).
The best value of a column is bold only when it lies outside every other row's interval and theirs outside
its own; otherwise the best and the rows within its noise are marked † (a statistical tie). Every format
warns when a trained value is at or below its random-init floor, and marks a smoke-preset report as no result.
"""
from __future__ import annotations

import base64
import html
import itertools
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from pandas.io.formats.style import Styler

from reports import agreement

# Our metrics, in column order: MLflow key -> heading.
METRICS: dict[str, str] = {
    "knn_top1": "k-NN top-1",
    "linear_top1": "linear top-1",
    "floor_knn_top1": "k-NN floor",
    "floor_linear_top1": "linear floor",
}
# Protocol metrics shown when runs have them (the linear views `linear_top1/l<block>/<pool>` are found by name).
PROTOCOL_METRICS: dict[str, str] = {"finetune_top1": "fine-tune top-1", "seg_miou": "seg. mIoU"}
LINEAR_VIEW = "linear_top1/"
FLOOR = "floor_"
PAPER = "paper: "        # prefix of the reference columns, so nobody mistakes them for ours
MISSING = "–"            # a grid point with no finished run
DEFAULT_MARK = " (default)"
DELTA = "Δ "             # prefix of the ours - paper columns of `report.compare` (same protocol, same data only)
COST = "device_h"         # the row's device-hours (sum, not mean)
TEST_IMAGES = "test_images"  # a run's test-set size: the binomial interval of one run's accuracy
DECIMALS = 2             # our accuracies are percentages of a few hundred test images: 2 decimals is plenty
TIE = "†"                # a cell within the noise of its column's best (the best itself included)
SMOKE = "smoke preset: not a result"


@dataclass
class Report:
    """Everything the renderers need; `frame` holds plain numbers only (NaN where there is none)."""
    name: str                 # the sweep (file names, LaTeX label)
    title: str
    row_title: str            # heading of the label column, e.g. "mask ratio γ"
    frame: pd.DataFrame       # index: row label; columns: <metric>_mean, <metric>_std, n, "paper: <col>"
    grid_labels: list[str]    # the rows that are ours; the others are the paper's only
    default: str | None = None
    default_note: str = "the paper's default setting"  # what the (default) row is
    source: str = ""          # where the paper's numbers come from
    caption: str = ""         # what "ours" is: model, data, epochs, teacher
    missing: int = 0          # grid points (label x seed) without a finished run
    expected: int = 0         # grid points in all
    run_command: str = ""     # how to run the missing points
    metrics: dict[str, str] = field(default_factory=lambda: dict(METRICS))  # our columns: key -> heading
    best_is: str = "highest"  # or "lowest" (times, FLOPs)
    relative_to: str | None = None   # a row label: each metric is also shown relative to that row
    relative_as: str = "ratio"       # ratio (x) | percent (change in %)
    compare: dict[str, str] = field(default_factory=dict)  # paper column (no prefix) -> our metric, both shown
    pending: dict[str, str] = field(default_factory=dict)  # compared, but no run has the metric yet
    same_data: list[str] = field(default_factory=list)     # compared columns with a Δ: same protocol, same data
    cost_basis: str = ""             # what a device-hour is here (GPUs per task or CPU jobs)
    smoke: bool = False              # made with preset=smoke: a rehearsal, no result
    agreements: list = field(default_factory=list)  # reports.agreement.Agreement per (paper column, our metric)
    warnings: list[str] = field(default_factory=list)  # trained values at or below their floor

    @property
    def verdict(self) -> str:
        """The one-line answer to "does our ablation agree with the paper's?"."""
        if self.agreements:
            return self.agreements[0].line()
        if self.paper_columns:
            return "no paper column has a counterpart among our metrics (report.compare): nothing to compare."
        return "no paper numbers to compare with."

    @property
    def paper_columns(self) -> list[str]:
        return [c for c in self.frame.columns if c.startswith(PAPER)]

    @property
    def shown_metrics(self) -> list[str]:
        return [m for m in self.metrics if f"{m}_mean" in self.frame]

    @property
    def own_metrics(self) -> list[str]:
        """Our columns outside the side-by-side comparisons."""
        return [m for m in self.shown_metrics if m not in self.compare.values()]

    @property
    def paper_only(self) -> list[str]:
        return [c for c in self.paper_columns if c.removeprefix(PAPER) not in self.compare]

    @property
    def has_cost(self) -> bool:
        return COST in self.frame

    @property
    def relative_columns(self) -> list[str]:
        return [f"{m}_rel" for m in self.shown_metrics if f"{m}_rel" in self.frame]

    @property
    def deltas(self) -> list[str]:
        return [DELTA + col for col in self.same_data if DELTA + col in self.frame]

    def heading(self, col: str) -> str:
        """The heading of one of our columns (`<metric>_mean` or `<metric>_rel`)."""
        m, kind = col.rsplit("_", 1)
        if kind == "mean":
            return self.metrics[m]
        return f"{self.metrics[m]} {'÷' if self.relative_as == 'ratio' else 'vs'} {self.relative_to}" + (
            "" if self.relative_as == "ratio" else " (%)")


def heading_of(key: str) -> str:
    """A heading for a protocol metric: `linear_top1/l7/cls` -> "linear top-1 (block 7, cls)"."""
    floor = key.startswith(FLOOR)
    base = key.removeprefix(FLOOR)
    if base.startswith(LINEAR_VIEW):
        layer, _, pool = base.removeprefix(LINEAR_VIEW).partition("/")
        where = f"block {layer.removeprefix('l')}" + (f", {pool}" if pool else "")
        return f"linear {'floor' if floor else 'top-1'} ({where})"
    if base in PROTOCOL_METRICS or base in METRICS:
        name = {**METRICS, **PROTOCOL_METRICS}[base]
        return name.replace("top-1", "floor").replace("mIoU", "floor") if floor else name
    return key


def metrics_of(spec: dict, available=()) -> dict[str, str]:
    """Our columns, MLflow key -> heading: the spec's `report.metrics`, or the default accuracy columns plus the
    protocol metrics that `available` (the keys some run has a value for) holds, each main metric followed
    later by its floor; a metric named by `report.compare` is always a column."""
    rep = spec.get("report") or {}
    if rep.get("metrics"):
        out = dict(rep["metrics"])
    else:
        have = set(available)
        views = sorted(k for k in have if k.startswith(LINEAR_VIEW))
        mains = ["knn_top1", "linear_top1", *views, *[k for k in PROTOCOL_METRICS if k in have]]
        floors = [FLOOR + m for m in mains if m in METRICS or FLOOR + m in have]
        out = {m: METRICS.get(m) or heading_of(m) for m in mains + floors}
    for key, _ in check_compare(spec).values():
        out.setdefault(key, heading_of(key))
    return out


def redundant_view(frame: pd.DataFrame, metrics: dict[str, str], compare: dict[str, str]) -> list[str]:
    """The one linear view (and its floor) when it only repeats `linear_top1`: every run probed just the
    default layer and pool. Two or more views, or one a paper column is compared with, stay columns."""
    views = [m for m in metrics if m.startswith(LINEAR_VIEW)]
    if len(views) != 1 or views[0] in compare.values():
        return []
    def same(m: str, main: str) -> bool:
        return f"{m}_mean" in frame and f"{main}_mean" in frame and frame[f"{m}_mean"].equals(frame[f"{main}_mean"])

    view = views[0]
    if not same(view, "linear_top1"):
        return []
    return [view, *([FLOOR + view] if same(FLOOR + view, FLOOR + "linear_top1") else [])]


def how_to_get(metric: str) -> str:
    """What a launch needs for runs to log `metric` (the pending-comparison note)."""
    if metric.startswith(LINEAR_VIEW):
        layer, _, pool = metric.removeprefix(LINEAR_VIEW).partition("/")
        n = layer.removeprefix("l")
        return (f"evaluate.linear.layers=[{int(n) - 1 if n.isdigit() else n}] evaluate.linear.pools=[{pool or 'mean'}]"
                f", on a model with at least {n} blocks")
    protocol = {"finetune_top1": "finetune", "seg_miou": "seg_linear", "knn_top1": "knn"}.get(metric, "linear")
    return f"add {protocol} to evaluate.protocols"


def check_compare(spec: dict) -> dict[str, tuple[str, bool]]:
    """`report.compare` as {paper column: (metric, same_data)}. Each entry is `column: KEY` (our metric measures
    what the paper's column measures, on other data) or `column: {metric: KEY, same_data: true|false}` (true:
    the same protocol on the same data, so Δ = ours − paper means something). ValueError naming the key for
    a column the paper lacks or a malformed entry."""
    rep = spec.get("report") or {}
    compare = rep.get("compare") or {}
    if not isinstance(compare, dict):
        raise ValueError(f"report.compare={compare!r} must map paper columns to MLflow metric keys, "
                         "e.g. {IN-1k FT top-1: finetune_top1}")
    columns = [str(c) for c in (rep.get("reference") or {}).get("columns") or []]
    out = {}
    for col, entry in compare.items():
        if str(col) not in columns:
            raise ValueError(f"report.compare[{str(col)!r}] is not a column of report.reference.columns "
                             f"({', '.join(columns) or 'none'})")
        key, same = entry, False
        if isinstance(entry, dict):
            unknown = set(entry) - {"metric", "same_data"}
            key, same = entry.get("metric"), entry.get("same_data", False)
            if unknown or not isinstance(same, bool):
                raise ValueError(f"report.compare[{str(col)!r}]={entry!r}: give {{metric: KEY, same_data: true|false}}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"report.compare[{str(col)!r}]={key!r} must be an MLflow metric key, e.g. finetune_top1")
        out[str(col)] = (key, same)
    return out


def is_accuracy(metric: str) -> bool:
    """A top-1 accuracy in percent (k-NN, linear and its views, fine-tuning, and their floors): one run of it
    has a binomial interval from the test-set size. Others (mIoU, times, FLOPs) get seed intervals only."""
    base = metric.removeprefix(FLOOR)
    return base.endswith("_top1") or base.startswith(LINEAR_VIEW)


def aggregate(runs: pd.DataFrame, labels: Sequence[str], metrics: Sequence[str] = tuple(METRICS)) -> pd.DataFrame:
    """One row per label, in `labels` order: `<metric>_mean`, `<metric>_std` (sample std, NaN below 2
    runs), the 95 % interval `<metric>_lo` / `<metric>_hi` (reports/agreement.py interval; NaN where nothing
    says how noisy a cell is) and `n` (finished runs of the label, 0 where none). `runs` has a `label`
    column and one column per metric, and may have `test_images` (a run's test-set size) and `device_h`;
    labels outside `labels` are ignored, metrics a run did not log are NaN and skipped."""
    every = runs[runs["label"].isin(labels)] if "label" in runs else runs
    runs = runs.reindex(columns=["label", *metrics, TEST_IMAGES])
    runs = runs[runs["label"].isin(labels)]
    index = pd.Index(list(labels), name="label")
    # one groupby over every metric at once (a site builds hundreds of these tables)
    values = runs[[*metrics, TEST_IMAGES]].apply(pd.to_numeric, errors="coerce").astype(float)
    grouped = values.groupby(runs["label"], sort=False)
    means, stds = grouped.mean().reindex(index), grouped.std(ddof=1).reindex(index)  # std: NaN for one seed
    counts = grouped.count().reindex(index).fillna(0)
    # the smallest test set of a row's runs: its interval is not narrower than its noisiest run's
    tests = grouped[TEST_IMAGES].min().reindex(index)
    columns = {}
    for m in metrics:
        columns[f"{m}_mean"], columns[f"{m}_std"] = means[m], stds[m]
        bounds = [agreement.interval(mean, std, int(k), test, is_accuracy(m))
                  for mean, std, k, test in zip(means[m], stds[m], counts[m], tests)]
        columns[f"{m}_lo"] = pd.Series([lo for lo, _ in bounds], index=index, dtype=float)
        columns[f"{m}_hi"] = pd.Series([hi for _, hi in bounds], index=index, dtype=float)
    columns["n"] = runs.groupby("label", sort=False).size().reindex(index).fillna(0).astype(int)
    if tests.notna().any():
        columns[TEST_IMAGES] = tests
    if COST in every:
        by_label = dict(list(every.groupby("label", sort=False)))
        columns[COST] = pd.Series([device_hours(by_label.get(label, every.iloc[:0])) for label in index],
                                  index=index, dtype=float)
    return pd.DataFrame(columns, index=index)


def device_hours(runs: pd.DataFrame) -> float:
    """What one row's runs cost: each run's own `device_h`, plus once per distinct pre-training it reused
    (`pretrained_by` -> `pretrain_device_h`) unless that run is itself among them. NaN if any part is
    unknown (an old run without a wall time, a deleted trainer) or the row has no run."""
    if runs.empty:
        return math.nan
    total = pd.to_numeric(runs[COST], errors="coerce").sum(min_count=len(runs))
    if "pretrained_by" in runs:
        ids = set(runs["run_id"].dropna()) if "run_id" in runs else set()
        reused = runs[runs["pretrained_by"].notna() & ~runs["pretrained_by"].isin(ids)]
        reused = reused.drop_duplicates("pretrained_by")
        if len(reused):
            total += pd.to_numeric(reused["pretrain_device_h"], errors="coerce").sum(min_count=len(reused))
    return float(total)


def reference_frame(reference: dict | None) -> pd.DataFrame:
    """The spec's `report.reference` as a frame: index = the paper's row labels, columns "paper: <col>"."""
    reference = reference or {}
    columns = [PAPER + str(c) for c in reference.get("columns") or []]
    rows = reference.get("rows") or {}
    for label, values in rows.items():
        if len(values) != len(columns):  # a typo in the spec must not shift numbers into the wrong column
            raise ValueError(f"report.reference.rows[{label!r}] has {len(values)} values for "
                             f"{len(columns)} reference.columns")
    return pd.DataFrame([[math.nan if v is None else float(v) for v in vals] for vals in rows.values()],
                        index=pd.Index([str(k) for k in rows], name="label"), columns=columns, dtype=float)


def build(agg: pd.DataFrame, spec: dict, *, caption: str = "", missing: int = 0, expected: int = 0,
          run_command: str = "", cost_basis: str = "", smoke: bool = False) -> Report:
    """agg: `aggregate`'s frame (grid order); spec: the sweep spec (name, title, report); smoke: the runs are
    a preset=smoke rehearsal (every output says it is no result)."""
    rep = spec.get("report") or {}
    paper = reference_frame(rep.get("reference"))
    grid = [str(x) for x in agg.index]
    extra = [x for x in paper.index if x not in grid]  # the paper's rows we have no point for go last
    frame = agg.set_axis(grid).reindex(grid + extra).join(paper)
    frame.index.name = "label"
    default = rep.get("default")
    entries = check_compare(spec)
    metrics = metrics_of(spec, [c.removesuffix("_mean") for c in agg.columns
                                if c.endswith("_mean") and agg[c].notna().any()])
    # a compared metric no run has: the paper column stays the paper's alone until a run has it
    has = lambda m: f"{m}_mean" in frame and frame[f"{m}_mean"].notna().any()  # noqa: E731
    pending = {col: m for col, (m, _) in entries.items() if not has(m)}
    compare = {col: m for col, (m, _) in entries.items() if has(m)}
    same_data = [col for col, (_, same) in entries.items() if same and col in compare]
    for m in set(pending.values()) - set(compare.values()):
        metrics.pop(m, None)
    if not rep.get("metrics"):
        for m in redundant_view(frame, metrics, compare):
            metrics.pop(m, None)
    for col in same_data:  # a difference of levels only where both measure the same thing on the same data
        frame[DELTA + col] = frame[f"{compare[col]}_mean"] - frame[PAPER + col]
    relative = rep.get("relative_to") or {}
    if isinstance(relative, str):  # `relative_to: ROW` = ratios to that row
        relative = {"label": relative}
    ref_row, rel_as = relative.get("label"), relative.get("as", "ratio")
    if ref_row is not None:
        ref_row = str(ref_row)
        if ref_row not in grid:
            raise ValueError(f"report.relative_to.label={ref_row!r} is not a row of the grid ({', '.join(grid)})")
        if rel_as not in ("ratio", "percent"):
            raise ValueError(f"report.relative_to.as={rel_as!r} must be ratio or percent")
        for m in metrics:
            if f"{m}_mean" in frame:
                r = frame[f"{m}_mean"] / frame.at[ref_row, f"{m}_mean"]
                frame[f"{m}_rel"] = r if rel_as == "ratio" else 100 * (r - 1)
    best_is = rep.get("best", "highest")
    if best_is not in ("highest", "lowest"):
        raise ValueError(f"report.best={best_is!r} must be highest or lowest")
    report = Report(name=str(spec.get("name", "sweep")),
                    title=str(rep.get("title") or spec.get("title") or spec.get("name")),
                    row_title=str(rep.get("row_title") or "setting"), frame=frame, grid_labels=grid,
                    default=None if default is None else str(default),
                    default_note=str(rep.get("default_note") or Report.default_note),
                    source=str((rep.get("reference") or {}).get("source") or ""),
                    caption=caption, missing=missing, expected=expected, run_command=run_command,
                    metrics=metrics, best_is=best_is, relative_to=ref_row, relative_as=rel_as,
                    compare=compare, pending=pending, same_data=same_data, cost_basis=cost_basis, smoke=smoke)
    report.agreements = agreements(report)
    report.warnings = floor_warnings(report)
    return report


def main_metrics(report: Report) -> list[str]:
    """Our shown metrics that are results, not floors."""
    return [m for m in report.shown_metrics if not m.startswith(FLOOR)]


def shown_values(report: Report, metric: str) -> pd.Series:
    """Our means of `metric` as the tables display them (rounded), NaN on the paper's own rows."""
    f = report.frame
    values = f[f"{metric}_mean"].round(DECIMALS)
    return values.where(f.index.isin(report.grid_labels))


def interval_of(report: Report, metric: str) -> list[tuple[float, float]]:
    f = report.frame
    return list(zip(f[f"{metric}_lo"], f[f"{metric}_hi"])) if f"{metric}_lo" in f else \
        [(math.nan, math.nan)] * len(f)


def agreements(report: Report) -> list:
    """Per compared paper column: its agreement with our counterpart metric, or, while no run has that, with
    each of our main metrics as a stand-in, the linear probe first (reports/agreement.py agree). The first is
    the report's verdict."""
    out = []
    labels = [str(x) for x in report.frame.index]
    for col in dict.fromkeys([*report.compare, *report.pending]):
        if col in report.compare:
            candidates = [(report.compare[col], False)]
        else:  # the linear probe first: like fine-tuning, it trains on the features (k-NN does not)
            stand_ins = [m for m in main_metrics(report) if m not in report.compare.values()]
            candidates = [(m, True) for m in sorted(stand_ins, key=lambda m: not m.startswith("linear_top1"))]
        for m, stand_in in candidates:
            out.append(agreement.agree(col, m, report.metrics[m], labels,
                                       report.frame[PAPER + col].tolist(), shown_values(report, m).tolist(),
                                       interval_of(report, m), lowest=report.best_is == "lowest",
                                       stand_in=stand_in))
    return out


def floor_warnings(report: Report) -> list[str]:
    """One sentence per metric whose trained value is at or below its random-init floor (as displayed): the
    pre-training taught the encoder nothing that this protocol sees there."""
    out = []
    for m in main_metrics(report):
        if FLOOR + m not in report.shown_metrics:
            continue
        ours, floor = shown_values(report, m), shown_values(report, FLOOR + m)
        low = [f"{label} ({ours[label]:.{DECIMALS}f} ≤ {floor[label]:.{DECIMALS}f})" for label in report.grid_labels
               if not (pd.isna(ours[label]) or pd.isna(floor[label])) and ours[label] <= floor[label]]
        if low:
            out.append(f"{report.metrics[m]} is at or below its random-init floor at " + ", ".join(low) + ".")
    return out


def marks(report: Report) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(bold, tie) masks over the frame. In each of our result columns (floors and relative columns are
    not marked), the best value as displayed (highest, or lowest if the spec says so) is bold when no other
    row is within its noise (reports/agreement.py within_noise, from the cells' 95 % intervals); otherwise the
    best and every row within its noise are marked as a tie. A column with fewer than two distinct values
    marks nothing (marking every row says nothing). The paper's columns bold their best as printed, and
    only when higher is better (its columns may mix accuracies with costs otherwise)."""
    f = report.frame
    bold = {col: set() for col in f.columns}  # column -> its marked row labels; frames made once at the end
    tie = {col: set() for col in f.columns}
    lowest = report.best_is == "lowest"
    for m in main_metrics(report):
        col = f"{m}_mean"
        shown = shown_values(report, m).dropna()
        if shown.nunique() < 2:
            continue
        intervals = dict(zip(f.index, interval_of(report, m)))
        tied = agreement.within_noise(shown.to_dict(), intervals, lowest)
        (bold if len(tied) == 1 else tie)[col].update(tied)
    for col in report.paper_columns if not lowest else []:
        shown = f[col].round(DECIMALS).dropna()
        if shown.nunique() >= 2:
            bold[col].update(shown.index[shown == shown.max()])
    as_frame = lambda marked: pd.DataFrame({col: f.index.isin(list(rows)) for col, rows in marked.items()},  # noqa: E731
                                           index=f.index, columns=f.columns)
    return as_frame(bold), as_frame(tie)


def best(report: Report) -> pd.DataFrame:
    """True where a cell is bold: its column's best, outside the noise of every other row (see `marks`)."""
    return marks(report)[0]


# ---- rendering -------------------------------------------------------------------------------------
# Every cell is formatted here, in its format's markup (decimals, ± std, bold, tie mark, escaping), into a
# frame of strings: index = row labels, columns = headings. pandas lays that frame out: DataFrame.to_markdown
# (tabulate's pipe tables), Styler.to_latex and Styler.to_html. The CSV holds the same values as displayed;
# the figure (reports/figures.py) uses the numbers.

@dataclass
class Style:
    """One format's markup: how it bolds and escapes text, its ± and tie mark, and its mark for a missing cell."""
    bold: Callable[[str], str]
    escape: Callable[[str], str] = lambda s: s
    pm: str = " ± "
    missing: str = MISSING
    tie: str = TIE


def _num(v: float, decimals: int = DECIMALS) -> str:
    return f"{v:.{decimals}f}"


def paper_decimals(values: pd.Series) -> int:
    """The decimals the paper printed a column with (84.8 stays 84.8, 43.0 stays 43.0, not 84.80 / 43)."""
    shortest = [repr(float(v)) for v in values.dropna()]
    return max((len(r.split(".")[1]) for r in shortest if "." in r and "e" not in r), default=0)


def layout(report: Report) -> list[tuple[str, str, str]]:
    """The columns after the label, as (group, kind, key): our own metrics, relative columns, n and
    device-hours ("ours"); then per compared paper column our metric, the paper's number and, for the same
    protocol on the same data only, the delta ("ours vs paper"); then the paper-only columns ("paper")."""
    cols = [("ours", "metric", m) for m in report.own_metrics]
    cols += [("ours", "rel", c) for c in report.relative_columns]
    cols += [("ours", "n", "n")] + ([("ours", "cost", COST)] if report.has_cost else [])
    for c in report.paper_columns:
        col = c.removeprefix(PAPER)
        if col in report.compare:
            cols += [("ours vs paper", "metric", report.compare[col]), ("ours vs paper", "paper", c)]
            if col in report.same_data:
                cols.append(("ours vs paper", "delta", DELTA + col))
    return cols + [("paper", "paper", c) for c in report.paper_only]


def heading_at(report: Report, kind: str, key: str) -> str:
    """The heading of one `layout` column."""
    return {"metric": lambda: report.metrics[key], "rel": lambda: report.heading(key), "n": lambda: "n",
            "cost": lambda: "device-h", "paper": lambda: key,
            "delta": lambda: f"{DELTA}{key.removeprefix(DELTA)} (ours − paper)"}[kind]()


def _hours(v: float) -> str:
    """Device-hours: 3 significant digits (a test-size run costs thousandths, a paper-size one thousands)."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _rel(report: Report, v: float) -> str:
    return f"{v:.2f}×" if report.relative_as == "ratio" else f"{v:+.1f}"


def cells(report: Report, style: Style, grouped: bool = False) -> pd.DataFrame:
    """The table as text in `style`'s markup: index = the row labels (the default one marked), columns = the
    `layout` headings, named by the row title. `grouped`: when the columns fall into more than one group,
    two column levels (group, heading); a paper column's heading then drops the "paper: " its group says."""
    f = report.frame
    is_best, is_tie = marks(report)
    decimals = {col: paper_decimals(f[col]) for col in report.paper_columns}
    cols = layout(report)
    # {column: {label: value}}: a dict lookup per cell instead of DataFrame.at (a site renders 200 tables)
    value, is_best, is_tie = f.to_dict(), is_best.to_dict(), is_tie.to_dict()
    rows = []
    for label in f.index:
        ours = label in report.grid_labels
        row = []
        for _, kind, key in cols:
            if kind == "paper":
                v = value[key][label]
                text = "" if pd.isna(v) else _num(v, decimals[key])
                row.append(style.bold(text) if text and is_best[key][label] else text)
            elif not ours:
                row.append("")                      # a paper-only row: we have no such point
            elif kind == "n":
                row.append(str(int(value["n"][label])))
            elif kind == "metric":
                mean, std = value[f"{key}_mean"][label], value[f"{key}_std"][label]
                if pd.isna(mean):
                    text = style.missing            # our point, not (yet) finished
                else:
                    text = _num(mean) + ("" if pd.isna(std) else style.pm + _num(std))
                    text = style.bold(text) if is_best[f"{key}_mean"][label] else text
                    text += style.tie if is_tie[f"{key}_mean"][label] else ""
                row.append(text)
            else:
                v = value[key][label]
                if pd.isna(v):
                    row.append("" if kind == "delta" else style.missing)  # no paper number: no delta
                elif kind == "rel":
                    row.append(_rel(report, v))
                elif kind == "delta":
                    row.append(f"{v:+.{DECIMALS}f}")
                else:
                    row.append(_hours(v))
        rows.append(row)
    index = [style.escape(label + (DEFAULT_MARK if label == report.default else "")) for label in f.index]
    headings = [heading_at(report, kind, key) for _, kind, key in cols]
    title = style.escape(report.row_title)
    if grouped and len({group for group, _, _ in cols}) > 1:
        columns = pd.MultiIndex.from_tuples(
            [(group, style.escape(h.removeprefix(PAPER) if group == "paper" else h))
             for (group, _, _), h in zip(cols, headings)], names=[None, title])
    else:
        columns = pd.Index([style.escape(h) for h in headings], name=title)
    return pd.DataFrame(rows, index=index, columns=columns)


def test_sizes(report: Report) -> str:
    """The rows' test-set sizes, for the interval note ("2,000" or "256-2,000")."""
    if TEST_IMAGES not in report.frame:
        return ""
    sizes = sorted({int(v) for v in report.frame[TEST_IMAGES].dropna()})
    return "-".join(f"{v:,}" for v in ([sizes[0], sizes[-1]] if len(sizes) > 1 else sizes))


def notes(report: Report, escape: Callable[[str], str] = lambda s: s,
          code: Callable[[str], str] = lambda s: s) -> list[str]:
    """Footnotes shared by every format; `escape` is the format's text escaping, `code` sets a command."""
    floor = "; floor: the same encoder at random init" if any(m.startswith("floor_") for m in report.shown_metrics) else ""
    tests = test_sizes(report)
    out = [f"Ours: mean ± std over seeds (n runs){floor}. Bold: the column's best, outside the 95 % interval of "
           f"every other row; {TIE}: the best and the rows within its noise (no row of them is distinguishable "
           "from the best). 95 % intervals: over seeds, a t-interval of the mean; for one run of an accuracy, "
           "a Wilson score interval on its test images" + (f" ({tests})" if tests else "")
           + "; other single runs have none."]
    if report.compare:
        same = [col for col in report.compare if col in report.same_data]
        out.append("Ours vs paper: only where both measure the same thing ("
                   + "; ".join(f"{col} ← {m}" for col, m in report.compare.items()) + ")"
                   + (f"; Δ = ours − paper where both are the same protocol on the same data ({'; '.join(same)})"
                      if same else "; no Δ: the paper measured on other data at another scale")
                   + ". Compare the agreement (rankings, trends), not levels.")
    for col, m in report.pending.items():
        out.append(f"The paper's {col} is compared with our {m} once runs have it ({how_to_get(m)}).")
    if report.has_cost:
        out.append("device-h: device-hours of the row's runs, summed over seeds: each run's wall time (a reused "
                   "pre-training counted once; a run that only evaluates another's pre-training costs its own "
                   "evaluation) × devices per task" + (f" ({report.cost_basis})" if report.cost_basis else "") + ".")
    if report.default is not None:
        out.append(f"(default): {report.default_note} ({report.default}).")
    if report.missing:
        empty = (report.frame.loc[report.grid_labels, "n"] == 0).sum()
        out.append((f"{MISSING}: no finished run. " if empty else "")
                   + f"{report.missing} of {report.expected} grid points (row × seed) have no finished run yet; "
                   f"run them with:")
        return [escape(n) for n in out[:-1]] + [escape(out[-1]) + " " + code(escape(report.run_command))]
    return [escape(n) for n in out]


def alerts(report: Report) -> list[str]:
    """What must not be missed, first in every format: the smoke mark and trained values at their floor."""
    out = [f"{SMOKE.upper()}: made with preset=smoke (a few steps on a few images) to rehearse the sweep; "
           "its numbers say nothing about the method."] if report.smoke else []
    return out + [f"warning: {w}" for w in report.warnings]


def agreement_lines(report: Report) -> list[str]:
    """The verdict, then the other (paper column, our metric) pairs."""
    head = "Agreement with the paper (over the rows both have; τ: Kendall's τ-b of the two rankings; trends: " \
           "τ-b against the row values; noise: the cells' 95 % intervals)"
    return [head] + [a.line() for a in report.agreements] if report.agreements else []


def title_of(report: Report) -> str:
    return report.title + (f" [{SMOKE}]" if report.smoke else "")


def to_markdown(report: Report) -> str:
    """GitHub markdown: the title, alerts, what ours and the paper's are, the verdict, the table (a tabulate
    pipe table), the agreement, the notes."""
    body = cells(report, Style(bold=lambda s: f"**{s}**", escape=lambda s: s.replace("|", "\\|")))
    table = body.to_markdown(headers=[body.columns.name, *body.columns], disable_numparse=True,  # our text as is
                             colalign=["left"] + ["right"] * body.shape[1])                   # labels left, numbers right
    # tabulate writes the alignment row as "|:----|---:|"; spaced like the others ("| :-- | --: |"), every
    # line of the table starts with "| ", which is how readers of our markdown (and the tests) find it
    head, align, *rows = table.split("\n")
    align = "|" + "|".join(f" {seg.replace('--', '', 1)} " for seg in align.split("|")[1:-1]) + "|"
    table = "\n".join([head, align, *rows])
    lines = [f"### {title_of(report)}", ""]
    lines += [f"> **{a}**  " for a in alerts(report)] + ([""] if alerts(report) else [])
    if report.caption:
        lines.append(f"Ours: {report.caption}  ")
    if report.source:
        lines.append(f"Paper: {report.source}  ")
    lines.append(f"Verdict: {report.verdict}")
    lines += ["", table, ""]
    agree = agreement_lines(report)
    if agree:
        lines += [f"**{agree[0]}**", ""] + [f"- {a}" for a in agree[1:]] + [""]
    lines += [f"{n}  " for n in notes(report, code=lambda c: f"`{c}`")]  # trailing "  ": a line break
    return "\n".join(lines).rstrip() + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  # in text mode, the default (OT1) font encoding prints < > | as ¡ ¿ —
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "−": "$-$", "←": r"$\leftarrow$", "–": "--", "γ": r"$\gamma$",
                  "×": r"$\times$", "τ": r"$\tau$", "≤": r"$\leq$", "†": r"$^\dagger$", "÷": r"$\div$"}


def latex_escape(s: str) -> str:
    """Escape LaTeX specials; Greek letters become math (plain pdflatex cannot typeset Unicode Greek)."""
    out = []
    for ch in s:
        if ch in _LATEX_SPECIAL:
            out.append(_LATEX_SPECIAL[ch])
            continue
        name = unicodedata.name(ch, "")
        if name.startswith("GREEK SMALL LETTER "):
            out.append(f"$\\{name.rsplit(' ', 1)[-1].lower()}$")
        else:
            out.append(ch)
    return "".join(out)


def to_latex(report: Report) -> str:
    """A `table` float with a booktabs tabular (needs only \\usepackage{booktabs}), from Styler.to_latex; the
    group headings (ours / ours vs paper / paper) are centred over their columns and ruled below. Alerts and
    the verdict lead the caption; the agreement and notes follow the table."""
    body = cells(report, Style(bold=lambda s: f"\\textbf{{{s}}}", escape=latex_escape, pm=r" $\pm$ ", missing="--",
                               tie=r"$^\dagger$"), grouped=True)
    if isinstance(body.columns, pd.MultiIndex):
        spans = [(group, len(list(run))) for group, run in itertools.groupby(body.columns.get_level_values(0))]
        # Styler writes \multicolumn only for 2+ columns: a one-column group's heading is centred the same way
        body = body.rename(columns={g: f"\\multicolumn{{1}}{{c}}{{{g}}}" for g, n in spans if n == 1}, level=0)
        first = list(itertools.accumulate([2] + [n for _, n in spans]))  # column 1 holds the row labels
        rules = " ".join(f"\\cmidrule(lr){{{i}-{i + n - 1}}}" for i, (_, n) in zip(first, spans))
        # booktabs wants the rules at the start of the next row, the headings, whose first cell is the row title
        body.columns = body.columns.set_names(f"{rules}\n{body.columns.names[1]}", level=1)
    caption = latex_escape(" ".join(alerts(report)) + (" " if alerts(report) else "") + title_of(report) + ". "
                           + (f"Ours: {report.caption} " if report.caption else "")
                           + (f"Paper: {report.source}. " if report.source else "") + f"Verdict: {report.verdict}")
    latex = Styler(body).to_latex(column_format="l" + "r" * body.shape[1], hrules=True, multicol_align="c",
                                  position="t", position_float="centering", caption=caption.rstrip(),
                                  label=f"tab:{report.name}")
    agree = agreement_lines(report)
    # the verdict (the first pair) is in the caption; the other pairs follow the table
    foot = [latex_escape(a + ":" if i == 0 else a) for i, a in enumerate(agree) if i != 1] if len(agree) > 2 else []
    foot += notes(report, latex_escape, lambda c: f"\\texttt{{{c}}}")
    latex = latex.replace("\\end{table}", "\\par\\smallskip{\\footnotesize " + " ".join(foot) + "}\n\\end{table}")
    return "% generated by reports/build.py; needs \\usepackage{booktabs}\n" + latex


def csv_frame(report: Report) -> pd.DataFrame:
    """The table's values as displayed (rounded the same way, one column per value, none twice), with MLflow
    keys as headings: `<metric>` (mean), `<metric>_std`, `<metric>_ci95_lo/hi`, `<metric>_rel`, n, device_h,
    "paper: <col>" (as printed), "Δ <col>" (same data only); `ours`, `default`, and `warning` (the smoke mark
    and floor warnings of the row)."""
    f = report.frame
    out = {}  # column -> values; one DataFrame at the end (inserting columns one by one is slow)
    out["ours"] = [label in report.grid_labels for label in f.index]
    out["default"] = [label == report.default for label in f.index]
    text = lambda series, fmt: [("" if pd.isna(v) else fmt(v)) for v in series]  # noqa: E731
    for _, kind, key in layout(report):
        if kind == "metric":
            for suffix, name in (("mean", key), ("std", f"{key}_std"), ("lo", f"{key}_ci95_lo"),
                                 ("hi", f"{key}_ci95_hi")):
                out[name] = text(f[f"{key}_{suffix}"], _num) if f"{key}_{suffix}" in f else ""
        elif kind == "rel":
            out[key] = text(f[key], lambda v: f"{v:.2f}" if report.relative_as == "ratio" else f"{v:.1f}")
        elif kind == "n":
            out["n"] = [str(int(v)) if label in report.grid_labels else "" for label, v in zip(f.index, f["n"])]
        elif kind == "cost":
            out[COST] = text(f[COST], lambda v: f"{v:.3g}")
        elif kind == "paper":
            d = paper_decimals(f[key])
            out[key] = text(f[key], lambda v, d=d: _num(v, d))
        elif kind == "delta":
            out[key] = text(f[key], lambda v: f"{v:.{DECIMALS}f}")
    warn = {label: [SMOKE] if report.smoke and label in report.grid_labels else [] for label in f.index}
    for m in main_metrics(report):
        if FLOOR + m in report.shown_metrics:
            ours, floor = shown_values(report, m), shown_values(report, FLOOR + m)
            for label in report.grid_labels:
                if not (pd.isna(ours[label]) or pd.isna(floor[label])) and ours[label] <= floor[label]:
                    warn[label].append(f"{m} at or below its floor")
    out["warning"] = ["; ".join(warn[label]) for label in f.index]
    return pd.DataFrame({k: v if isinstance(v, list) else [v] * len(f) for k, v in out.items()}, index=f.index)


def to_csv(report: Report) -> str:
    """`csv_frame` as CSV."""
    return csv_frame(report).to_csv(index=True, lineterminator="\n")


HTML_CSS = """body { font-family: system-ui, sans-serif; margin: 2em; max-width: 80em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: .3em .8em; text-align: right; border-bottom: 1px solid #ddd; }
thead th { border-bottom: 2px solid #333; }
thead tr:not(:last-child) th { text-align: center; }
td:first-child, th:first-child { text-align: left; }
.note { font-size: .9em; color: #555; margin: .2em 0; }
.alert { background: #fde8e8; border-left: 4px solid #c0392b; padding: .4em .8em; margin: .4em 0; font-weight: bold; }
.verdict { background: #eef4fb; border-left: 4px solid #2c6db3; padding: .4em .8em; margin: .6em 0; }
.agreement li { margin: .2em 0; }
img { max-width: 100%; margin-top: 1em; }
"""


def html_parts(report: Report) -> dict[str, str]:
    """The pieces of a report page, as HTML fragments: css (the table's own styles), alerts, meta, verdict,
    table, agreement, notes. `to_html` and the site (reports/site.py) put them together."""
    esc = html.escape
    body = cells(report, Style(bold=lambda s: f"<b>{s}</b>", escape=esc), grouped=True)
    styler = Styler(body, uuid="report", cell_ids=False)  # fixed ids: the same report gives the same page
    # the row labels are <th> row headings: in the weight of the cells they head, not of the column headings
    styler.set_table_styles([{"selector": "tbody th", "props": "font-weight: normal"}])
    if report.default in report.frame.index:
        # shade the default row: its heading and its cells share the row's class
        row = body.index[report.frame.index.get_loc(report.default)]
        styler.set_table_styles({row: [{"selector": "", "props": "background: #f3f3f3"}]}, axis=1, overwrite=False)
    # Styler writes the table's <style> block before the table; a page's styles belong in <head>
    css, table = styler.to_html().split("</style>\n", 1)
    agree = agreement_lines(report)
    return {
        "css": css.replace('<style type="text/css">\n', "", 1),
        "alerts": "".join(f'<p class="alert">{esc(a)}</p>' for a in alerts(report)),
        "meta": "".join(f"<p>{esc(k)}: {esc(v)}</p>" for k, v in (("Ours", report.caption), ("Paper", report.source)) if v),
        "verdict": f'<p class="verdict"><b>Verdict:</b> {esc(report.verdict)}</p>',
        "table": table.rstrip(),
        "agreement": (f'<div class="agreement"><p><b>{esc(agree[0])}</b></p><ul>'
                      + "".join(f"<li>{esc(a)}</li>" for a in agree[1:]) + "</ul></div>") if agree else "",
        "notes": "".join(f"<p class=note>{n}</p>" for n in notes(report, esc, lambda c: f"<code>{c}</code>")),
    }


def to_html(report: Report, png: bytes | None = None) -> str:
    """A self-contained page: alerts, the verdict, the table (Styler.to_html), the agreement, its notes, and
    the figure embedded as a data: URI."""
    esc = html.escape
    parts = html_parts(report)
    img = (f'<img alt="{esc(report.title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
           if png else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title_of(report))}</title>
<style>
{HTML_CSS}</style>
<style type="text/css">
{parts["css"]}</style></head>
<body>
<h2>{esc(title_of(report))}</h2>
{parts["alerts"]}
{parts["meta"]}
{parts["verdict"]}
{parts["table"]}
{parts["agreement"]}
{parts["notes"]}
{img}
</body></html>
"""

