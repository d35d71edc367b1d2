"""Status, tail and cancel for a sweep's points: one MLflow search and one squeue/sacct call a refresh.

    python cluster/status.py sweep=mcm_mask_ratio [preset=...] [other overrides of the launch]
    python cluster/status.py sweep=mcm_mask_ratio --tail 75%        # last lines of that point's log
    python cluster/status.py sweep=mcm_mask_ratio --cancel 75%      # scancel one point (or: all)

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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="sweep=NAME and the launch's other overrides")
    ap.add_argument("--tail", metavar="LABEL", help="print the end of this point's SLURM logs (or: all)")
    ap.add_argument("--cancel", metavar="LABEL", help="scancel this point's jobs and mark its run KILLED (or: all)")
    ap.add_argument("--lines", type=int, default=30)
    args = ap.parse_args(argv)
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
        else:
            show(name, rows, uri)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
