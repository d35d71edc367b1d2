"""A sweep's results in its paper's layout: pure functions on pandas frames and the sweep spec (no MLflow).

    finished runs (one row per run) --aggregate--> one row per label --build--> Report
    Report --> to_markdown / to_latex / to_html / to_csv / plot (PNG bytes)

Rows are the swept values (grid order), then the paper's reference rows that our grid lacks (e.g. the
paper's 300/1600 epochs next to our 1..8), with empty "ours" cells. Our columns are, by default, the
frozen-feature top-1 accuracies and their random-init floors (mean ± std over seeds, and n); a spec may
name other MLflow metrics (`report.metrics: {key: heading}`, e.g. time per epoch or FLOPs), say whether
higher or lower is better (`report.best: highest | lowest`), and add each metric relative to one of its
rows (`report.relative_to: {label: ROW, as: ratio | percent}`). The paper's columns come from the spec's
`report.reference` (null = the paper printed no number there). Every format bolds the best value of each
metric column and marks the paper's default row, so they all say the same thing.

Paper columns and ours meet only where they measure the same thing: `report.compare: {paper column: MLflow
key}` (e.g. `IN-1k FT top-1: finetune_top1`) puts our mean, the paper's number and the delta (ours - paper)
side by side; the other paper columns stay paper-only. A compared metric no run has yet leaves its paper
column paper-only and a note says which protocol fills it. Protocol metrics the runs have (`finetune_top1`,
`seg_miou`, the linear views `linear_top1/l<block>/<pool>`, and their `floor_` twins) join the default
columns; they are absent when no run has them. Each row also shows the device-hours its runs cost when the
runs carry a `device_h` (and `pretrained_by` / `pretrain_device_h`: a reused pre-training is counted once).
"""
from __future__ import annotations

import base64
import html
import io
import itertools
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from pandas.io.formats.style import Styler

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
DELTA = "Δ "             # prefix of the ours - paper columns of `report.compare`
COST = "device_h"         # the row's device-hours (sum, not mean)
DECIMALS = 2             # our accuracies are percentages of a few hundred test images: 2 decimals is plenty


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
    cost_basis: str = ""             # what a device-hour is here (GPUs per task or CPU jobs)

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
    for key in (rep.get("compare") or {}).values():
        out.setdefault(str(key), heading_of(str(key)))
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


def check_compare(spec: dict) -> dict[str, str]:
    """`report.compare` as {paper column: metric}; ValueError naming the key for a column the paper lacks."""
    rep = spec.get("report") or {}
    compare = rep.get("compare") or {}
    if not isinstance(compare, dict):
        raise ValueError(f"report.compare={compare!r} must map paper columns to MLflow metric keys, "
                         "e.g. {IN-1k FT top-1: finetune_top1}")
    columns = [str(c) for c in (rep.get("reference") or {}).get("columns") or []]
    for col, key in compare.items():
        if str(col) not in columns:
            raise ValueError(f"report.compare[{str(col)!r}] is not a column of report.reference.columns "
                             f"({', '.join(columns) or 'none'})")
        if not isinstance(key, str) or not key:
            raise ValueError(f"report.compare[{str(col)!r}]={key!r} must be an MLflow metric key, e.g. finetune_top1")
    return {str(c): str(k) for c, k in compare.items()}


