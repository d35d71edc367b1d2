"""Status, tail and cancel for a sweep's points: one MLflow search and one squeue/sacct call a refresh.

    python cluster/status.py sweep=mcm_mask_ratio [preset=...] [other overrides of the launch]
    python cluster/status.py sweep=mcm_mask_ratio --tail 75%        # last lines of that point's log
    python cluster/status.py sweep=mcm_mask_ratio --cancel 75%      # scancel one point (or: all)
    python cluster/status.py sweep=mcm_mask_ratio --watch [--every 5]  # refresh until nothing is queued or running

The overrides select the same grid as the launch did (the signatures must match), as for reports.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from core.config import CONFIG_DIR, SEARCHPATH, ConfigError  # noqa: E402


def compose_top(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3")
    return compose(config_name="config", overrides=[SEARCHPATH, *overrides])


def gather(cfg, overrides: list[str]):
    """-> (sweep name, [(Planned, run or None, slurm job ids, slurm state)], uri)."""
    from cluster import launch, slurm
    from core import tracking
    from sweeps.plan import decide, match, plan

    name, planned = plan(cfg, overrides, check=False)  # the launch checked the points; no torch needed here
    uri = tracking.resolve_uri(cfg.tracking.uri, cfg.output_root)
    c = launch.check_tracking(uri, create=False)  # status never creates a store
    exp = c.get_experiment_by_name(cfg.tracking.experiment or name) if c is not None else None
    runs = tracking.point_runs(c, exp.experiment_id, name) if exp else []
    decide(planned, runs)
    found = match(planned, runs)
    jobs = [j for pl in planned for j in pl.slurm_jobs]
    states = slurm.queue_states(jobs) if jobs and shutil.which("squeue") else {}
    rows = []
    for pl in planned:
        run = found.get(id(pl))
        rows.append((pl, run, list(pl.slurm_jobs), [states.get(j, "-") for j in pl.slurm_jobs]))
    return name, rows, uri


def show(name: str, rows, uri: str) -> None:
    from core import tracking
    print(f"sweep {name} (MLflow {tracking.redact(uri)})")
    print(f"  {'point':22s} {'seed':>4s} {'signature':12s} {'mlflow':9s} {'slurm':24s} {'progress':>8s} "
          f"{'loss':>8s} {'knn':>6s} {'linear':>6s} {'time / estimate':>16s}")
    for pl, run, jobs, states in rows:
        m = run.data.metrics if run else {}
        slurm_col = ",".join(f"{j}:{s}" for j, s in zip(jobs, states)) or "-"
        prog = f"{100 * m['progress']:.0f}%" if "progress" in m else "-"
        fmt = lambda k, f: format(m[k], f) if k in m else "-"  # noqa: E731
        est = run.data.tags.get(tracking.TAG + "estimate_s") if run else None   # cluster/estimate.py, at launch
        took = f"{fmt('wall_s', '.0f')} s / {est + ' s' if est else '-'}"
        print(f"  {pl.point.label:22s} {pl.point.seed:>4d} {pl.signature:12s} "
              f"{(run.info.status if run else 'absent'):9s} {slurm_col:24s} {prog:>8s} "
              f"{fmt('train_loss', '.4f'):>8s} {fmt('knn_top1', '.1f'):>6s} {fmt('linear_top1', '.1f'):>6s} "
              f"{took:>16s}")


def _select(rows, label: str):
    chosen = rows if label == "all" else [r for r in rows if r[0].point.label == label]
    if not chosen:
        raise ConfigError("--label", label, "names no point of this sweep; labels: "
                          + ", ".join(sorted({r[0].point.label for r in rows})))
    return chosen


def tail(rows, label: str, cfg, lines: int = 30) -> None:
    root = Path(cfg.output_root).resolve() / "runs"
    for pl, run, jobs, _ in _select(rows, label):
        for job in jobs:
            logs = sorted(root.glob(f"*/slurm/*/logs/{job}.out")) + sorted(root.glob(f"*/slurm/*/logs/{job}.err"))
            for log in logs:
                print(f"==> {log} <==")
                print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        if not jobs:
            print(f"{pl.point.label}: no SLURM job recorded for this point")


def cancel(rows, label: str, uri: str, wait_s: float = 120) -> None:
    """scancel the live tasks, wait until they have left the queue (a task checkpoints and writes its last
    MLflow update on SIGTERM), then mark the runs KILLED, so that nothing the task wrote comes after."""
    from cluster.slurm import ACTIVE, queue_states
    from core import tracking
    c = tracking.client(uri)
    chosen = _select(rows, label)
    live = [j for _, _, jobs, states in chosen for j, s in zip(jobs, states) if s in ACTIVE]
    if live:
        subprocess.run(["scancel", *live], check=False)
        deadline = time.time() + wait_s
        while time.time() < deadline and any(s in ACTIVE for s in queue_states(live).values()):
            time.sleep(1)
    for pl, run, jobs, states in chosen:
        mine = [j for j in jobs if j in live]
        if mine:
            print(f"cancelled {pl.point.label}: {' '.join(mine)}")
        if run and run.info.status in ("RUNNING", "SCHEDULED"):
            tracking.set_status(c, run.info.run_id, "KILLED", "cancelled by the user")


# ---- --watch: a loop around gather + show, plus the running points' progress ---------------------------

def active(row) -> bool:
    """A point still queued or running: its run, or one of its SLURM tasks."""
    from cluster.slurm import ACTIVE
    _, run, _, states = row
    return bool(run and run.info.status in ("RUNNING", "SCHEDULED")) or any(s in ACTIVE for s in states)


def launching(uri: str, experiment: str, sweep: str) -> str | None:
    """The id of a launch of this sweep still running, if any: a local launch creates some point runs only as
    their jobs start, so no queued run or SLURM task stands for them yet. A launch run of this host whose
    process is gone (killed with -9) does not count; the next launch marks it FAILED."""
    import os
    import socket

    from cluster.launch import check_tracking
    from core import tracking
    c = check_tracking(uri, create=False)  # never creates a store
    exp = c.get_experiment_by_name(experiment) if c is not None else None
    if exp is None:
        return None
    for r in c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG}kind` = 'launch' and "
                           f"tags.`{tracking.TAG}sweep` = '{sweep}' and attributes.status = 'RUNNING'"):
        tags = r.data.tags
        if tags.get(tracking.TAG + "host") == socket.gethostname() and tags.get(tracking.TAG + "pid", "").isdigit():
            try:
                os.kill(int(tags[tracking.TAG + "pid"]), 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass  # someone else's live process
        return r.info.run_id
    return None


def show_live(rows, uri: str, file=sys.stdout) -> None:
    """Step, loss, rate and time left of each running point, from its train_loss history (cluster/progress.py)."""
    from cluster import progress
    from core import tracking
    running = [(pl, run) for pl, run, _, _ in rows if run and run.info.status == "RUNNING"]
    if not running:
        return
    hist = progress.histories(tracking.client(uri), [run.info.run_id for _, run in running])
    print(f"  running: {'point':22s} {'seed':>4s} {'step':>7s} {'done':>5s} {'loss':>8s} {'steps/s':>7s} "
          f"{'ETA (pre-training)':>18s}", file=file)
    for pl, run in running:
        p = progress.progress_of(run, hist.get(run.info.run_id, []))
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"           {pl.point.label:22s} {pl.point.seed:>4d} {fmt(p.step, 'd'):>7s} "
              f"{'-' if p.fraction is None else f'{100 * p.fraction:.0f}%':>5s} {fmt(p.loss, '.4f'):>8s} "
              f"{fmt(p.steps_per_s, '.2f'):>7s} {progress.fmt_duration(p.eta_s):>18s}", file=file)


def watch(cfg, overrides: list[str], every: float = 5.0, file=sys.stdout) -> int:
    """Refresh the table every `every` seconds until no point is queued or running (Ctrl-C stops it too)."""
    clear = "\033[H\033[2J" if file.isatty() else ""
    try:
        while True:
            name, rows, uri = gather(cfg, overrides)
            print(clear + time.strftime("%H:%M:%S"), file=file)
            show(name, rows, uri)
            show_live(rows, uri, file)
            if not any(active(r) for r in rows):
                parent = launching(uri, cfg.tracking.experiment or name, name)
                if parent is None:
                    print(f"nothing queued or running in sweep {name}: done watching", file=file)
                    return 0
                print(f"  the launch (run {parent[:8]}) is still running: its next points start later", file=file)
            file.flush()
            time.sleep(every)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="sweep=NAME and the launch's other overrides")
    ap.add_argument("--tail", metavar="LABEL", help="print the end of this point's SLURM logs (or: all)")
    ap.add_argument("--cancel", metavar="LABEL", help="scancel this point's jobs and mark its run KILLED (or: all)")
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--watch", action="store_true", help="refresh the table, with step / loss / ETA of each "
                                                         "running point, until nothing is queued or running")
    ap.add_argument("--every", type=float, default=5.0, metavar="SECONDS", help="--watch's refresh interval")
    args = ap.parse_args(argv)
    if args.every <= 0:
        print(f"error: --every={args.every} must be a positive number of seconds", file=sys.stderr)
        return 2
    if not any(o.startswith("sweep=") for o in args.overrides):
        print("error: give sweep=NAME", file=sys.stderr)
        return 2
    try:
        cfg = compose_top(args.overrides)
        OmegaConf.resolve(cfg)
        name, rows, uri = gather(cfg, args.overrides)
        if args.tail:
            tail(rows, args.tail, cfg, args.lines)
        elif args.cancel:
            cancel(rows, args.cancel, uri)
        elif args.watch:
            return watch(cfg, args.overrides, args.every)
        else:
            show(name, rows, uri)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from core.entry import run
    run(main, sys.argv[1:])
