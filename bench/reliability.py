"""Reliability under real faults, the long versions of tests/test_reliability.py; prints counts.

    python bench/reliability.py [--kills 20] [--concurrent 32] [--fault-kills 5]

- kills: launch a point, SIGKILL the whole process group at a random moment (start-up, training,
  evaluation), relaunch until it finishes; count corrupt resumes (a relaunch that fails), lost and
  doubled logged steps against steps 1..120, and runs whose values differ from an uninterrupted one;
- fault-kills: the same with the kill exactly between a checkpoint's rename and its metric flush;
- concurrent: N launches started together on one fresh default SQLite store; count failed launches,
  lost runs and a broken store.
Every launch runs with OMP_NUM_THREADS=1; the figures are counts, not timings.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TINY = ["preset=smoke", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "evaluate.floor=false"]
# 120 optimiser steps of a micro ViT (~10 s), a checkpoint every 5, a metric row every step.
POINT = [*TINY, "pretrain.epochs=20", "pretrain.max_steps=120", "pretrain.checkpoint_every=5", "pretrain.log_every=1",
         "data.train_limit=512", "data.test_limit=64", "evaluate.linear.epochs=1", "method.target=norm_pixel"]
# How a launch process is started: subprocess.Popen here; the tests fork theirs from a Python that has imported
# torch, timm and MLflow already (tests/conftest.py popen), which takes the same arguments.
SPAWN = subprocess.Popen
KEYS = ("train_loss", "lr", "progress")  # throughput is wall-clock: it differs between any two runs


def _env(**extra) -> dict:
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MIMSWEEP_FAULT", None) if "MIMSWEEP_FAULT" not in extra else None
    return env


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into KeyboardInterrupt.
    A shell starts background jobs (`cmd &`, CI runners) with SIGINT ignored, and exec keeps that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(out: Path, *extra: str, env: dict | None = None, uri: str | None = None) -> subprocess.Popen:
    given = {e.split("=", 1)[0] for e in extra}       # an extra replaces POINT's value: each key once
    args = [*(a for a in POINT if a.split("=", 1)[0] not in given), f"output_root={out}",
            *([f"tracking.uri={uri}"] if uri else []), *extra]
    return SPAWN([sys.executable, "sweeps/run.py", *args], cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=default_sigint)


def finish(out: Path, *extra: str, uri: str | None = None, tries: int = 3) -> str:
    """Relaunch until the point is FINISHED (what a user does after a crash)."""
    text = ""
    for _ in range(tries):
        p = launch(out, *extra, uri=uri)
        text += p.communicate(timeout=600)[0]
        if p.returncode == 0:
            return text
    raise AssertionError(text)


def point_run(uri: str):
    c = MlflowClient(uri)
    runs = [r for r in c.search_runs([e.experiment_id for e in c.search_experiments()])
            if r.data.tags.get("mimsweep.kind") == "point"]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return c, runs[0]


def history(uri: str) -> dict[str, list[tuple[int, float]]]:
    c, run = point_run(uri)
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, k)) for k in KEYS}


def counts(h: dict, total: int = 120) -> tuple[int, int]:
    """(lost, doubled) logged steps of train_loss against steps 1..total."""
    steps = [s for s, _ in h["train_loss"]]
    return len(set(range(1, total + 1)) - set(steps)), len(steps) - len(set(steps))


def kill_trials(n: int, reference: dict, fault: bool, root: Path) -> dict:
    tally = {"trials": n, "corrupt_resumes": 0, "lost_steps": 0, "doubled_steps": 0, "wrong_values": 0,
             "not_finished": 0}
    for i in range(n):
        out = root / f"{'fault' if fault else 'kill'}{i}"
        if fault:
            p = launch(out, env=_env(MIMSWEEP_FAULT=f"checkpoint.renamed@{1 + i % 20}"))
            p.communicate(timeout=600)
        else:
            p = launch(out)
            time.sleep(random.Random(i).uniform(5.0, 25.0))
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=60)
        try:
            finish(out, tries=1)
        except AssertionError:
            tally["corrupt_resumes"] += 1
            try:
                finish(out, tries=2)
            except AssertionError:
                tally["not_finished"] += 1
                continue
        h = history(f"sqlite:///{out / 'mlflow.db'}")
        lost, doubled = counts(h)
        tally["lost_steps"] += lost
        tally["doubled_steps"] += doubled
        tally["wrong_values"] += int(h != reference)
        print(f"  {'fault' if fault else 'kill'} {i}: lost {lost}, doubled {doubled}, "
              f"{'same' if h == reference else 'DIFFERENT'} values", flush=True)
    return tally


def concurrent(n: int, root: Path) -> dict:
    out = root / "concurrent"
    procs = [launch(out, f"seed={i}", "pretrain.max_steps=2", "tracking.experiment=concurrent") for i in range(n)]
    codes = [p.wait(timeout=3600) for p in procs]
    db = out / "mlflow.db"
    ok = sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    c = MlflowClient(f"sqlite:///{db}")
    exps = [e for e in c.search_experiments() if e.name == "concurrent"]
    runs = c.search_runs([e.experiment_id for e in exps], max_results=1000)
    points = [r for r in runs if r.data.tags.get("mimsweep.kind") == "point" and r.info.status == "FINISHED"]
    return {"launches": n, "failed_launches": sum(c != 0 for c in codes), "experiments": len(exps),
            "runs_lost": n - len(points), "store_intact": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--fault-kills", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=32)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mimsweep-reliability-"))
    t0 = time.time()
    finish(root / "reference")
    reference = history(f"sqlite:///{root / 'reference' / 'mlflow.db'}")
    print(f"reference: {counts(reference)} (lost, doubled) of 120 steps")
    if args.fault_kills:
        print("fault-kills (between checkpoint rename and metric flush):", kill_trials(args.fault_kills, reference, True, root))
    if args.kills:
        print("kill -9 at random moments:", kill_trials(args.kills, reference, False, root))
    if args.concurrent:
        print("concurrent launches on a fresh SQLite store:", concurrent(args.concurrent, root))
    print(f"total {time.time() - t0:.0f} s; work folders under {root}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
