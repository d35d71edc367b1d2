"""How long a launch and a status table take, as a user runs them: the three figures of issue 19, item 7.

    python bench/launch_latency.py                 # 4-point submission, 1,000-point submission, status table
    python bench/launch_latency.py --points 200    # a smaller big grid
    python bench/launch_latency.py --repeat 3      # the median of 3 of each

Each figure is the wall time of a fresh `python sweeps/run.py ...` / `python cluster/status.py ...` process
against the local SLURM cluster (`bash cluster/local_slurm.sh up`), with the CPU time that process used
(user + system, its children included) and the 1-minute load average before it: on a shared machine the
wall time grows with the load, the CPU time much less. The targets hold on a quiet machine:

1. a 4-point smoke sweep submitted as one array, into a new output_root (a new SQLite store): <= 5 s;
2. a `--points`-point grid (default 1,000: 10 mask ratios x 100 seeds) submitted as one array: <= 15 s;
3. `cluster/status.py` of the 4-point sweep: <= 3 s.

The jobs it submits are cancelled (by their ids) as soon as they are queued; the output roots are temporary.
The machine's fp32 matmul rate (bench/throughput.py) is printed beside the figures.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["sweep=mcm_mask_ratio", "preset=smoke", "cluster=slurm", "cluster.cpus_per_task=1", "cluster.mem_gb=1"]


def timed(args: list[str], env: dict) -> tuple[float, float, str, float]:
    """(wall s, CPU s, stdout, load average before) of `python ARGS` from the repository."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != 0:
        raise SystemExit(f"`python {' '.join(args)}` failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return wall, cpu, res.stdout, load


def cancel(stdout: str) -> None:
    """scancel the arrays this submission queued (their ids, from its own output)."""
    m = re.search(r"array job\(s\): ([\d, ]+)", stdout)
    if m:
        subprocess.run(["scancel", *[j.strip() for j in m.group(1).split(",") if j.strip()]], capture_output=True)


def matmul_gflops() -> float:
    import torch

    from bench.throughput import matmul_peak
    return matmul_peak(torch.device("cpu"), torch.float32, 1024, seconds=0.5, trials=2) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1000, help="points of the big grid (10 mask ratios x N/10 seeds)")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    if shutil.which("sbatch") is None or subprocess.run(["scontrol", "ping"], capture_output=True).returncode:
        print("no SLURM cluster answers here: start the local one with `bash cluster/local_slurm.sh up`", file=sys.stderr)
        return 2
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    ratios = "[" + ",".join(f"{0.5 + 0.05 * i:.2f}" for i in range(10)) + "]"
    seeds = "[" + ",".join(str(s) for s in range(max(args.points // 10, 1))) + "]"
    rows: dict[str, list] = {"4-point submission (new store)": [], "4-point submission (existing store)": [],
                             f"{args.points}-point submission": [], "status table (4 points)": []}
    # a task that started before its cancel may still write there: a leftover is no failure of the bench
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        for r in range(args.repeat):
            out = Path(tmp) / f"r{r}"
            wall, cpu, stdout, load = timed(["sweeps/run.py", *SMOKE, f"output_root={out}"], env)
            cancel(stdout)
            rows["4-point submission (new store)"].append((wall, cpu, load))
            wall, cpu, stdout, load = timed(["sweeps/run.py", "sweep=mcm_decoder_depth", *SMOKE[1:],
                                             f"output_root={out}"], env)
            cancel(stdout)
            rows["4-point submission (existing store)"].append((wall, cpu, load))
            wall, cpu, _, load = timed(["cluster/status.py", *SMOKE, f"output_root={out}"], env)
            rows["status table (4 points)"].append((wall, cpu, load))
            wall, cpu, stdout, load = timed(["sweeps/run.py", *SMOKE, f"sweep.grid={{method.mask_ratio:{ratios}}}",
                                             f"sweep.seeds={seeds}", f"output_root={out}-big"], env)
            cancel(stdout)
            assert f"queued {args.points} point(s) as 1 array job(s)" in stdout, stdout[-500:]
            rows[f"{args.points}-point submission"].append((wall, cpu, load))
    print(f"this machine: {os.cpu_count()} CPUs, fp32 matmul {matmul_gflops():.0f} GFLOP/s (bench/throughput.py)")
    print(f"{'':38s} {'wall':>8s} {'CPU':>8s} {'load before':>12s}")
    for name, got in rows.items():
        med = lambda i: statistics.median(g[i] for g in got)  # noqa: E731
        print(f"{name:38s} {med(0):7.1f}s {med(1):7.1f}s {med(2):12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
