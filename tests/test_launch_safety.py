"""Launch safety (issue #7, part 1), against the real local SLURM cluster and a real MLflow server.

- injection: a newline + a command through every string key that reaches the job script is refused
  (exit 2, the key named) before the store is touched: no run, no experiment, no job, the command never runs;
- an output_root with a space works end to end on a real array (one shared tiny array), and the
  credentials of tracking.uri reach the job through the environment but appear in none of: params, tags,
  artifacts, printed output, manifests (mode 600), the submitted script, SLURM logs;
- the whole `cluster` group is checked first, `sbatch --test-only` runs before any run exists, and a
  failure after runs were created marks them FAILED;
- parallel launches on a fresh SQLite store all succeed; experiments are create-or-get; a dry run
  writes nothing; the local cluster listens on loopback only.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, TINY_SLURM, popen, queued_jobs, replacing, run_cli

# reuse=experiment: the session's MLflow server is shared by many tests, and a launch would otherwise evaluate
# another test's finished pre-training of the same config instead of training its own (core/tracking/identity.py).
SMALL = ["cluster=slurm", "cluster.cpus_per_task=1", "cluster.mem_gb=2", "cluster.time_min=20", "reuse=experiment"]
SECRET = "s3cr3t-Pa55-7f1d"
NL = "\n"


def _launch_in_process(compose, overrides):
    """What `python sweeps/run.py OVERRIDES` does, in this process (later overrides win per key)."""
    from cluster.launch import launch
    from sweeps.plan import merge_overrides
    overrides = merge_overrides(overrides)
    return launch(compose(*overrides), overrides)


# ------------------------------------------------------------------------------------------- injection
def _injections(marker: Path):
    cmd = f"touch {marker}"
    bad = f"'x{NL}{cmd}'"
    return {
        "cluster.partition": [f"cluster.partition={bad}"],
        "cluster.account": [f"cluster.account={bad}"],
        "cluster.qos": [f"cluster.qos={bad}"],
        "cluster.constraint": [f"cluster.constraint={bad}"],
        "cluster.time_min": [f"cluster.time_min={bad}"],
        "cluster.setup[1]": [f"cluster.setup=['true',{bad}]"],
        "cluster.python": [f"cluster.python='{sys.executable}{NL}{cmd}'"],
        "output_root": [f"output_root='{marker.parent}/o{NL}{cmd}'"],
        "tracking.experiment": [f"tracking.experiment={bad}"],
        "sweep.name": ["sweep=mcm_recon_range", f"sweep.name={bad}"],
        "tracking.uri": [f"tracking.uri='http://127.0.0.1:9/{NL}{cmd}'"],
    }


@pytest.mark.parametrize("key", list(_injections(Path("/x"))))
def test_injection_through_every_key_is_refused_before_anything(compose, slurm_cluster, mlflow_server, tmp_path,
                                                                 key):
    from core.config import ConfigError
    marker = tmp_path / "INJECTED"
    exp = "inject_" + "".join(ch if ch.isalnum() else "_" for ch in key)
    overrides = [*TINY_SLURM, *SMALL, f"tracking.uri={mlflow_server}", f"tracking.experiment={exp}",
                 f"output_root={tmp_path / 'out'}"]
    overrides += _injections(marker)[key]
    with pytest.raises(ConfigError) as err:
        _launch_in_process(compose, overrides)
    assert str(err.value).startswith(f"{key}="), str(err.value)
    assert key == "cluster.time_min" or "control character '\\n'" in str(err.value), str(err.value)
    time.sleep(1)
    assert not marker.exists()                                    # the command never ran
    assert not queued_jobs(tmp_path)                              # nothing submitted
    assert not (tmp_path / "out").exists()                        # no folder, no SQLite store
    assert MlflowClient(mlflow_server).get_experiment_by_name(exp) is None  # no experiment, no run


def test_injection_from_the_command_line_exits_2_without_traceback(slurm_cluster, mlflow_server, tmp_path):
    marker = tmp_path / "INJECTED"
    res = run_cli("sweeps/run.py", *TINY_SLURM, *SMALL, f"cluster.account='x{NL}touch {marker}'",
                  f"tracking.uri={mlflow_server}", "tracking.experiment=inject_cli", f"output_root={tmp_path / 'o'}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: cluster.account='x\\ntouch ") and "Traceback" not in res.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()
    assert MlflowClient(mlflow_server).get_experiment_by_name("inject_cli") is None


def test_sbatch_script_quotes_paths_and_takes_only_plain_tokens(compose, tmp_path):
    from cluster.slurm import sbatch_script
    from core.config import ConfigError
    cfg = compose("cluster=slurm", "cluster.partition=debug", "cluster.python=/opt/my env/bin/python")
    script = sbatch_script(cfg.cluster, tmp_path / "a b" / "m.json", 2, "mimsweep-x", tmp_path / "a b" / "100%",
                           "all")
    assert f'#SBATCH --output="{tmp_path}/a b/100%%/%A_%a.out"' in script
    assert "exec '/opt/my env/bin/python' -m cluster.task" in script and f"'{tmp_path}/a b/m.json'" in script
    cfg.cluster.account = "acct name"                               # even past the checks: refused as written
    with pytest.raises(ConfigError, match="cluster.account"):
        sbatch_script(cfg.cluster, tmp_path / "m.json", 1, "j", tmp_path, "all")


# ------------------------------------------------------------------------------------------- cluster checks
@pytest.mark.parametrize("override, key", [
    ("cluster.backend=foo", "cluster.backend"),
    ("cluster.time_min=0", "cluster.time_min"),
    ("cluster.array_parallelism=0", "cluster.array_parallelism"),
    ("cluster.gpus_per_task=-1", "cluster.gpus_per_task"),
    ("cluster.cpus_per_task=0", "cluster.cpus_per_task"),
    ("cluster.mem_gb=1.5", "cluster.mem_gb"),
    ("cluster.mem_gb=true", "cluster.mem_gb"),
    ("cluster.signal_delay_s=-1", "cluster.signal_delay_s"),
    ("cluster.signal_delay_s=1200", "cluster.signal_delay_s"),   # >= time_min (20 min): would fire at once
    ("cluster.max_requeues=-1", "cluster.max_requeues"),
    ("cluster.separate_eval=maybe", "cluster.separate_eval"),
    ("cluster.eval.time_min=0", "cluster.eval.time_min"),
    ("cluster.partition='de bug'", "cluster.partition"),
])
def test_cluster_group_is_checked_before_anything_is_created(compose, tmp_path, override, key):
    from core.config import ConfigError
    extra = ["cluster.separate_eval=true"] if key.startswith("cluster.eval") else []
    with pytest.raises(ConfigError) as err:
        _launch_in_process(compose, [*TINY_SLURM, *replacing(SMALL, *extra, override), f"output_root={tmp_path / 'out'}"])
    assert str(err.value).startswith(f"{key}="), str(err.value)
    assert not (tmp_path / "out").exists()                        # no store, no run, no folder


def test_test_only_runs_before_any_run_exists(slurm_cluster, compose, tmp_path):
    from core.config import ConfigError
    with pytest.raises(ConfigError, match="the scheduler rejects this resource request") as err:
        _launch_in_process(compose, [*TINY_SLURM, *SMALL, "cluster.constraint=nosuchfeature", f"output_root={tmp_path / 'out'}"])
    assert "Invalid feature specification" in str(err.value)
    assert not (tmp_path / "out").exists() and not queued_jobs(tmp_path)


def test_sbatch_failing_after_runs_were_created_marks_them_failed(slurm_cluster, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True).stdout.strip()
    (fake / "sbatch").write_text(f'#!/bin/bash\nif [[ $1 == --test-only ]]; then exec {real} "$@"; fi\n'
                                 'echo "sbatch: error: Batch job submission failed: (fake) queue closed" >&2\nexit 1\n')
    (fake / "sbatch").chmod(0o755)
    res = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *TINY_SLURM, *SMALL, f"output_root={tmp_path / 'out'}",
                  env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "error: the launch failed after creating its MLflow runs" in res.stderr and "queue closed" in res.stderr
    assert "Traceback" not in res.stderr
    c = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("mcm_recon_range").experiment_id])
    assert len(runs) == 3                                          # the launch and its two points
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all("queue closed" in r.data.tags["mimsweep.failure"] for r in runs)


# ------------------------------------------------------------------------------------------- credentials
def test_credentials_are_split_from_the_uri_and_redacted():
    from core import tracking
    uri = f"http://alice:{SECRET}@mlflow.example:5000/prefix"
    assert tracking.split_credentials(uri) == ("http://mlflow.example:5000/prefix", "alice", SECRET)
    assert tracking.redact(uri) == "http://alice:***@mlflow.example:5000/prefix"
    assert tracking.redact("http://h:5000") == "http://h:5000" and tracking.redact("sqlite:////a@b/x.db") == \
        "sqlite:////a@b/x.db"
    assert SECRET not in tracking.redact_text(f"tracking.uri={uri}", uri)
    enc = "http://alice:p%40ss%3Aw@h:1"
    assert tracking.split_credentials(enc)[2] == "p@ss:w" and "p%40ss" not in tracking.redact_text(enc, enc)


def test_credentials_set_by_the_user_win_and_plain_uris_change_nothing(monkeypatch):
    from core import tracking
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bobs-own")
    assert tracking.use_credentials(f"http://alice:{SECRET}@h:5000") == "http://h:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "bobs-own"
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    assert tracking.use_credentials("http://h:5000") == "http://h:5000" and "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_error_messages_redact_the_password(tmp_path):
    res = run_cli("sweeps/run.py", *TINY, f"tracking.uri=http://alice:{SECRET}@127.0.0.1:9", f"output_root={tmp_path}",
                  env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "tracking.uri='http://alice:***@127.0.0.1:9' is invalid: the MLflow store cannot be reached" in res.stderr
    assert SECRET not in res.stdout + res.stderr


@pytest.fixture(scope="module")
def array_with_space_and_credentials(slurm_cluster, mlflow_server, tmp_path_factory):
    """One real array shared by the tests below: output_root with a space, credentials in tracking.uri."""
    out = tmp_path_factory.mktemp("launch safety") / "out root"
    uri = mlflow_server.replace("http://", f"http://alice:{SECRET}@")
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    # The job proves it got the password from its environment without printing it.
    check = (f'test "$(printf %s "$MLFLOW_TRACKING_PASSWORD" | sha256sum | cut -c1-64)" = {digest} '
             '|| { echo "mimsweep test: MLFLOW_TRACKING_PASSWORD missing in the job" >&2; exit 3; }')
    args = ["sweeps/run.py", "sweep=mcm_recon_range", *TINY_SLURM, *SMALL, f"cluster.setup=['{check}']",
            f"tracking.uri={uri}", "tracking.experiment=safety_array", f"output_root={out}"]
    dry = run_cli(*args, "dry_run=true")
    launched = run_cli(*args)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    job = launched.stdout.split("array job(s): ")[1].split()[0]
    batch = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True).stdout
    c = MlflowClient(mlflow_server)
    deadline = time.time() + 420
    while time.time() < deadline:
        exp = c.get_experiment_by_name("safety_array")
        runs = c.search_runs([exp.experiment_id])
        points = [r for r in runs if r.data.tags.get("mimsweep.kind") == "point"]
        if len(points) == 2 and all(r.info.status in ("FINISHED", "FAILED") for r in points):
            break
        time.sleep(3)
    logs = {p: p.read_text() for p in out.rglob("logs/*") if p.is_file()}
    return dict(out=out, dry=dry, launched=launched, job=job, batch=batch, runs=runs, logs=logs, client=c)


def test_output_root_with_a_space_runs_a_real_array(array_with_space_and_credentials):
    a = array_with_space_and_credentials
    points = [r for r in a["runs"] if r.data.tags.get("mimsweep.kind") == "point"]
    assert {r.info.status for r in points} == {"FINISHED"}, "\n".join(a["logs"].values())
    assert all("knn_top1" in r.data.metrics for r in points)
    assert {r.data.tags["mimsweep.slurm_job_all"].split("_")[0] for r in points} == {a["job"]}
    assert f'#SBATCH --output="{a["out"]}/runs/safety_array/slurm/' in a["batch"]
    assert len([p for p in a["logs"] if p.suffix == ".out"]) == 2   # both tasks logged under the spaced path


def test_credentials_reach_the_job_but_are_stored_and_printed_nowhere(array_with_space_and_credentials):
    a = array_with_space_and_credentials
    c = a["client"]
    for r in a["runs"]:
        assert SECRET not in json.dumps(r.data.params) and SECRET not in json.dumps(r.data.tags)
        if c.list_artifacts(r.info.run_id):
            root = Path(c.download_artifacts(r.info.run_id, ""))   # every artifact, folders included
            for f in (p for p in root.rglob("*") if p.is_file()):
                assert SECRET.encode() not in f.read_bytes(), f
    launch_run = next(r for r in a["runs"] if r.data.tags.get("mimsweep.kind") == "launch")
    assert "alice:***@" in launch_run.data.tags["mimsweep.overrides"]          # redacted, not dropped
    point = next(r for r in a["runs"] if r.data.tags.get("mimsweep.kind") == "point")
    assert "tracking.uri" not in point.data.params       # operational: kept in config.yaml, redacted
    assert "uri: http://alice:***@" in Path(c.download_artifacts(point.info.run_id, "config.yaml")).read_text()
    for out in (a["dry"], a["launched"]):
        assert SECRET not in out.stdout + out.stderr
    assert "#!/bin/bash" in a["batch"] and SECRET not in a["batch"] and SECRET not in a["dry"].stdout
    manifests = list((a["out"] / "runs").rglob("*.json"))           # (snapshots/ holds the code's own json)
    assert manifests
    for m in manifests:
        assert stat.S_IMODE(m.stat().st_mode) == 0o600
        assert SECRET not in m.read_text() and "alice" not in json.loads(m.read_text())["uri"]
    for path, text in a["logs"].items():
        assert SECRET not in text, path
        assert "MLFLOW_TRACKING_PASSWORD missing" not in text, path  # the job had it, from the environment
    for p in a["out"].rglob("*"):                                    # and no other file under output_root
        if p.is_file() and p.stat().st_size < 50_000_000:
            assert SECRET.encode() not in p.read_bytes(), p


# ------------------------------------------------------------------------------------------- stores
def test_parallel_launches_on_a_fresh_sqlite_store(tmp_path):
    out = tmp_path / "out"
    # one thread each: four launches share this machine's cores
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    # four different points into one experiment: task=flops (no training) keeps the test on the launches
    procs = [popen([sys.executable, "sweeps/run.py", *TINY, "task=flops", f"seed={i}",
                    "tracking.experiment=parallel", f"output_root={out}"],
                   cwd=env["PYTHONPATH"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   text=True) for i in range(4)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n----\n".join(outs)
    db = out / "mlflow.db"
    assert (out / "mlflow.db.lock").exists()                        # creation was serialised by this lock
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    c = MlflowClient(f"sqlite:///{db}")
    exps = [e for e in c.search_experiments() if e.name == "parallel"]
    assert len(exps) == 1
    runs = c.search_runs([exps[0].experiment_id])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    c.set_tag(runs[0].info.run_id, "usable", "yes")                  # the store still takes writes


def test_experiment_creation_is_create_or_get(mlflow_server, monkeypatch):
    from core import tracking
    c = MlflowClient(mlflow_server)
    existing = c.create_experiment("raced_experiment")
    real_get = c.get_experiment_by_name
    calls = []

    def first_blind(name):  # the other launch created it between our look-up and our create
        calls.append(name)
        return None if len(calls) == 1 else real_get(name)
    monkeypatch.setattr(c, "get_experiment_by_name", first_blind)
    assert tracking.experiment_id(c, "raced_experiment", mlflow_server) == existing


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_dry_run_writes_nothing(tmp_path, backend):
    out = tmp_path / "dry out"
    tiny = [*TINY_SLURM, *SMALL] if backend == "slurm" else TINY
    res = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *tiny, "dry_run=true", f"output_root={out}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dry run" in res.stdout
    assert not out.exists()                                        # no database, experiment or folder


# ------------------------------------------------------------------------------------------- local cluster
def _listening_sockets() -> dict[str, list[str]]:
    """{process name: ['ADDR:PORT', ...]} of listening TCP sockets, from /proc (what `ss -ltnp` shows, without
    needing iproute2)."""
    import ipaddress
    import socket
    import struct
    addr_of = {}
    for fam, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        if not os.path.exists(path):
            continue
        for line in open(path).read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if fam == socket.AF_INET:
                ip = str(ipaddress.IPv4Address(struct.pack("<I", int(hexaddr, 16))))
            else:
                ip = "[" + str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))) + "]"
            addr_of[f[9]] = f"{ip}:{int(hexport, 16)}"
    out: dict[str, list[str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in addr_of:
                    out.setdefault(comm, []).append(addr_of[target[8:-1]])
        except OSError:
            continue
    return out


def test_local_cluster_listens_on_loopback_only(slurm_cluster):
    """cluster/local_slurm.sh binds every daemon it starts to 127.0.0.1 (checked after `down` + `up`)."""
    listening = _listening_sockets()
    ours = {d: listening[d] for d in ("slurmctld", "slurmd", "slurmdbd", "mariadbd") if d in listening}
    assert {"slurmctld", "slurmd", "slurmdbd"} <= set(ours), listening
    for daemon, addrs in ours.items():
        for addr in addrs:
            assert addr.rsplit(":", 1)[0] in ("127.0.0.1", "[::1]"), f"{daemon} listens on {addr}"
