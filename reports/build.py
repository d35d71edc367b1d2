"""A sweep's table, rebuilt from MLflow: `python reports/build.py sweep=NAME [preset=...] [key=value ...]`.

Give it the same overrides as the launch (`sweeps/run.py`): it composes the grid exactly as the launcher
does (sweeps/plan.py), so the points' signatures pick out the runs of *that* launch (a smoke
rehearsal and the real sweep share an experiment but not their signatures). Results are read from
MLflow only, never from job folders: the sweep's point runs in its experiment (core/tracking/bulk.py), FINISHED
point runs of the planned signatures. It prints the Markdown table and writes <sweep>.{md,tex,csv,html,png,svg} and
<sweep>_agreement.csv under `report_dir` (default <output_root>/reports/<sweep>).

`python reports/build.py --site [--output-root DIR | --uri URI] [--out DIR] [--ui URL]` builds instead one
static site over every sweep of the store (reports/site.py).

Exit codes: 0 = report written (possibly with missing points, footnoted); 1 = nothing to report (no
store, no experiment, or no finished run of the plan), nothing written; 2 = a config mistake.
"""
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from core.config import CONFIG_DIR, SEARCHPATH, ConfigError  # noqa: E402
from reports.table import Report  # noqa: E402

EXIT = {"code": 0}  # hydra.main drops the task's return value, so the exit code travels through here
REPORT_ONLY = ("report_dir",)  # overrides of this script that the launcher must not be given back


class NothingToReport(Exception):
    """No store, experiment or finished run: the message says where we looked and what to run."""


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))


def run_command(task_overrides: list[str]) -> str:
    """The launch that produces the runs this report looks for: the same overrides, minus report-only ones."""
    from sweeps.plan import override_key
    keep = [o for o in task_overrides if override_key(o) not in REPORT_ONLY]
    return " ".join(["python sweeps/run.py", *map(shlex.quote, keep)])


def tracking_uri(cfg: DictConfig) -> str:
    """The launcher's URI (core.tracking.resolve_uri), but a default SQLite store that does not exist yet
    is an error here: opening it would create an empty database, as if a sweep had been tracked there."""
    import os

    from core import tracking
    if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        db = Path(cfg.output_root).resolve() / "mlflow.db"
        if not db.is_file():
            raise NothingToReport(f"no MLflow store at sqlite:///{db} (output_root={cfg.output_root}).")
    return tracking.resolve_uri(cfg.tracking.uri, cfg.output_root)


def load_runs(uri: str, experiment: str, sweep: str, planned: list) -> pd.DataFrame:
    """One row per FINISHED point run of the plan (matched as a launch matches them: sweeps/plan.py match):
    reports/runs.py row_of (label, seed, run_id, the latest value of every metric, test_images, device_h,
    ...) and its signature; `attrs["cost_basis"]` says what a device is, `attrs["smoke"]` whether the runs
    are a preset=smoke rehearsal. Raises NothingToReport if the experiment is missing."""
    from core import tracking

    c = tracking.client(uri)
    try:
        exp = c.get_experiment_by_name(experiment)
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI: all the same to the reader
        raise NothingToReport(f"the MLflow store {tracking.redact(uri)} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}).") from None
    if exp is None or exp.lifecycle_stage == "deleted":  # never create or restore it: we only read
        raise NothingToReport(f"no experiment '{experiment}' in the MLflow store {tracking.redact(uri)}.")
    from sweeps.plan import match, matchable
    from core.tracking import bulk
    # params and metrics of the runs the plan can match only (not of the sweep's other variants in the experiment)
    points = bulk.runs(c, [exp.experiment_id], {tracking.TAG + "kind": "point", tracking.TAG + "sweep": sweep},
                       detail=matchable(planned))
    found = match(planned, points)                                 # the identity rules (core/tracking/identity.py)
    used = {run.info.run_id for run in found.values() if run.info.status == tracking.FINISHED}
    others = len({r.info.run_id for r in points if r.info.status == tracking.FINISHED} - used)
    from reports import runs as read
    rows, trainers, params, smoke = [], {}, [], False
    for pl in planned:
        run = found.get(id(pl))
        if run is None or run.info.status != tracking.FINISHED:
            continue
        params.append(read.params_of(run.data))
        smoke |= read.is_smoke(run.data.params)
        by = run.data.tags.get(tracking.TAG + "pretrained_by")
        if by and by not in trainers:
            try:
                t = c.get_run(by).data
                trainers[by] = (t.metrics, read.run_device_h(t.metrics, read.params_of(t), False), read.params_of(t))
            except Exception:  # noqa: BLE001 - a deleted trainer run: its evaluation still counts
                trainers[by] = ({}, float("nan"), {})
        if by:
            params.append(trainers[by][2])
        rows.append({**read.row_of(run, pl.point.label, pl.point.seed, trainers[by][:2] if by else None),
                     "signature": pl.signature})
    runs = pd.DataFrame(rows, columns=["label", "seed", "signature", "run_id"] if not rows else None)
    runs.attrs["other_finished"] = others
    runs.attrs["cost_basis"] = read.cost_basis(params)
    runs.attrs["smoke"] = smoke  # one rehearsal run among them makes the table no result
    return runs