def aggregate(runs: pd.DataFrame, labels: Sequence[str], metrics: Sequence[str] = tuple(METRICS)) -> pd.DataFrame:
    """One row per label, in `labels` order: `<metric>_mean`, `<metric>_std` (sample std, NaN below 2
    runs) and `n` (finished runs of the label, 0 where none). `runs` has a `label` column and one column
    per metric; labels outside `labels` are ignored, metrics a run did not log are NaN and skipped."""
    every = runs[runs["label"].isin(labels)] if "label" in runs else runs
    runs = runs.reindex(columns=["label", *metrics])
    runs = runs[runs["label"].isin(labels)]
    grouped = runs.groupby("label", sort=False)
    out = pd.DataFrame(index=pd.Index(list(labels), name="label"))
    for m in metrics:
        values = pd.to_numeric(runs[m], errors="coerce").groupby(runs["label"], sort=False)
        out[f"{m}_mean"] = values.mean()
        out[f"{m}_std"] = values.std(ddof=1)  # NaN for a single seed: no spread is known, none is shown
    out["n"] = grouped.size().reindex(out.index).fillna(0).astype(int)
    if COST in every:
        out[COST] = [device_hours(every[every["label"] == label]) for label in out.index]
    return out


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
          run_command: str = "", cost_basis: str = "") -> Report:
    """agg: `aggregate`'s frame (grid order); spec: the sweep spec (name, title, report)."""
    rep = spec.get("report") or {}
    paper = reference_frame(rep.get("reference"))
    grid = [str(x) for x in agg.index]
    extra = [x for x in paper.index if x not in grid]  # the paper's rows we have no point for go last
    frame = agg.set_axis(grid).reindex(grid + extra).join(paper)
    frame.index.name = "label"
    default = rep.get("default")
    compare = check_compare(spec)
    metrics = metrics_of(spec, [c.removesuffix("_mean") for c in agg.columns
                                if c.endswith("_mean") and agg[c].notna().any()])
    # a compared metric no run has: the paper column stays the paper's alone until a run has it
    has = lambda m: f"{m}_mean" in frame and frame[f"{m}_mean"].notna().any()  # noqa: E731
    pending = {col: m for col, m in compare.items() if not has(m)}
    compare = {col: m for col, m in compare.items() if has(m)}
    for m in set(pending.values()) - set(compare.values()):
        metrics.pop(m, None)
    if not rep.get("metrics"):
        for m in redundant_view(frame, metrics, compare):
            metrics.pop(m, None)
    for col, m in compare.items():
        frame[DELTA + col] = frame[f"{m}_mean"] - frame[PAPER + col]
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
    return Report(name=str(spec.get("name", "sweep")),
                  title=str(rep.get("title") or spec.get("title") or spec.get("name")),
                  row_title=str(rep.get("row_title") or "setting"), frame=frame, grid_labels=grid,
                  default=None if default is None else str(default),
                  default_note=str(rep.get("default_note") or Report.default_note),
                  source=str((rep.get("reference") or {}).get("source") or ""),
                  caption=caption, missing=missing, expected=expected, run_command=run_command,
                  metrics=metrics, best_is=best_is, relative_to=ref_row, relative_as=rel_as,
                  compare=compare, pending=pending, cost_basis=cost_basis)


def best(report: Report) -> pd.DataFrame:
    """True where a cell holds its column's best value (highest, or lowest if the spec says so), as
    displayed. Ties are all best; a column with fewer than two distinct values has no best (bolding every
    row says nothing). Relative columns repeat their metric and are not bolded; the paper's columns are
    bolded only when higher is better (its columns may mix accuracies with costs otherwise)."""
    f = report.frame
    mask = pd.DataFrame(False, index=f.index, columns=f.columns)
    paper = report.paper_columns if report.best_is == "highest" else []
    for col in [f"{m}_mean" for m in report.shown_metrics] + paper:
        values = f[col] if col.startswith(PAPER) else f.loc[report.grid_labels, col]
        shown = values.round(DECIMALS).dropna()
        if shown.nunique() >= 2:
            target = shown.min() if report.best_is == "lowest" else shown.max()
            mask.loc[shown.index[shown == target], col] = True
    return mask


# ---- rendering -------------------------------------------------------------------------------------
# Every cell is formatted here, in its format's markup (decimals, ± std, bold, escaping), into a frame of
# strings: index = row labels, columns = headings. pandas lays that frame out: DataFrame.to_markdown
# (tabulate's pipe tables), Styler.to_latex and Styler.to_html. The CSV and the plot use the numbers.

@dataclass
class Style:
    """One format's markup: how it bolds and escapes text, its ± and its mark for a missing cell."""
    bold: Callable[[str], str]
    escape: Callable[[str], str] = lambda s: s
    pm: str = " ± "
    missing: str = MISSING


def _num(v: float, decimals: int = DECIMALS) -> str:
    return f"{v:.{decimals}f}"


def paper_decimals(values: pd.Series) -> int:
    """The decimals the paper printed a column with (84.8 stays 84.8, 43.0 stays 43.0, not 84.80 / 43)."""
    shortest = [repr(float(v)) for v in values.dropna()]
    return max((len(r.split(".")[1]) for r in shortest if "." in r and "e" not in r), default=0)


def layout(report: Report) -> list[tuple[str, str, str]]:
    """The columns after the label, as (group, kind, key): our own metrics, relative columns, n and
    device-hours ("ours"); then per compared paper column our metric, the paper's number and the delta
    ("ours vs paper"); then the paper-only columns ("paper")."""
    cols = [("ours", "metric", m) for m in report.own_metrics]
    cols += [("ours", "rel", c) for c in report.relative_columns]
    cols += [("ours", "n", "n")] + ([("ours", "cost", COST)] if report.has_cost else [])
    for c in report.paper_columns:
        col = c.removeprefix(PAPER)
        if col in report.compare:
            cols += [("ours vs paper", "metric", report.compare[col]), ("ours vs paper", "paper", c),
                     ("ours vs paper", "delta", DELTA + col)]
    return cols + [("paper", "paper", c) for c in report.paper_only]


def heading_at(report: Report, kind: str, key: str) -> str:
    """The heading of one `layout` column."""
    return {"metric": lambda: report.metrics[key], "rel": lambda: report.heading(key), "n": lambda: "n",
            "cost": lambda: "device-h", "paper": lambda: key,
            "delta": lambda: f"{DELTA}{key.removeprefix(DELTA)} (ours − paper)"}[kind]()


