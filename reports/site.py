"""One static site over every sweep of an MLflow store: an index and a page per sweep, opened from disk.

    python reports/build.py --site [--output-root outputs | --uri URI] [--out DIR] [--ui http://localhost:5000]

A *sweep* here is what one launch command makes: the point runs of a sweep name in an experiment whose
launches gave the same overrides (the keys that change results: `preset=smoke` or `evaluate.protocols=...`
make another page; `output_root`, `cluster.*`, `tracking.*` do not). Relaunches with the same overrides
(resuming, more seeds) add to the same page. For each (row, seed) the latest run counts.

The index lists every sweep with its state (finished / running / queued / failed points, the last update,
the pre-training progress of its running points) and its verdict line; each page holds the report
(reports/table.py: alerts, verdict, table, agreement, notes), its figure as interactive panels, the
training-loss curves of its points and a link to each run in the MLflow UI (`<ui>/#/experiments/<id>/runs/<run
id>`). Plain HTML and one vendored plotting library (plotly.js basic, MIT, reports/assets/), no server: the
folder works from file://. Rebuilding it shows the store's state at that moment.

The store is read in two passes whatever its size: every run of every live experiment (core/tracking/bulk.py:
a column query per table of a database store, the paged search of a tracking server) and the `train_loss`
histories of the points in bulk (cluster/progress.py histories). Paper numbers and row order come from the
sweep files of this checkout (sweeps/conf/sweep/). From PARALLEL_FROM sweeps on, the reports and pages are
built by one forked process per CPU, which inherit what was read (docs/reports.md, Scale).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import html
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cluster import progress as live
from core import tracking
from core.config import CONFIG_DIR, cpu_count
from reports import figures, runs as read, table

ASSETS = Path(__file__).parent / "assets"
PLOTLY = "plotly-basic.min.js"
NOT_RESULTS = ("output_root", "cluster", "tracking", "retry_failed", "dry_run", "reuse", "device", "report_dir",
               "hydra")  # launch overrides that change where and how points run, not what they compute
STATES = ("finished", "running", "queued", "failed")
STATE_OF = {"FINISHED": "finished", "RUNNING": "running", "SCHEDULED": "queued", "FAILED": "failed", "KILLED": "failed"}
CURVE_POINTS = 200  # train_loss points per run on a page (evenly sampled, first and last kept)


@dataclass
class Sweep:
    """The runs of one launch configuration of one sweep in one experiment."""
    experiment_id: str
    experiment: str
    name: str
    variant: str                                   # the launch's result-changing overrides, as typed
    command: list[str] = field(default_factory=list)  # the latest launch's overrides (to rerun what is missing)
    runs: list = field(default_factory=list)       # every point run
    report: table.Report | None = None
    progress: dict = field(default_factory=dict)   # run id -> cluster.progress.Progress (running points)

    @property
    def slug(self) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name if self.experiment == self.name
                      else f"{self.experiment}__{self.name}")
        return base + (f"--{hashlib.sha1(self.variant.encode()).hexdigest()[:8]}" if self.variant else "")

    @property
    def latest(self) -> list:
        """The latest run of each (row, seed), in start order."""
        out = {}
        for r in sorted(self.runs, key=lambda r: r.info.start_time or 0):
            out[(r.data.tags.get(tracking.TAG + "label"), r.data.params.get("seed"))] = r
        return list(out.values())

    @property
    def states(self) -> Counter:
        return Counter(STATE_OF.get(r.info.status, "failed") for r in self.latest)

    @property
    def last_update(self) -> int:
        """ms: the latest start, end or metric timestamp of its runs."""
        stamps = [0]
        for r in self.runs:
            stamps += [r.info.start_time or 0, r.info.end_time or 0]
            stamps.append(r.data.metric_time)
        return max(stamps)


def variant_of(overrides: list[str]) -> str:
    """The overrides that change what points compute, in the launch's order."""
    from sweeps.grid import override_key  # not sweeps.plan: that imports the methods (torch) for nothing here
    return " ".join(o for o in overrides if override_key(o).split(".")[0] not in NOT_RESULTS)


def read_store(c) -> tuple[dict[str, str], list]:
    """{experiment id: name} and every run of every live experiment (core/tracking/bulk.py)."""
    from core.tracking import bulk
    experiments = bulk.experiments(c)
    return experiments, bulk.runs(c, list(experiments))


