"""How long the site over a big store and one sweep's report take to build.

    python bench/site_scale.py [--store /tmp/mimsweep_site_scale] [--runs 10000] [--sweeps 200] [--history 50]

Builds once (and keeps, under --store) a synthetic MLflow store on SQLite through MLflow's own client:
`--sweeps` sweeps of `--runs` point runs in all, each sweep one of the shipped sweep files (its labels, its
paper numbers) under a launch of its own overrides (a new `pretrain.base_lr` per variant), each point run
with the params of a real composed config (108 keys), the tags a launch sets, its final metrics and a
metric history of `--history` logged steps for train_loss, lr, throughput_img_s and progress; a few sweeps
have running and failed points. One sweep (`mcm_mask_ratio` with no override, 13 seeds) carries the real
signatures of its plan, so `reports/build.py` finds it as it finds a real launch.

Then it prints, with the load average beside each: the store's creation time (measured when it was made),
the site build (`reports/site.py build`: the whole store read, every page written), the same build again,
and one sweep's report (`reports/build.py report`, in-process: plan, search, table, figure, files) twice.
Before the first site build and the first report the database file is dropped from the page cache
(`posix_fadvise(DONTNEED)`, no privileges needed), so the first figure of each is a read from disk, as after a
reboot or on a store nobody has read for a while, and the second one a read from memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPORTED = "mcm_mask_ratio"      # the sweep whose report is timed
REPORTED_SEEDS = 13              # 4 labels x 13 seeds = 52 points, 50 of them with a run
LAYOUT = 2                       # of the synthetic store: a cached store of another layout is made again


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f}, {os.cpu_count()} CPUs"


def evict(path: Path) -> str:
    """Drop the file's pages from the page cache (the next read of it comes from disk); says so."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped
        size = os.fstat(f.fileno()).st_size
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return f"{size / 1e6:.0f} MB database dropped from the page cache"


def specs() -> dict[str, dict]:
    from omegaconf import OmegaConf

    from core.config import CONFIG_DIR
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in sorted((CONFIG_DIR / "sweep").glob("*.yaml"))}


def real_plan(out: Path):
    """The plan of the timed sweep (its runs must carry these signatures) and its Hydra overrides."""
    from hydra import compose, initialize_config_dir

    from core.config import CONFIG_DIR, SEARCHPATH
    from sweeps.plan import plan
    overrides = [f"sweep={REPORTED}", f"output_root={out}", f"sweep.seeds=[{','.join(map(str, range(REPORTED_SEEDS)))}]"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[SEARCHPATH, *overrides], return_hydra_config=False)
        _, planned = plan(cfg, overrides)
    return planned, overrides


def signed_by_this_checkout(out: Path) -> int:
    """The timed sweep's point runs carry the signatures of this checkout's plan (a cached store was made by
    an earlier one, whose configs may hash differently: the report would find none of its runs). -> runs
    re-tagged."""
    from mlflow.tracking import MlflowClient

    from core.tracking import TAG, bulk
    c = MlflowClient(f"sqlite:///{out}/mlflow.db")
    planned, _ = real_plan(out)
    by_point = {(pl.point.label, str(pl.point.seed)): pl for pl in planned}
    exp = c.get_experiment_by_name(REPORTED).experiment_id
    runs = bulk.runs(c, [exp], {TAG + "sweep": REPORTED})
    plain = {r.info.run_id for r in runs if r.data.tags.get(TAG + "kind") == "launch"
             and json.loads(r.data.tags.get(TAG + "overrides", "[]")) == []}
    tags = {}
    for r in runs:
        pl = by_point.get((r.data.tags.get(TAG + "label"), r.data.params.get("seed")))
        if r.data.tags.get("mlflow.parentRunId") in plain and pl:
            want = {TAG + "pretrain_signature": pl.signature, TAG + "eval_signature": pl.eval_sig,
                    TAG + "signature": pl.legacy_sig}
            if any(r.data.tags.get(k) != v for k, v in want.items()):
                tags[r.info.run_id] = want
    bulk.set_tags(c, tags)
    return len(tags)