def _hours(v: float) -> str:
    """Device-hours: 3 significant digits (a test-size run costs thousandths, a paper-size one thousands)."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def cells(report: Report, style: Style, grouped: bool = False) -> pd.DataFrame:
    """The table as text in `style`'s markup: index = the row labels (the default one marked), columns = the
    `layout` headings, named by the row title. `grouped`: when the columns fall into more than one group,
    two column levels (group, heading); a paper column's heading then drops the "paper: " its group says."""
    f, is_best = report.frame, best(report)
    decimals = {col: paper_decimals(f[col]) for col in report.paper_columns}
    cols = layout(report)
    rows = []
    for label in f.index:
        ours = label in report.grid_labels
        row = []
        for _, kind, key in cols:
            if kind == "paper":
                v = f.at[label, key]
                text = "" if pd.isna(v) else _num(v, decimals[key])
                row.append(style.bold(text) if text and is_best.at[label, key] else text)
            elif not ours:
                row.append("")                      # a paper-only row: we have no such point
            elif kind == "n":
                row.append(str(int(f.at[label, "n"])))
            elif kind == "metric":
                mean, std = f.at[label, f"{key}_mean"], f.at[label, f"{key}_std"]
                if pd.isna(mean):
                    text = style.missing            # our point, not (yet) finished
                else:
                    text = _num(mean) + ("" if pd.isna(std) else style.pm + _num(std))
                    text = style.bold(text) if is_best.at[label, f"{key}_mean"] else text
                row.append(text)
            else:
                v = f.at[label, key]
                if pd.isna(v):
                    row.append("" if kind == "delta" else style.missing)  # no paper number: no delta
                elif kind == "rel":
                    row.append(f"{v:.2f}×" if report.relative_as == "ratio" else f"{v:+.1f}")
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


def notes(report: Report, escape: Callable[[str], str] = lambda s: s,
          code: Callable[[str], str] = lambda s: s) -> list[str]:
    """Footnotes shared by every format; `escape` is the format's text escaping, `code` sets a command."""
    floor = "; floor: the same encoder at random init" if any(m.startswith("floor_") for m in report.shown_metrics) else ""
    out = [f"Bold: best per column. Ours: mean ± std over seeds (n runs){floor}."]
    if report.compare:
        out.append("Ours vs paper: only where both measure the same thing ("
                   + "; ".join(f"{col} ← {m}" for col, m in report.compare.items())
                   + "); Δ = ours − paper. Our setting is far smaller than the paper's: compare trends, not levels.")
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


