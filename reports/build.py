"""A sweep's table, rebuilt from MLflow: `python reports/build.py sweep=NAME [preset=...] [key=value ...]`.

Give it the same overrides as the launch (`sweeps/run.py`): it composes the grid exactly as the launcher
does (sweeps/plan.py), so the points' signatures pick out the runs of *that* launch (a smoke
rehearsal and the real sweep share an experiment but not their signatures). Results are read from
MLflow only, never from job folders: one paged search of the sweep's experiment, FINISHED point runs of
the planned signatures. It prints the Markdown table and writes <sweep>.{md,tex,csv,html,png} under
`report_dir` (default <output_root>/reports/<sweep>).

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
VARIES = "varies"  # a caption value that differs between the points (it is what the sweep sweeps)


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


def devices(params: dict, evaluation: bool) -> int:
    """Devices one task of this run held: the SLURM profile's GPUs per task (`cluster.eval.*` for an
    evaluation task), 1 for a CPU job or a local run."""
    if params.get("cluster.backend") != "slurm":
        return 1
    try:
        return max(int(float(params.get("cluster.eval.gpus_per_task" if evaluation else "cluster.gpus_per_task")
                             or 0)), 1)
    except ValueError:  # "None": no GPUs asked for
        return 1


def run_device_h(metrics: dict, params: dict, evaluation_only: bool) -> float:
    """A run's own cost in device-hours: its wall time x devices per task. A run that evaluates another's
    pre-training costs its evaluation task; a pre-training task of its own (`pretrain_job_wall_s`, then an
    evaluation task's `wall_s`) counts both. NaN without a wall time (runs of old versions)."""
    wall = metrics.get("wall_s", float("nan"))
    if evaluation_only:
        return wall * devices(params, True) / 3600
    if "pretrain_job_wall_s" in metrics:  # pre-training and evaluation were separate tasks
        return (metrics["pretrain_job_wall_s"] * devices(params, False) + wall * devices(params, True)) / 3600
    return wall * devices(params, False) / 3600


def cost_basis(params: list[dict]) -> str:
    """The caption's word on what a device is, from the runs' cluster profiles."""
    said = []
    for pr in params:
        if pr.get("cluster.backend") != "slurm":
            text = "1 per local run"
        else:
            g = devices(pr, False)
            text = f"{g} GPU(s) per SLURM task" if str(pr.get("cluster.gpus_per_task")) not in ("0", "None") \
                else "1 per SLURM CPU job"
        if text not in said:
            said.append(text)
    return "; ".join(said)


def cluster_of(data) -> dict:
    """The run's cluster keys that devices() reads: tags `mimsweep.cluster.*` (they are no params: see
    core/tracking/runs.py), or the params of runs tracked before that."""
    from core import tracking
    tags = {k[len(tracking.TAG):]: v for k, v in data.tags.items() if k.startswith(tracking.TAG + "cluster.")}
    return tags or dict(data.params)


def load_runs(uri: str, experiment: str, sweep: str, planned: list) -> pd.DataFrame:
    """One row per FINISHED point run of the plan (matched as a launch matches them: sweeps/plan.py match):
    label, seed, signature, run_id and the latest value of every metric (a run that only evaluated another's
    pre-training also gets that run's metrics it lacks), its own `device_h`, and for such a run `pretrained_by`
    and the trainer's `pretrain_device_h`; `attrs["cost_basis"]` says what a device is. Raises NothingToReport
    if the experiment is missing."""
    from core import tracking

    c = tracking.client(uri)
    try:
        exp = c.get_experiment_by_name(experiment)
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI: all the same to the reader
        raise NothingToReport(f"the MLflow store {tracking.redact(uri)} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}).") from None
    if exp is None or exp.lifecycle_stage == "deleted":  # never create or restore it: we only read
        raise NothingToReport(f"no experiment '{experiment}' in the MLflow store {tracking.redact(uri)}.")
    from sweeps.plan import match
    points = tracking.point_runs(c, exp.experiment_id, sweep)   # one paged search for the sweep's tag
    found = match(planned, points)                                 # the identity rules (core/tracking/identity.py)
    used = {run.info.run_id for run in found.values() if run.info.status == tracking.FINISHED}
    others = len({r.info.run_id for r in points if r.info.status == tracking.FINISHED} - used)
    rows, trainers, params = [], {}, []
    for pl in planned:
        run = found.get(id(pl))
        if run is None or run.info.status != tracking.FINISHED:
            continue
        metrics = dict(run.data.metrics)
        by = run.data.tags.get(tracking.TAG + "pretrained_by")
        cost = {"device_h": run_device_h(metrics, cluster_of(run.data), bool(by))}
        params.append(cluster_of(run.data))
        if by:  # evaluation only: the pre-training's own figures (pretrain_wall_s, epoch_s, ...) are its trainer's
            if by not in trainers:
                try:
                    t = c.get_run(by).data
                    trainers[by] = (t.metrics, run_device_h(t.metrics, cluster_of(t), False), cluster_of(t))
                except Exception:  # noqa: BLE001 - a deleted trainer run: its evaluation still counts
                    trainers[by] = ({}, float("nan"), {})
            params.append(trainers[by][2])
            cost.update(pretrained_by=by, pretrain_device_h=trainers[by][1])
            metrics = {**trainers[by][0], **metrics}
        rows.append({"label": pl.point.label, "seed": pl.point.seed, "signature": pl.signature,
                     "run_id": run.info.run_id, **metrics, **cost})
    runs = pd.DataFrame(rows, columns=["label", "seed", "signature", "run_id"] if not rows else None)
    runs.attrs["other_finished"] = others
    runs.attrs["cost_basis"] = cost_basis(params)
    return runs


def describe(planned: list) -> str:
    """One line saying what "ours" is, from the composed configs; what differs between points is the
    swept setting and is said to vary rather than quoting the first point's value."""
    from omegaconf import OmegaConf

    def value(key: str):
        vals = {str(OmegaConf.select(pl.cfg, key)) for pl in planned}
        return vals.pop() if len(vals) == 1 else VARIES

    n_train, n_test = value("data.train_limit"), value("data.test_limit")
    steps = value("pretrain.max_steps")
    parts = [
        f"{value('model.name')} (depth {value('model.depth')}, width {value('model.embed_dim')}, "
        f"patch {value('model.patch_size')}, {value('model.input_size')} px)",
        f"method {value('method.name')}",
        f"{value('data.name')} ({'all' if n_train == 'None' else n_train} train / "
        f"{'all' if n_test == 'None' else n_test} test images)",
        ("epochs swept" if value("pretrain.epochs") == VARIES else f"{value('pretrain.epochs')} epoch(s)")
        + ("" if steps == "None" else f", at most {steps} steps")
        + f", batch {value('pretrain.batch_size')}",
    ]
    from core import methods
    if any(methods.uses_teacher(pl.cfg) for pl in planned):
        parts.append(f"teacher {value('teacher.model')} ({value('teacher.pretrained')})")
    parts.append(f"target {value('method.target')}")
    if value("task") == "flops":
        del parts[2:4]  # no data is read and nothing is trained
        parts.append("FLOPs per image of the transformer blocks, counted by torch's FlopCounterMode, beside "
                     "the paper's cost model")
    else:
        parts.append(f"k-NN / linear: top-1 % on frozen {value('evaluate.pool')}-pooled features "
                     f"(k-NN k={value('evaluate.knn.k')}, linear probe {value('evaluate.linear.epochs')} ep)")
        protocols = {p for pl in planned for p in (OmegaConf.select(pl.cfg, "evaluate.protocols") or [])}
        if "finetune" in protocols:
            parts.append(f"fine-tune: {value('evaluate.finetune.epochs')} ep end to end, "
                         f"{value('evaluate.finetune.pool')} pool")
        if "seg_linear" in protocols:
            parts.append(f"seg. mIoU: 1x1-conv probe on frozen block {value('evaluate.seg_linear.layer')} features")
    return "; ".join(parts) + "."


def write(rep: Report, out_dir: Path) -> list[Path]:
    from reports import table

    out_dir.mkdir(parents=True, exist_ok=True)
    png = table.plot(rep)
    files = {"md": table.to_markdown(rep), "tex": table.to_latex(rep), "csv": table.to_csv(rep),
             "html": table.to_html(rep, png)}  # the page embeds the PNG: it can be mailed on its own
    paths = []
    for ext, text in files.items():
        p = out_dir / f"{rep.name}.{ext}"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    p = out_dir / f"{rep.name}.png"
    p.write_bytes(png)
    return paths + [p]


def report(cfg: DictConfig, task_overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from sweeps.plan import plan
    from core import tracking
    from reports import table

    if cfg.get("sweep") is None:
        print(f"error: give sweep=NAME; available: {', '.join(available_sweeps())}", file=sys.stderr)
        return 2
    name, planned = plan(cfg, task_overrides)
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
                          expected=len(planned), run_command=command, cost_basis=runs.attrs.get("cost_basis", ""))
    except ValueError as e:  # a malformed report block in the spec
        print(f"error: sweeps/conf/sweep/{name}.yaml: {e}", file=sys.stderr)
        return 2
    print(table.to_markdown(rep))
    out_dir = Path(cfg.get("report_dir") or Path(cfg.output_root) / "reports" / name)
    paths = write(rep, out_dir)
    print(f"{len(runs)}/{len(planned)} point(s) from experiment '{experiment}' at {tracking.redact(uri)}; wrote "
          f"{out_dir}/{name}.{{md,tex,csv,html,png}}", file=sys.stderr)
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
    sys.argv.insert(1, SEARCHPATH)
    main()
    sys.exit(EXIT["code"])
