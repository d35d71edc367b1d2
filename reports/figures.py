"""A report's figure as small multiples: one panel per quantity, each with its own honest axis.

    Report --panels--> [Panel] --to_png / to_svg (matplotlib)--> one image
                               --to_plotly (data for the site's vendored plotly.js)--> interactive panels

- one panel per metric of ours (k-NN, linear, fine-tuning, ...): our mean per row, its 95 % interval as error
  bars, the random-init floor as a dashed line;
- per compared paper column, the paper's curve beside ours as a change from each side's default row (in
  points for accuracies, as a ratio otherwise), both on one axis in the same unit; without a shared default
  row, the paper's numbers in a panel of their own. Sweeps with no compared column show the paper's columns
  (at most two) in panels of their own.
There is never a second y-axis: the paper's numbers (ViT-B on ImageNet) and ours (a micro ViT on
Fashion-MNIST) differ in level by tens of points, and stretching one to the other's height makes any two
curves look alike. A smoke-preset report carries its mark across every panel; trained values at or below
their floor are written under the figure.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from reports import table

MAX_PAPER_PANELS = 2   # uncompared paper columns drawn (a table may have six: COCO, ADE20K, ...)


@dataclass
class Series:
    name: str
    x: list[str]
    y: list[float]
    lo: list[float] = field(default_factory=list)   # 95 % interval, NaN where none (no bars)
    hi: list[float] = field(default_factory=list)
    kind: str = "ours"                               # ours | paper | floor


@dataclass
class Panel:
    title: str
    ylabel: str
    x: list[str]              # the categories, in table order
    series: list[Series]
    default: str | None = None  # the row shaded
    zero_line: bool = False     # a change panel: 0 (or 1 for ratios) is "same as the default"
    baseline: float = 0.0


def _vals(series) -> list[float]:
    return [float("nan") if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in series]


def metric_panels(report: table.Report) -> list[Panel]:
    f, grid = report.frame, report.grid_labels
    out = []
    for m in table.main_metrics(report):
        mean = _vals(f.loc[grid, f"{m}_mean"])
        if all(math.isnan(v) for v in mean):
            continue
        lo, hi = _vals(f.loc[grid, f"{m}_lo"]), _vals(f.loc[grid, f"{m}_hi"])
        series = [Series(f"ours: {report.metrics[m]}", grid, mean, lo, hi)]
        floor = table.FLOOR + m
        if floor in report.shown_metrics:
            series.append(Series("random-init floor", grid, _vals(f.loc[grid, f"{floor}_mean"]), kind="floor"))
        unit = "top-1 %" if table.is_accuracy(m) else report.metrics[m]
        out.append(Panel(report.metrics[m], unit, grid, series, report.default if report.default in grid else None))
    return out


def change_panel(report: table.Report, col: str, m: str, stand_in: bool) -> Panel | None:
    """The paper's column and our metric, each as a change from its own default row; None without one."""
    f, d = report.frame, report.default
    paper, ours = f[table.PAPER + col], f[f"{m}_mean"]
    if d is None or d not in f.index or math.isnan(paper.get(d, math.nan)) or math.isnan(ours.get(d, math.nan)):
        return None
    rows = [r for r in f.index if not math.isnan(paper[r]) or (r in report.grid_labels and not math.isnan(ours[r]))]
    ratio = not table.is_accuracy(m)
    change = (lambda v, ref: v / ref) if ratio else (lambda v, ref: v - ref)  # noqa: E731
    p = [change(paper[r], paper[d]) for r in rows]
    grid = [r for r in rows if r in report.grid_labels]
    o = [change(ours[r], ours[d]) for r in grid]
    lo = [change(v, ours[d]) for v in _vals(f.loc[grid, f"{m}_lo"])]
    hi = [change(v, ours[d]) for v in _vals(f.loc[grid, f"{m}_hi"])]
    name = f"ours: {report.metrics[m]}" + (" (stand-in)" if stand_in else "")
    return Panel(f"{col}: change from the default row ({d})", "ratio to the default row" if ratio else "points",
                 rows, [Series(f"paper: {col}", rows, p, kind="paper"), Series(name, grid, o, lo, hi)],
                 d, zero_line=True, baseline=1.0 if ratio else 0.0)


def paper_panel(report: table.Report, col: str) -> Panel | None:
    values = report.frame[table.PAPER + col]
    rows = [r for r in report.frame.index if not math.isnan(values[r])]
    if len(rows) < 2:
        return None
    return Panel(f"paper: {col}", col, rows, [Series(f"paper: {col}", rows, [float(values[r]) for r in rows],
                                                     kind="paper")],
                 report.default if report.default in rows else None)


def panels(report: table.Report) -> list[Panel]:
    """The figure's panels, in order: ours, then the paper's."""
    out = metric_panels(report)
    done = set()
    for a in report.agreements:
        if a.column in done:
            continue
        done.add(a.column)
        out.append(change_panel(report, a.column, a.metric, a.stand_in) or paper_panel(report, a.column))
    if not report.agreements:
        out += [paper_panel(report, c.removeprefix(table.PAPER)) for c in report.paper_columns][:MAX_PAPER_PANELS]
    return [p for p in out if p is not None]


COLORS = {"ours": "tab:blue", "paper": "0.35", "floor": "tab:red"}