def group(experiments: dict[str, str], runs: list) -> list[Sweep]:
    """Point runs -> sweeps, keyed by (experiment, sweep name, the variant of the launch that made them)."""
    launches = {}  # launch run id -> (its overrides, their variant): once per launch, not per point
    for r in runs:
        if r.data.tags.get(tracking.TAG + "kind") == "launch":
            try:
                overrides = json.loads(r.data.tags.get(tracking.TAG + "overrides", "[]"))
            except ValueError:
                overrides = []
            launches[r.info.run_id] = (overrides, variant_of(overrides))
    sweeps: dict[tuple, Sweep] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        tags = r.data.tags
        if tags.get(tracking.TAG + "kind") != "point":
            continue
        launch = launches.get(tags.get("mlflow.parentRunId"))
        name = tags.get(tracking.TAG + "sweep") or "single"
        key = (r.info.experiment_id, name, launch[1] if launch else "")
        if key not in sweeps:
            sweeps[key] = Sweep(r.info.experiment_id, experiments.get(r.info.experiment_id, "?"), name, key[2])
        sweeps[key].runs.append(r)
        if launch:
            sweeps[key].command = launch[0]
    return sorted(sweeps.values(), key=lambda s: (s.name, s.variant, s.experiment))


_SPECS: dict[str, dict | None] = {}


def spec_of(name: str) -> dict:
    """The sweep file of this checkout (its title, row order and the paper's numbers); a sweep that has none
    here gets a bare spec (its rows in run order, no paper columns)."""
    if name not in _SPECS:
        path = CONFIG_DIR / "sweep" / f"{name}.yaml"
        try:
            from omegaconf import OmegaConf
            _SPECS[name] = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else None
        except Exception:  # noqa: BLE001 - a broken file: the page still shows the runs
            _SPECS[name] = None
    return _SPECS[name] or {"name": name, "title": name, "report": {"row_title": "setting"}}


def labels_of(spec: dict, runs: list) -> list[str]:
    """Row order: the sweep file's points, then labels only the runs have (a `sweep.grid=...` launch)."""
    from sweeps.grid import expand
    try:
        labels = [p.label for p in expand(spec)]
    except Exception:  # noqa: BLE001 - a bare or broken spec
        labels = []
    labels += [r.data.tags.get(tracking.TAG + "label", "?") for r in runs]
    return list(dict.fromkeys(labels))


def build_report(s: Sweep, by_id: dict) -> table.Report | None:
    """The sweep's report from its latest finished runs (an evaluation-only run takes its trainer's metrics
    from the same search)."""
    spec = spec_of(s.name)
    latest = s.latest
    finished = [r for r in latest if r.info.status == tracking.FINISHED]
    labels = labels_of(spec, latest)
    rows, params = [], []
    for r in finished:
        by = r.data.tags.get(tracking.TAG + "pretrained_by")
        trainer = by_id.get(by)
        t = (trainer.data.metrics, read.run_device_h(trainer.data.metrics, read.params_of(trainer.data), False)) \
            if trainer else None
        rows.append(read.row_of(r, r.data.tags.get(tracking.TAG + "label", "?"), r.data.params.get("seed"), t))
        params.append(read.params_of(r.data))
    frame = pd.DataFrame(rows, columns=None if rows else ["label"])
    have = [k for k in frame.columns if pd.to_numeric(frame[k], errors="coerce").notna().any()]
    try:
        metrics = list(table.metrics_of(spec, have))
        seeds = {r.data.params.get("seed") for r in latest} or {"0"}
        expected = len(labels) * len(seeds)
        command = "python sweeps/run.py " + " ".join([f"sweep={s.name}", *s.command])
        return table.build(table.aggregate(frame, labels, metrics), spec,
                           caption=read.describe(params or [r.data.params for r in latest]),
                           missing=expected - len(finished), expected=expected, run_command=command,
                           cost_basis=read.cost_basis(params), smoke=any(read.is_smoke(p) for p in params or
                                                                         [r.data.params for r in latest]))
    except ValueError as e:  # a malformed report block: the page says so and still lists the runs
        print(f"note: sweep {s.name}: {e}", file=sys.stderr)
        return None


# ---- pages -------------------------------------------------------------------------------------------
esc = html.escape


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _finite(value):
    """NaN and infinities (a diverged loss, a missing interval) as JSON null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _script_json(value) -> str:
    """JSON inside a <script> element: no "</" can close it early. `value` must hold no NaN (see _finite)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")