def make_store(out: Path, n_runs: int, n_sweeps: int, history: int) -> float:
    """Create the synthetic store; returns the seconds it took."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from core import tracking
    from reports import runs as read

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out}/mlflow.db"
    tracking.open_store(uri, create=True)
    c = MlflowClient(uri)
    planned, _ = real_plan(out)
    base_params = read.as_params(planned[0].cfg)
    by_point = {(pl.point.label, pl.point.seed): pl for pl in planned}
    all_specs = specs()
    names = list(all_specs)
    rng = random.Random(0)
    per_sweep = [n_runs // n_sweeps + (i < n_runs % n_sweeps) for i in range(n_sweeps)]
    experiments: dict[str, str] = {}
    now = int(time.time() * 1000) - n_runs * 1000
    made = 0
    for i in range(n_sweeps):
        name, variant = names[i % len(names)], i // len(names)   # sweep file, then its n-th launch variant
        spec = all_specs[name]
        if name not in experiments:
            experiments[name] = c.create_experiment(name)
        exp = experiments[name]
        overrides = [] if variant == 0 else [f"pretrain.base_lr={1e-3 * (1 + variant / 10):g}"]
        launch = c.create_run(exp, run_name=f"{name} launch", start_time=now, tags={
            "mimsweep.kind": "launch", "mimsweep.sweep": name, "mimsweep.overrides": json.dumps(overrides)}).info.run_id
        c.set_terminated(launch, "FINISHED", end_time=now + 1000)
        from sweeps.grid import expand
        labels = list(dict.fromkeys(p.label for p in expand(spec)))
        reference = ((spec.get("report") or {}).get("reference") or {}).get("rows") or {}
        live = i % 10 == 5                     # every tenth sweep is still running, with a failed point
        for k in range(per_sweep[i]):
            label, seed = labels[k % len(labels)], k // len(labels)
            pl = by_point.get((label, seed)) if name == REPORTED and variant == 0 else None
            level = 70 + 2 * math.sin(k) + (sum(v or 0 for v in reference.get(label, [])) % 3)
            status = "FINISHED"
            if live and k >= per_sweep[i] - 3:
                status = "RUNNING" if k < per_sweep[i] - 1 else "FAILED"
            start = now + made * 1000
            tags = {"mimsweep.kind": "point", "mimsweep.sweep": name, "mimsweep.label": label,
                    "mimsweep.pretrain_signature": pl.signature if pl else f"s{i:03d}{k:04d}",
                    "mimsweep.eval_signature": pl.eval_sig if pl else "e0",
                    "mimsweep.signature": pl.legacy_sig if pl else f"l{i:03d}{k:04d}",
                    "mimsweep.overrides": json.dumps([f"seed={seed}"]), "mimsweep.git_commit": "0" * 40,
                    "mimsweep.git_dirty": "False", "mimsweep.host": "bench", "mlflow.parentRunId": launch,
                    "mimsweep.workdir": f"/tmp/bench/{i}/{k}", "mlflow.source.git.commit": "0" * 40}
            run = c.create_run(exp, run_name=f"{label} seed={seed}", start_time=start, tags=tags).info.run_id
            params = {**base_params, "seed": str(seed), "pretrain.base_lr": str(1e-3 * (1 + variant / 10))}
            if pl:
                params = read.as_params(pl.cfg)
            steps = history if status != "RUNNING" else history // 2
            metrics = []
            for s in range(steps):
                ts = start + 100 * s
                metrics += [Metric("train_loss", 1.0 / (1 + 0.1 * s) + 0.01 * rng.random(), ts, 10 * s),
                            Metric("lr", 1e-3 * (1 - s / history), ts, 10 * s),
                            Metric("throughput_img_s", 150 + rng.random(), ts, 10 * s),
                            Metric("progress", (s + 1) / history, ts, 10 * s)]
            if status == "FINISHED":
                final = {"knn_top1": level + rng.random(), "linear_top1": level + 6 + rng.random(),
                         "floor_knn_top1": 61.65, "floor_linear_top1": 75.9, "wall_s": 400 + 10 * rng.random(),
                         "pretrain_wall_s": 300.0, "epoch_s": 150 + rng.random(), "finetune_top1": level - 5,
                         "gflops_train": 10 + k % 7, "cost_gflops_train": 10 + k % 7,
                         "gflops_infer": 12 + k % 7, "cost_gflops_infer": 12 + k % 7}
                metrics += [Metric(key, v, start + 100 * steps, 0) for key, v in final.items()]
            items = [Param(key, v) for key, v in params.items()]
            c.log_batch(run, metrics=metrics[:1000], params=items[:100])
            if items[100:] or metrics[1000:]:
                c.log_batch(run, metrics=metrics[1000:], params=items[100:])
            if status != "RUNNING":
                c.set_terminated(run, status, end_time=start + 100 * steps + 500)
            made += 1
            if made % 500 == 0:
                print(f"  {made}/{n_runs} runs, {time.time() - t0:.0f} s", flush=True)
    took = time.time() - t0
    (out / "created.json").write_text(json.dumps({"layout": LAYOUT, "runs": n_runs, "sweeps": n_sweeps, "history": history,
                                                   "seconds": took, "load": load()}))
    return took


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="/tmp/mimsweep_site_scale", help="folder of the cached synthetic store")
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--sweeps", type=int, default=200)
    ap.add_argument("--history", type=int, default=50, help="logged steps per point run")
    ap.add_argument("--repeat", type=int, default=2, help="site builds to time")
    args = ap.parse_args(argv)
    out = Path(args.store)
    made = out / "created.json"
    info = json.loads(made.read_text()) if made.is_file() else {}
    if [info.get(k) for k in ("layout", "runs", "sweeps", "history")] == [LAYOUT, args.runs, args.sweeps, args.history]:
        print(f"store: {out}/mlflow.db (cached): {info['runs']} runs in {info['sweeps']} sweeps, created in "
              f"{info['seconds']:.0f} s ({info['load']}); {signed_by_this_checkout(out)} runs of {REPORTED} "
              "re-tagged with this checkout's signatures")
    else:
        if out.exists():
            import shutil
            shutil.rmtree(out)
        print(f"creating {args.runs} runs in {args.sweeps} sweeps under {out} ...", flush=True)
        took = make_store(out, args.runs, args.sweeps, args.history)
        print(f"store created in {took:.0f} s ({load()})")
    uri = f"sqlite:///{out}/mlflow.db"

    from reports import site
    for i in range(args.repeat):
        cold = f"cold: {evict(out / 'mlflow.db')}" if i == 0 else "warm"
        t = time.perf_counter()
        summary = site.build(uri, out / "site", ui="http://localhost:5000")
        took = time.perf_counter() - t
        print(f"site build {i + 1} ({cold}): {took:.2f} s for {summary['runs']} runs in {summary['sweeps']} sweeps "
              f"({summary['timings']}; {load()})", flush=True)

    from hydra import compose, initialize_config_dir

    from core.config import CONFIG_DIR, SEARCHPATH
    from reports.build import report
    _, overrides = real_plan(out)
    overrides.append(f"report_dir={out}/report")
    for i in range(args.repeat):
        cold = f"cold: {evict(out / 'mlflow.db')}" if i == 0 else "warm"
        t = time.perf_counter()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[SEARCHPATH, *overrides])
            import contextlib
            import io
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                code = report(cfg, overrides)
        took = time.perf_counter() - t
        print(f"one sweep's report ({REPORTED}, {REPORTED_SEEDS} seeds x 4 rows; {cold}): {took:.2f} s, exit {code} "
              f"({err.getvalue().strip().splitlines()[-1][:120] if err.getvalue().strip() else ''}; {load()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
