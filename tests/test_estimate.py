"""Time estimates (issue 19, item 2): the plan says how long each point and the sweep will take on this machine,
and the end-of-sweep summary shows the estimate beside what it took (cluster/estimate.py).

The accuracy test runs the smoke preset for real, with an empty timing cache (so the launch times the points'
shape itself) and asserts every point's wall time is within a factor of 1.5 of its estimate, the sweep's too.
"""
from __future__ import annotations

import re

import pytest

from tests.conftest import TINY, replacing, run_cli

FACTOR = 1.5


def _summary(stdout: str) -> tuple[dict, tuple[float, float]]:
    """{point: (wall s, estimate s)} and (sweep wall, sweep estimate) from the summary a local sweep ends with."""
    lines = stdout[stdout.index("\nsummary"):].strip().splitlines()
    head = lines[1].split()
    assert head[-2:] == ["wall", "estimate"], lines
    rows = {}
    for line in lines[2:]:
        if line.startswith("sweep:") or line.startswith("next:"):
            break
        cells = line.split()
        rows[cells[0]] = (float(cells[-4]), float(cells[-2]))
    m = re.search(r"^sweep: (\d+) s \(estimate (\d+) s\)$", stdout, re.M)
    assert m, stdout[-1500:]
    return rows, (float(m.group(1)), float(m.group(2)))


@pytest.mark.alone  # measured against a timing taken at launch: other tests' load would change it midway
def test_the_smoke_sweep_takes_what_its_plan_said_within_a_factor_of_1_5(tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "preset=smoke", f"output_root={tmp_path / 'out'}",
                  env={"MIMSWEEP_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    plan = re.findall(r"^  new +(\S+) +seed=0 .*, ~(\d+) s$", res.stdout, re.M)
    assert len(plan) == 4, res.stdout[:3000]                      # every point of the plan has its estimate
    assert re.search(r"^estimate: .* for 4 point\(s\), 2 at a time .* timed on this machine just now", res.stdout,
                     re.M), res.stdout[:3000]
    rows, (wall, est) = _summary(res.stdout)
    print("point: wall / estimate  " + ", ".join(f"{p}: {w:.0f} / {e:.0f} s" for p, (w, e) in rows.items())
          + f"; sweep {wall:.0f} / {est:.0f} s")
    assert set(rows) == {p for p, _ in plan}
    for point, (w, e) in rows.items():
        assert 1 / FACTOR <= w / e <= FACTOR, (point, w, e)
    assert 1 / FACTOR <= wall / est <= FACTOR, (wall, est)
    assert (tmp_path / "cache" / "timings.json").is_file()
    # status.py shows each point's job time beside its estimate (the tag the launch wrote), as for SLURM sweeps
    status = run_cli("cluster/status.py", "sweep=mcm_mask_ratio", "preset=smoke", f"output_root={tmp_path / 'out'}")
    assert status.returncode == 0, status.stderr
    shown = re.findall(r"(\d+) s / (\d+) s$", status.stdout, re.M)
    assert len(shown) == 4, status.stdout
    # the same shape again: the timing comes from the cache, the plan is printed without timing anything
    again = run_cli("sweeps/run.py", "sweep=mcm_decoder_depth", "preset=smoke", "dry_run=true",
                    f"output_root={tmp_path / 'out'}", env={"MIMSWEEP_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr
    assert "timed on this machine (cached)" in again.stdout, again.stdout   # one timing per model/method/batch


def test_estimate_false_and_slurm_without_timings_print_no_figure(tmp_path):
    off = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *TINY, "dry_run=true",  # TINY says estimate=false
                  f"output_root={tmp_path / 'o'}", env={"MIMSWEEP_CACHE": str(tmp_path / "cache")})
    assert off.returncode == 0, off.stderr
    assert "estimate:" not in off.stdout and ", ~" not in off.stdout
    assert not (tmp_path / "cache").exists()                       # nothing timed, nothing cached
    bad = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *replacing(TINY, "estimate=maybe"), "dry_run=true",
                  f"output_root={tmp_path / 'o'}")
    assert bad.returncode == 2 and bad.stderr.startswith("error: estimate=")


def test_the_sweep_total_follows_the_parallelism_and_waits_for_pre_trainings():
    from cluster.estimate import schedule_total
    assert schedule_total([10, 10, 10, 10], [None] * 4, 1) == 40
    assert schedule_total([10, 10, 10, 10], [None] * 4, 2) == 20
    assert schedule_total([10, 5, 5], [None, None, None], 2) == 10
    assert schedule_total([10, 5, 5], [None, None, 0], 2) == 15       # the third evaluates the first's pre-training
    assert schedule_total([], [], 4) == 0


def test_a_point_is_its_parts(compose):
    from cluster.estimate import Timing, point_seconds
    cfg = compose(*TINY, "evaluate.protocols=[knn,linear]", "evaluate.linear.epochs=5", "pretrain.max_steps=6",
                  "pretrain.checkpoint_every=3")
    t = Timing(startup_s=4, setup_s=1, step_s=0.5, first_step_s=0.8, checkpoint_s=0.1, pictures_s=0.2, feature_s=0.001, knn_s=1e-7,
               linear_s=1e-5, n_train=512, n_test=256)
    s, parts = point_seconds(cfg, t, "all", floor=False, startup=False)
    one = (512 + 256) * 0.001 + 512 * 256 * 1e-7 + 5 * 512 * 1e-5
    assert parts == pytest.approx({"startup": 0, "setup": 1, "pretrain": 0.8 + 5 * 0.5 + 3 * 0.1, "pictures": 0.2,
                                   "evaluate": one})
    assert s == pytest.approx(sum(parts.values()))
    with_floor, _ = point_seconds(cfg, t, "all", floor=True, startup=True)
    assert with_floor == pytest.approx(s + one + 4)
    t.first_s = 2  # what a process's first point loads once: a forked worker's first point pays it, a task both
    assert point_seconds(cfg, t, "all", floor=False, startup=False, first=True)[0] == pytest.approx(s + 2)
    assert point_seconds(cfg, t, "all", floor=False, startup=True)[0] == pytest.approx(s + 4 + 2)
    evaluate_only, parts = point_seconds(cfg, t, "evaluate", floor=False, startup=False)
    assert "pretrain" not in parts and evaluate_only == pytest.approx(1 + one)