def _state_cells(s: Sweep) -> str:
    st = s.states
    return "".join(f'<td class="state {k}">{st.get(k, 0)}</td>' for k in STATES)


def _live_rows(s: Sweep) -> list[str]:
    out = []
    for r in s.latest:
        p = s.progress.get(r.info.run_id)
        if p is None:
            continue
        out.append(f"{r.data.tags.get(tracking.TAG + 'label', '?')} seed {r.data.params.get('seed', '?')}: step "
                   f"{p.step if p.step is not None else '-'}" + (f" ({100 * p.fraction:.0f} %)" if p.fraction else "")
                   + (f", loss {p.loss:.4f}" if p.loss is not None else "") + f", ETA {live.fmt_duration(p.eta_s)}")
    return out


PAGE_CSS = table.HTML_CSS + """nav { margin-bottom: 1em; }
.state.running { color: #1f77b4; } .state.failed { color: #c0392b; } .state.queued { color: #7f6000; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(26em, 1fr)); gap: .5em; }
.panel { min-height: 320px; border: 1px solid #eee; }
.live { font-family: ui-monospace, monospace; font-size: .9em; }
td.verdict { text-align: left; font-size: .9em; max-width: 50em; }
table.index td, table.index th, table.runs td, table.runs th { text-align: left; }
table.index td.state, table.runs td.num { text-align: right; }
"""


def page(s: Sweep, ui: str, curves: dict, built: str) -> str:
    """One sweep's page."""
    rep = s.report
    parts = table.html_parts(rep) if rep else {k: "" for k in ("css", "alerts", "meta", "verdict", "table",
                                                                 "agreement", "notes")}
    title = table.title_of(rep) if rep else s.name
    figs, divs = {}, []
    for i, p in enumerate(figures.panels(rep) if rep else []):
        figs[f"panel{i}"] = _finite(figures.to_plotly(p))
        divs.append(f'<div class="panel" id="panel{i}"></div>')
    traces = []
    for r in s.latest:
        h = curves.get(r.info.run_id) or []
        if h:
            traces.append({"type": "scatter", "mode": "lines", "x": [p[0] for p in h],
                           "y": [p[1] if math.isfinite(p[1]) else None for p in h],  # a diverged loss: a gap
                           "name": f"{r.data.tags.get(tracking.TAG + 'label', '?')} seed={r.data.params.get('seed', '?')}"})
    if traces:
        figs["curves"] = {"data": traces, "layout": {"title": {"text": "training loss (train_loss)"}, "height": 380,
                                                     "xaxis": {"title": {"text": "step"}},
                                                     "yaxis": {"title": {"text": "loss"}, "type": "log"},
                                                     "margin": {"l": 60, "r": 10, "t": 40, "b": 45}}}
    runs_rows = []
    for r in s.latest:
        m = r.data.metrics
        link = f"{ui.rstrip('/')}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}"
        runs_rows.append(
            f"<tr><td>{esc(r.data.tags.get(tracking.TAG + 'label', '?'))}</td><td>{esc(r.data.params.get('seed', '?'))}</td>"
            f"<td class=\"state {STATE_OF.get(r.info.status, 'failed')}\">{esc(r.info.status)}</td>"
            + "".join(f"<td>{m[k]:.2f}</td>" if k in m else "<td>-</td>" for k in ("knn_top1", "linear_top1"))
            + f'<td><a href="{esc(link)}">{esc(r.info.run_id[:8])}</a></td>'
              f"<td>{esc(r.data.tags.get(tracking.TAG + 'failure', '')[:160])}</td></tr>")
    st = s.states
    state = " · ".join(f"{st.get(k, 0)} {k}" for k in STATES) + f" · last update {_when(s.last_update)}"
    live_rows = _live_rows(s)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
{PAGE_CSS}</style>
<style type="text/css">
{parts["css"]}</style>
<script src="../assets/{PLOTLY}"></script></head>
<body>
<nav><a href="../index.html">← all sweeps</a> · built {esc(built)}</nav>
<h2>{esc(title)}</h2>
<p>sweep <code>{esc(s.name)}</code> · experiment <a href="{esc(ui.rstrip('/'))}/#/experiments/{esc(s.experiment_id)}">{esc(s.experiment)}</a>
 · launch overrides <code>{esc(s.variant or "(none)")}</code></p>