def to_markdown(report: Report) -> str:
    """GitHub markdown: the title, what ours and the paper's are, the table (a tabulate pipe table), the notes."""
    body = cells(report, Style(bold=lambda s: f"**{s}**", escape=lambda s: s.replace("|", "\\|")))
    table = body.to_markdown(headers=[body.columns.name, *body.columns], disable_numparse=True,  # our text as is
                             colalign=["left"] + ["right"] * body.shape[1])                   # labels left, numbers right
    # tabulate writes the alignment row as "|:----|---:|"; spaced like the others ("| :-- | --: |"), every
    # line of the table starts with "| ", which is how readers of our markdown (and the tests) find it
    head, align, *rows = table.split("\n")
    align = "|" + "|".join(f" {seg.replace('--', '', 1)} " for seg in align.split("|")[1:-1]) + "|"
    table = "\n".join([head, align, *rows])
    lines = [f"### {report.title}", ""]
    if report.caption:
        lines.append(f"Ours: {report.caption}")
    if report.source:
        lines.append(f"Paper: {report.source}")
    lines += ["", table, ""]
    lines += [f"{n}  " for n in notes(report, code=lambda c: f"`{c}`")]  # trailing "  ": a line break
    return "\n".join(lines).rstrip() + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  # in text mode, the default (OT1) font encoding prints < > | as ¡ ¿ —
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "−": "$-$", "←": r"$\leftarrow$", "–": "--", "γ": r"$\gamma$", "×": r"$\times$"}


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
    group headings (ours / ours vs paper / paper) are centred over their columns and ruled below."""
    body = cells(report, Style(bold=lambda s: f"\\textbf{{{s}}}", escape=latex_escape, pm=r" $\pm$ ", missing="--"),
                 grouped=True)
    if isinstance(body.columns, pd.MultiIndex):
        spans = [(group, len(list(run))) for group, run in itertools.groupby(body.columns.get_level_values(0))]
        # Styler writes \multicolumn only for 2+ columns: a one-column group's heading is centred the same way
        body = body.rename(columns={g: f"\\multicolumn{{1}}{{c}}{{{g}}}" for g, n in spans if n == 1}, level=0)
        first = list(itertools.accumulate([2] + [n for _, n in spans]))  # column 1 holds the row labels
        rules = " ".join(f"\\cmidrule(lr){{{i}-{i + n - 1}}}" for i, (_, n) in zip(first, spans))
        # booktabs wants the rules at the start of the next row, the headings, whose first cell is the row title
        body.columns = body.columns.set_names(f"{rules}\n{body.columns.names[1]}", level=1)
    caption = latex_escape(report.title + ". " + (f"Ours: {report.caption} " if report.caption else "")
                           + (f"Paper: {report.source}." if report.source else ""))
    latex = Styler(body).to_latex(column_format="l" + "r" * body.shape[1], hrules=True, multicol_align="c",
                                  position="t", position_float="centering", caption=caption,
                                  label=f"tab:{report.name}")
    foot = notes(report, latex_escape, lambda c: f"\\texttt{{{c}}}")
    latex = latex.replace("\\end{table}", "\\par\\smallskip{\\footnotesize " + " ".join(foot) + "}\n\\end{table}")
    return "% generated by reports/build.py; needs \\usepackage{booktabs}\n" + latex


def to_csv(report: Report) -> str:
    """Plain numbers (mean and std in separate columns, empty where none), plus which row is ours/default."""
    f = report.frame.copy()
    f.insert(0, "ours", [label in report.grid_labels for label in f.index])
    f.insert(1, "default", [label == report.default for label in f.index])
    f["n"] = f["n"].astype("Int64")  # an integer column, empty for the paper-only rows
    return f.to_csv(index=True, lineterminator="\n")


def to_html(report: Report, png: bytes | None = None) -> str:
    """A self-contained page: the table (Styler.to_html), its notes, and the plot embedded as a data: URI."""
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
    img = (f'<img alt="{esc(report.title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
           if png else "")
    meta = "".join(f"<p>{esc(k)}: {esc(v)}</p>" for k, v in (("Ours", report.caption), ("Paper", report.source)) if v)
    foot = "".join(f"<p class=note>{n}</p>" for n in notes(report, esc, lambda c: f"<code>{c}</code>"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(report.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: .3em .8em; text-align: right; border-bottom: 1px solid #ddd; }}
thead th {{ border-bottom: 2px solid #333; }}
thead tr:not(:last-child) th {{ text-align: center; }}
td:first-child, th:first-child {{ text-align: left; }}
.note {{ font-size: .9em; color: #555; margin: .2em 0; }}
img {{ max-width: 100%; margin-top: 1em; }}
</style>
{css}</style></head>
<body>
<h2>{esc(report.title)}</h2>
{meta}
{table.rstrip()}
{foot}
{img}
</body></html>
"""


def plot(report: Report) -> bytes:
    """PNG: our metrics per row (error bars = std), floors dashed, the paper's first column on a right axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    f = report.frame
    labels = list(f.index)
    x = list(range(len(labels)))  # categorical: grid rows in order, then the paper-only rows
    fig = Figure(figsize=(max(6.0, 1.1 * len(labels) + 2.5), 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = []
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    mains = [m for m in report.shown_metrics if not m.startswith("floor_")]
    for m, color in zip(mains, palette):
        mean, std = f[f"{m}_mean"], f[f"{m}_std"]
        if mean.notna().any():
            yerr = std.fillna(0) if std.notna().any() else None  # bars only where seeds give a spread
            h = ax.errorbar(x, mean, yerr=yerr, color=color, marker="o", capsize=3, label=f"ours: {report.metrics[m]}")
            handles.append(h)
        floor = f.get(f"floor_{m}_mean")
        if f"floor_{m}" in report.metrics and floor is not None and floor.notna().any():
            (h,) = ax.plot(x, floor, color=color, linestyle="--", alpha=.7, label=f"ours: {report.metrics['floor_' + m]}")
            handles.append(h)
    ax.set_ylabel("top-1 % (ours, frozen features)" if report.metrics == METRICS else "ours")
    ax.set_xlabel(report.row_title)
    ax.set_xticks(x, [lab + ("*" if lab == report.default else "") for lab in labels])
    if report.default in labels:  # shade the paper's default setting
        i = labels.index(report.default)
        ax.axvspan(i - .4, i + .4, color="0.92", zorder=0)
    ax.grid(axis="y", alpha=.3)
    if report.paper_columns and f[report.paper_columns[0]].notna().any():
        col = report.paper_columns[0]
        ax2 = ax.twinx()
        (h,) = ax2.plot(x, f[col], color="0.35", marker="s", linestyle=":", label=col + " (right axis)")
        ax2.set_ylabel(col)
        handles.append(h)
    # below the axes: inside, it would hide points wherever they happen to fall
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.set_title(report.title + ("   (* = default)" if report.default in labels else ""), fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