def figure(report: table.Report):
    """The matplotlib Figure (no pyplot: no global state, no display backend needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ps = panels(report)
    ncols = max(1, min(3, len(ps)))
    nrows = max(1, math.ceil(len(ps) / ncols))
    widest = max((len(p.x) for p in ps), default=1)
    width = max(4.2, 0.55 * widest + 1.6)
    fig = Figure(figsize=(width * ncols, 3.3 * nrows + 0.9 + 0.25 * len(report.warnings)), dpi=110,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, p in zip(axes, ps):
        draw(ax, p)
    for ax in axes[len(ps):]:
        ax.set_axis_off()
    if not ps:
        axes[0].text(0.5, 0.5, "no finished run yet", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(table.title_of(report), fontsize=11, color="tab:red" if report.smoke else "black")
    if report.warnings:
        fig.supxlabel("\n".join(f"warning: {w}" for w in report.warnings), fontsize=8, color="tab:red")
    if report.smoke:
        fig.text(0.5, 0.5, table.SMOKE.upper(), ha="center", va="center", rotation=20, fontsize=30,
                 color="tab:red", alpha=0.25, weight="bold")
    return fig


def draw(ax, p: Panel) -> None:
    """One panel on a matplotlib axis: categories on x, our series with interval bars, floors dashed."""
    index = {label: i for i, label in enumerate(p.x)}
    if p.default in index:
        i = index[p.default]
        ax.axvspan(i - .4, i + .4, color="0.92", zorder=0)
    if p.zero_line:
        ax.axhline(p.baseline, color="0.6", linewidth=0.8)
    for s in p.series:
        x = [index[label] for label in s.x]
        if s.kind == "floor":
            ax.plot(x, s.y, color=COLORS["floor"], linestyle="--", linewidth=1.2, label=s.name)
            continue
        have_bars = any(not math.isnan(v) for v in s.lo)
        yerr = None
        if have_bars:
            yerr = [[0 if math.isnan(lo) else y - lo for y, lo in zip(s.y, s.lo)],
                    [0 if math.isnan(hi) else hi - y for y, hi in zip(s.y, s.hi)]]
        ax.errorbar(x, s.y, yerr=yerr, color=COLORS[s.kind], marker="o" if s.kind == "ours" else "s",
                    linestyle="-" if s.kind == "ours" else ":", capsize=3, label=s.name + (" (95 % interval)"
                                                                                        if have_bars else ""))
    ax.set_xticks(range(len(p.x)), [lab + ("*" if lab == p.default else "") for lab in p.x],
                  rotation=30 if max((len(lab) for lab in p.x), default=0) > 6 else 0, fontsize=8,
                  ha="right" if max((len(lab) for lab in p.x), default=0) > 6 else "center")
    ax.set_title(p.title, fontsize=9)
    ax.set_ylabel(p.ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def save(report: table.Report, formats: tuple[str, ...] = ("png", "svg")) -> dict[str, bytes]:
    """The figure in each format ({format: file bytes}), drawn once. The SVG carries no date: the same report
    gives the same file."""
    fig = figure(report)
    out = {}
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        out[fmt] = buf.getvalue()
    return out


def to_png(report: table.Report) -> bytes:
    return save(report, ("png",))["png"]


def to_svg(report: table.Report) -> bytes:
    return save(report, ("svg",))["svg"]


def _json_list(values: list[float]) -> list:
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def to_plotly(p: Panel) -> dict:
    """One panel as plotly.js `{data, layout}` (JSON-able: NaN -> null), drawn by the site's pages."""
    traces = []
    for s in p.series:
        t = {"type": "scatter", "mode": "lines+markers", "name": s.name, "x": s.x, "y": _json_list(s.y),
             "line": {"color": {"ours": "#1f77b4", "paper": "#595959", "floor": "#d62728"}[s.kind],
                      "dash": {"ours": "solid", "paper": "dot", "floor": "dash"}[s.kind]},
             "marker": {"symbol": "square" if s.kind == "paper" else "circle"}}
        if any(not math.isnan(v) for v in s.lo):
            t["error_y"] = {"type": "data", "symmetric": False,
                            "array": _json_list([h - y for y, h in zip(s.y, s.hi)]),
                            "arrayminus": _json_list([y - lo for y, lo in zip(s.y, s.lo)])}
            t["name"] += " (95 % interval)"
        if s.kind == "floor":
            t["mode"] = "lines"
        traces.append(t)
    shapes = []
    if p.default in p.x:
        i = p.x.index(p.default)
        shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": i - .4, "x1": i + .4, "y0": 0, "y1": 1,
                       "fillcolor": "#ebebeb", "line": {"width": 0}, "layer": "below"})
    if p.zero_line:
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": p.baseline, "y1": p.baseline,
                       "line": {"color": "#999", "width": 1}})
    layout = {"title": {"text": p.title, "font": {"size": 13}}, "height": 320, "margin": {"l": 55, "r": 10, "t": 40, "b": 60},
              "xaxis": {"type": "category", "categoryorder": "array", "categoryarray": p.x},
              "yaxis": {"title": {"text": p.ylabel}}, "shapes": shapes,
              "legend": {"orientation": "h", "y": -0.25, "font": {"size": 10}}}
    return {"data": traces, "layout": layout}
