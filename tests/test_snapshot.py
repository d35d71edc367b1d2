"""Code snapshots per launch (cluster/snapshot.py): what is copied, content addressing, and on the real
local SLURM cluster, that a task runs the code of its launch although the tree was edited while it waited.
"""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster import snapshot
from tests.conftest import REPO, TINY_SLURM, run_cli


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _copy_repo(dst: Path) -> Path:
    """A separate git repository holding this checkout's code (tracked + untracked, not ignored), committed."""
    files = _git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "copy")
    return dst


CODE = ("pkg", "run.sh")


@pytest.fixture
def small_repo(tmp_path):
    repo = tmp_path / "repo"
    for d in ("pkg", "tests"):
        (repo / d).mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("A = 1\n")
    (repo / "pkg" / "gone.py").write_text("G = 1\n")
    (repo / "tests" / "t.py").write_text("T = 1\n")            # tracked, not code a task runs
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    (repo / ".gitignore").write_text("outputs/\n*.log\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return repo


def test_snapshot_holds_tracked_and_untracked_code_not_ignored_files(small_repo, tmp_path):
    out = tmp_path / "out"
    clean = snapshot.plan(out, small_repo, CODE)
    assert not clean.dirty and clean.diff == "" and clean.untracked == ()
    (small_repo / "pkg" / "a.py").write_text("A = 2\n")          # an edit
    (small_repo / "pkg" / "new.py").write_text("N = 1\n")        # untracked, not ignored
    (small_repo / "pkg" / "x.log").write_text("ignored\n")
    (small_repo / "outputs").mkdir()
    (small_repo / "outputs" / "big.bin").write_bytes(b"x" * 100)  # ignored
    (small_repo / "tests" / "t.py").write_text("T = 2\n")        # recorded in the diff, not copied
    (small_repo / "pkg" / "gone.py").unlink()                    # tracked, deleted in the tree
    snap = snapshot.plan(out, small_repo, CODE)
    assert snap.files == ("pkg/a.py", "pkg/new.py", "run.sh")
    assert snap.dirty and snap.untracked == ("pkg/new.py",)
    assert "+A = 2" in snap.diff and "gone.py" in snap.diff and "+T = 2" in snap.diff
    assert snap.digest != clean.digest and snap.path == out.resolve() / "snapshots" / snap.digest
    assert not out.exists()                                      # planning writes nothing

    path = snapshot.write(snap, small_repo)
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == list(snap.files)
    assert (path / "pkg" / "a.py").read_text() == "A = 2\n"
    assert os.access(path / "run.sh", os.X_OK)
    assert [p.name for p in path.parent.iterdir()] == [snap.digest]  # no temporary folder left

    # same code -> same folder, written once; any byte of the code changed -> another folder
    (small_repo / "tests" / "t.py").write_text("T = 3\n")
    assert snapshot.plan(out, small_repo, CODE).digest == snap.digest
    (small_repo / "pkg" / "a.py").write_text("A = 3\n")
    assert snapshot.plan(out, small_repo, CODE).digest != snap.digest
    assert (path / "pkg" / "a.py").read_text() == "A = 2\n"      # an existing snapshot never changes


def test_outside_a_git_checkout_the_code_folders_are_copied(small_repo, tmp_path):
    shutil.rmtree(small_repo / ".git")
    (small_repo / "pkg" / "__pycache__").mkdir()
    (small_repo / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"x")
    snap = snapshot.plan(tmp_path / "out", small_repo, CODE)
    assert snap.files == ("pkg/a.py", "pkg/gone.py", "run.sh") and not snap.dirty


def test_a_tree_edited_during_the_copy_fails_instead_of_a_wrong_snapshot(small_repo, tmp_path):
    snap = snapshot.plan(tmp_path / "out", small_repo, CODE)
    (small_repo / "pkg" / "a.py").write_text("A = 99\n")         # after the plan, before the copy
    with pytest.raises(RuntimeError, match="changed while it was being copied"):
        snapshot.write(snap, small_repo)
    assert not snap.path.exists() and list(snap.path.parent.iterdir()) == []


def test_dry_run_script_runs_from_the_snapshot_and_writes_nothing(tmp_path):
    res = run_cli("sweeps/run.py", *TINY_SLURM, "cluster=slurm", "dry_run=true", f"output_root={tmp_path / 'o'}")
    assert res.returncode == 0, res.stderr
    snap = snapshot.plan(tmp_path / "o")
    assert f"cd {snap.path}\n" in res.stdout and f"export PYTHONPATH={snap.path}" in res.stdout
    assert f"cd {REPO}\n" not in res.stdout
    assert not (tmp_path / "o").exists()


def _wait(pred, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(1)
    return False


@pytest.mark.slurm
def test_a_task_runs_its_launch_code_although_the_tree_was_edited_while_it_waited(
        slurm_cluster, mlflow_server, tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    task_py = repo / "cluster" / "task.py"
    original = task_py.read_text()
    marker = "def main(manifest_path: str) -> int:\n"
    assert marker in original
    # launch-time code: an uncommitted edit (so the tree is dirty) and an untracked file
    task_py.write_text(original.replace(marker, marker + '    print("[probe] launch-time code", flush=True)\n'))
    (repo / "cluster" / "probe_untracked.py").write_text("X = 1\n")
    out = tmp_path / "out"
    # the real sbatch, with --hold added: the array is queued held, so the tree can change while it waits
    wrap = tmp_path / "bin"
    wrap.mkdir()
    (wrap / "sbatch").write_text(f'#!/bin/sh\nexec {shutil.which("sbatch")} --hold "$@"\n')
    (wrap / "sbatch").chmod(0o755)
    res = run_cli(str(repo / "sweeps" / "run.py"), *TINY_SLURM, "cluster=slurm", "cluster.cpus_per_task=1",
                  "cluster.mem_gb=2", "cluster.time_min=20", "reuse=experiment", f"tracking.uri={mlflow_server}",
                  "tracking.experiment=snapshot_e2e", f"output_root={out}", cwd=repo, timeout=300,
                  env={"PATH": f"{wrap}:{os.environ['PATH']}"})
    assert res.returncode == 0, res.stdout + res.stderr
    job = res.stdout.split("array job(s): ")[1].split()[0]
    try:
        # while the job waits: the code in the tree changes (the task would now fail), and the untracked file goes
        task_py.write_text(original.replace(marker, marker + '    raise SystemExit("edited after the launch")\n'))
        (repo / "cluster" / "probe_untracked.py").unlink()
        reason = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%r"], capture_output=True, text=True).stdout
        assert "Held" in reason or "JobHeld" in reason, reason
    finally:
        subprocess.run(["scontrol", "release", job], capture_output=True)

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("snapshot_e2e")
    runs = c.search_runs([exp.experiment_id])
    launch = next(r for r in runs if r.data.tags["mimsweep.kind"] == "launch")
    point_id = next(r.info.run_id for r in runs if r.data.tags["mimsweep.kind"] == "point")
    gone = lambda: not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()  # noqa: E731
    assert _wait(gone, timeout=400), f"job {job} still queued"
    point = c.get_run(point_id)
    snap_dir = Path(launch.data.tags["mimsweep.snapshot"])
    assert point.info.status == "FINISHED", point.data.tags.get("mimsweep.failure")
    assert point.data.tags["mimsweep.code"] == str(snap_dir)     # the task imported the snapshot
    assert snap_dir.parent == out.resolve() / "snapshots"
    assert "launch-time code" in (snap_dir / "cluster" / "task.py").read_text()
    assert (snap_dir / "cluster" / "probe_untracked.py").exists()
    logs = "".join(p.read_text() for p in out.rglob(f"{job}_0.out"))
    assert "[probe] launch-time code" in logs and "edited after the launch" not in logs
    # the launch run says what the tree held beyond its commit
    arts = Path(c.download_artifacts(launch.info.run_id, "code", str(tmp_path / "arts")))
    assert '+    print("[probe] launch-time code", flush=True)' in (arts / "git_diff.patch").read_text()
    assert (arts / "untracked.txt").read_text().split() == ["cluster/probe_untracked.py"]
    assert launch.data.tags["mimsweep.git_dirty"] == "True"
    print(json.dumps({"job": job, "snapshot": str(snap_dir), "files": sum(1 for _ in snap_dir.rglob("*"))}))