<p class="states">{esc(state)}</p>
{"".join(f'<p class="live">{esc(x)}</p>' for x in live_rows)}
{parts["alerts"]}
{parts["meta"]}
{parts["verdict"]}
{parts["table"]}
{parts["agreement"]}
{parts["notes"]}
<p><a href="{esc(s.slug)}.csv">table as CSV</a></p>
<h3>Figures</h3>
<div class="grid">{"".join(divs) or "<p>no finished run yet</p>"}</div>
<h3>Training loss</h3>
{'<div class="panel" id="curves"></div>' if traces else "<p>no training-loss history (evaluation-only runs, or none logged yet)</p>"}
<h3>Runs</h3>
<table class="runs"><thead><tr><th>row</th><th>seed</th><th>status</th><th>k-NN top-1</th><th>linear top-1</th><th>MLflow</th><th>failure</th></tr></thead>
<tbody>
{chr(10).join(runs_rows)}
</tbody></table>
<script>
const FIGURES = {_script_json(figs)};
for (const [id, fig] of Object.entries(FIGURES)) {{
  Plotly.newPlot(id, fig.data, fig.layout, {{displaylogo: false, responsive: true}});
}}
</script>
</body></html>
"""


def headline(s: Sweep) -> tuple[str, str]:
    """(title, verdict) of a sweep whose report is built: what the index says of it."""
    return (table.title_of(s.report), s.report.verdict) if s.report else (s.name, "no report (see the page)")


def index(sweeps: list[Sweep], headlines: list[tuple[str, str]], uri: str, built: str) -> str:
    rows = []
    for s, (title, verdict) in zip(sweeps, headlines):
        live_rows = _live_rows(s)
        rows.append(f'<tr><td><a href="sweeps/{esc(s.slug)}.html">{esc(s.name)}</a></td>'
                    f"<td><code>{esc(s.variant)}</code></td><td>{esc(title)}</td>{_state_cells(s)}"
                    f"<td>{esc(_when(s.last_update))}</td>"
                    f'<td class="verdict">{esc(verdict)}'
                    + "".join(f'<br><span class="live">{esc(x)}</span>' for x in live_rows) + "</td></tr>")
    total = Counter()
    for s in sweeps:
        total.update(s.states)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mimsweep: every sweep</title>
<style>
{PAGE_CSS}</style></head>
<body>
<h2>Every sweep in {esc(tracking.redact(uri) or "")}</h2>
<p>{len(sweeps)} sweeps · {" · ".join(f"{total.get(k, 0)} {k}" for k in STATES)} points · built {esc(built)}
 (rebuild with <code>python reports/build.py --site</code> to refresh)</p>
<table class="index"><thead><tr><th>sweep</th><th>launch overrides</th><th>title</th><th>finished</th><th>running</th>
<th>queued</th><th>failed</th><th>last update</th><th>verdict</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""


def build(uri: str, out: Path, ui: str = "http://localhost:5000", curve_points: int = CURVE_POINTS) -> dict:
    """Read the store, write the site under `out` (index.html, sweeps/, assets/). -> {runs, sweeps, timings}."""
    timings = {}
    t = time.perf_counter()
    c = tracking.client(uri)
    experiments, runs = read_store(c)
    by_id = {r.info.run_id: r for r in runs}
    sweeps = group(experiments, runs)
    timings["read"] = time.perf_counter() - t

    t = time.perf_counter()
    trained = [r.info.run_id for s in sweeps for r in s.latest
               if not r.data.tags.get(tracking.TAG + "pretrained_by")]
    curves = live.histories(c, trained, live.LOSS, curve_points)
    for s in sweeps:
        for r in s.latest:
            if r.info.status == "RUNNING":
                s.progress[r.info.run_id] = live.progress_of(r, curves.get(r.info.run_id, []))
    timings["curves"] = time.perf_counter() - t

    t = time.perf_counter()
    built = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    (out / "sweeps").mkdir(parents=True, exist_ok=True)
    (out / "assets").mkdir(exist_ok=True)
    for asset in (PLOTLY, "PLOTLY_LICENSE"):
        target = out / "assets" / asset
        if not target.is_file() or target.stat().st_size != (ASSETS / asset).stat().st_size:
            shutil.copyfile(ASSETS / asset, target)
    processes = _processes(len(sweeps))
    headlines = _write_pages(sweeps, by_id, curves, out, ui, built, processes)
    (out / "index.html").write_text(index(sweeps, headlines, uri, built), encoding="utf-8")
    timings[f"reports and pages ({processes} process{'es' if processes > 1 else ''})"] = time.perf_counter() - t
    return {"runs": sum(len(s.runs) for s in sweeps), "sweeps": len(sweeps),
            "timings": ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())}


PARALLEL_FROM = 24  # sweeps: from this many, their reports and pages are built by one process per CPU
MAX_PROCESSES = 8   # each holds what the parent read (copy-on-write, but touched pages are copied)


def _processes(n_sweeps: int) -> int:
    """Processes that build the reports and pages: one per CPU for a big store (pandas builds each table
    from small frames, ~30 ms a sweep, all CPU), one below PARALLEL_FROM sweeps, where forking costs more."""
    return min(cpu_count(), n_sweeps, MAX_PROCESSES) if n_sweeps >= PARALLEL_FROM else 1


_SHARED: tuple = ()  # what the forked processes read: set just before they fork, so they inherit it


def _pages_of(share: list[int]) -> list[tuple[int, tuple[str, str]]]:
    """Build and write the report, page and CSV of these sweeps (indices into the shared list)."""
    sweeps, by_id, curves, out, ui, built = _SHARED
    done = []
    for i in share:
        s = sweeps[i]
        s.report = build_report(s, by_id)
        (out / "sweeps" / f"{s.slug}.html").write_text(page(s, ui, curves, built), encoding="utf-8")
        if s.report:
            (out / "sweeps" / f"{s.slug}.csv").write_text(table.to_csv(s.report), encoding="utf-8")
        done.append((i, headline(s)))
    return done


def _write_pages(sweeps: list[Sweep], by_id: dict, curves: dict, out: Path, ui: str, built: str,
                 processes: int) -> list[tuple[str, str]]:
    """Every sweep's report, page and CSV, in `processes` forked processes (the store, read once, is
    inherited, not sent) -> each sweep's headline for the index."""
    global _SHARED
    _SHARED = (sweeps, by_id, curves, out, ui, built)
    try:
        if processes == 1:
            done = _pages_of(list(range(len(sweeps))))
        else:
            import multiprocessing as mp
            shares = [list(range(k, len(sweeps), processes)) for k in range(processes)]  # big and small mixed
            gc.freeze()  # the read store's objects stay shared: the children's collector does not touch them
            with mp.get_context("fork").Pool(processes) as pool:
                done = [x for part in pool.map(_pages_of, shares) for x in part]
    finally:
        _SHARED = ()
        if processes > 1:
            gc.unfreeze()
    headlines = dict(done)
    return [headlines[i] for i in range(len(sweeps))]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python reports/build.py --site", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-root", default="outputs", help="where the default store is (<DIR>/mlflow.db)")
    ap.add_argument("--uri", help="an MLflow tracking URI instead (sqlite:///..., http://...); "
                                  "default: $MLFLOW_TRACKING_URI, else the output root's store")
    ap.add_argument("--out", help="the site's folder (default <output root>/site)")
    ap.add_argument("--ui", default="http://localhost:5000", help="base URL of the MLflow UI the run links open")
    args = ap.parse_args(argv)
    import os
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        db = Path(args.output_root).resolve() / "mlflow.db"
        if not db.is_file():
            print(f"error: no MLflow store at sqlite:///{db} (--output-root {args.output_root}); give --output-root "
                  "or --uri. No site was written.", file=sys.stderr)
            return 1
        uri = f"sqlite:///{db}"
    out = Path(args.out or Path(args.output_root) / "site")
    try:
        summary = build(uri, out, ui=args.ui)
    except Exception as e:  # noqa: BLE001 - an unreachable server, a bad URI: all the same to the reader
        print(f"error: the MLflow store {tracking.redact(uri)} cannot be read ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}). No site was written.", file=sys.stderr)
        return 1
    if not summary["sweeps"]:
        print(f"note: no point run in {tracking.redact(uri)}: the index is empty", file=sys.stderr)
    print(f"site of {summary['sweeps']} sweep(s), {summary['runs']} run(s) from {tracking.redact(uri)}: "
          f"{out / 'index.html'} ({summary['timings']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