def describe(planned: list) -> str:
    """What "ours" is, from the composed configs of the plan (reports/runs.py describe). Whether a point's
    method builds a teacher is known from the signature its run matched (sweeps/plan.py match), which spares the
    report importing the methods (and torch, ~1 s); only for points matched otherwise are the methods asked."""
    from reports import runs
    known = [pl.uses_teacher for pl in planned if pl.uses_teacher is not None]
    if len(known) < len(planned):
        from core import methods
        known = [methods.uses_teacher(pl.cfg) for pl in planned]
    return runs.describe([runs.as_params(pl.flat if pl.flat is not None else pl.cfg) for pl in planned],
                         uses_teacher=any(known), recipe_known=True)  # pl.flat: flattened once, when planned


def write(rep: Report, out_dir: Path) -> list[Path]:
    """<name>.{md,tex,csv,html,png,svg} and <name>_agreement.csv under out_dir."""
    from reports import figures, table

    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = figures.save(rep, ("png", "svg"))
    png = drawn["png"]
    files = {"md": table.to_markdown(rep), "tex": table.to_latex(rep), "csv": table.to_csv(rep),
             "html": table.to_html(rep, png),  # the page embeds the PNG: it can be mailed on its own
             "agreement.csv": agreement_csv(rep)}
    paths = []
    for ext, text in files.items():
        p = out_dir / (f"{rep.name}.{ext}" if "." not in ext else f"{rep.name}_{ext}")
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    for ext, data in drawn.items():
        p = out_dir / f"{rep.name}.{ext}"
        p.write_bytes(data)
        paths.append(p)
    return paths


def agreement_csv(rep: Report) -> str:
    """One row per (paper column, our metric): the numbers behind the verdict."""
    rows = [{"paper_column": a.column, "metric": a.metric, "stand_in": a.stand_in, "shared_rows": len(a.rows),
             "paper_best": " = ".join(a.paper_best), "our_best": " = ".join(a.our_best),
             "tau": "" if a.tau != a.tau else round(a.tau, 4),
             "paper_trend_tau": "" if a.paper_trend != a.paper_trend else round(a.paper_trend, 4),
             "our_trend_tau": "" if a.our_trend != a.our_trend else round(a.our_trend, 4),
             "within_noise_of_our_best": " ; ".join(a.tied), "verdict": a.line()} for a in rep.agreements]
    columns = ["paper_column", "metric", "stand_in", "shared_rows", "paper_best", "our_best", "tau",
               "paper_trend_tau", "our_trend_tau", "within_noise_of_our_best", "verdict"]
    return pd.DataFrame(rows, columns=columns).to_csv(index=False, lineterminator="\n")


def report(cfg: DictConfig, task_overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from sweeps.plan import plan
    from core import tracking
    from reports import table

    if cfg.get("sweep") is None:
        print(f"error: give sweep=NAME; available: {', '.join(available_sweeps())}", file=sys.stderr)
        return 2
    name, planned = plan(cfg, task_overrides, check=False)  # the launch checked them; torch is not imported
    spec = OmegaConf.to_container(cfg.sweep, resolve=True)
    try:
        table.check_compare(spec)  # a malformed report block stops before the store is read
    except ValueError as e:
        print(f"error: sweeps/conf/sweep/{name}.yaml: {e}", file=sys.stderr)
        return 2
    experiment = cfg.tracking.experiment or name
    command = run_command(task_overrides)
    try:
        uri = tracking_uri(cfg)
        runs = load_runs(uri, experiment, name, planned)
        if runs.empty:
            other = runs.attrs.get("other_finished", 0)
            hint = (f" It holds {other} finished run(s) of this sweep with other settings: give the overrides "
                    f"of their launch (preset=..., sweep.seeds=...)." if other else "")
            raise NothingToReport(f"none of the {len(planned)} point(s) of sweep {name} has a finished run "
                                  f"in experiment '{experiment}' at {tracking.redact(uri)}.{hint}")
    except NothingToReport as e:
        print(f"error: {e}\nTo run them: {command}\nNo report was written.", file=sys.stderr)
        return 1

    labels = list(dict.fromkeys(pl.point.label for pl in planned))  # grid order, one row per label
    have = [k for k in runs.columns if pd.to_numeric(runs[k], errors="coerce").notna().any()]
    agg = table.aggregate(runs, labels, metrics=list(table.metrics_of(spec, have)))
    try:
        rep = table.build(agg, spec, caption=describe(planned), missing=len(planned) - len(runs),
                          expected=len(planned), run_command=command, cost_basis=runs.attrs.get("cost_basis", ""),
                          smoke=runs.attrs.get("smoke", False))
    except ValueError as e:  # a malformed report block in the spec
        print(f"error: sweeps/conf/sweep/{name}.yaml: {e}", file=sys.stderr)
        return 2
    print(table.to_markdown(rep))
    out_dir = Path(cfg.get("report_dir") or Path(cfg.output_root) / "reports" / name)
    paths = write(rep, out_dir)
    print(f"{len(runs)}/{len(planned)} point(s) from experiment '{experiment}' at {tracking.redact(uri)}; wrote "
          f"{out_dir}/{name}.{{md,tex,csv,html,png,svg}} and {name}_agreement.csv", file=sys.stderr)
    attach(uri, experiment, name, paths)
    return 0


def attach(uri: str, experiment: str, sweep: str, paths: list[Path]) -> None:
    """The report's files -> the artifact folder `report/` of the sweep's latest launch run, where MLflow users
    look for them (best effort: the files on disk are the report)."""
    from core import tracking
    try:
        c = tracking.client(uri)
        launch = tracking.latest_launch(c, c.get_experiment_by_name(experiment).experiment_id, sweep)
    except Exception as e:  # noqa: BLE001
        print(f"note: the report was not attached in MLflow ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        return
    if launch is None:
        print(f"note: no launch run of {sweep} in '{experiment}': the report was not attached in MLflow", file=sys.stderr)
        return
    sent = tracking.attach_files(c, launch.info.run_id, {p.name: p for p in paths}, "report")
    print(f"attached {len(sent)} file(s) to the launch run {launch.info.run_id[:8]} (artifacts report/)", file=sys.stderr)


@hydra.main(version_base="1.3", config_path="../sweeps/conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        EXIT["code"] = report(cfg, list(HydraConfig.get().overrides.task))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        EXIT["code"] = 2


if __name__ == "__main__":
    from core.entry import finish, run
    if "--site" in sys.argv[1:] or sys.argv[1:2] == ["site"]:  # the site over every sweep of a store
        from reports import site
        run(site.main, [a for a in sys.argv[1:] if a not in ("--site", "site")])
    sys.argv.insert(1, SEARCHPATH)
    try:
        main()
    except SystemExit as e:  # Hydra's own errors
        finish(e.code)
    finish(EXIT["code"])
