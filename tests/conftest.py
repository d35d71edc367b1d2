"""Shared fixtures: composing configs exactly as the launcher does, and running the CLI."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MIMSWEEP_PROGRESS", "0")
# mimsweep's cache (timings, the empty-store template) is the session's own: shared by its workers, never the
# user's ~/.cache/mimsweep, where timings taken under the suite's load would be the estimates of later launches
os.environ.setdefault("MIMSWEEP_CACHE", os.path.join(
    tempfile.gettempdir(), f"mimsweep-tests-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
# In parallel (pytest-xdist), each worker computes with one thread: 4 workers of torch's default 2 threads on
# 2 cores spin against each other (a fine-tuning test took 16 min instead of 1). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: twice the CPUs, at most 4: most tests wait on subprocesses, servers and the SLURM queue,
    so two workers per core overlap those waits; more only adds memory and contention."""
    return max(2, min(4, 2 * len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    """Tests that submit to the SLURM cluster run one after another on one worker: they share the one
    node and some read the whole queue (a dry run submits nothing; a cancel clears the sweep's jobs)."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with _alone_or_shared(item), _timed(item):
        yield


@contextlib.contextmanager
def _alone_or_shared(item):
    """A test marked `alone` (a measured time compared with a prediction) runs while no other test of the
    session runs: under pytest-xdist every other test holds a shared lock from its setup to its teardown, an
    `alone` test the exclusive one. A gate lock in front stops new tests from starting while it waits."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run_id:  # one process: nothing runs beside it
        yield
        return
    import fcntl
    folder = Path(tempfile.gettempdir()) / f"mimsweep-tests-{run_id}"
    folder.mkdir(exist_ok=True)
    with open(folder / "gate", "a") as gate, open(folder / "running", "a") as running:
        if item.get_closest_marker("alone"):
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(running, fcntl.LOCK_EX)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(running, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(running, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


@contextlib.contextmanager
def _timed(item):
    """MIMSWEEP_TEST_TIMES=file: one JSON line per test (wall and CPU seconds, the CPU of the subprocesses it
    waited for included, its worker), to find what makes the suite long on a 2-core machine."""
    path = os.environ.get("MIMSWEEP_TEST_TIMES")
    if not path:
        yield
        return
    import json
    import resource
    import time

    def cpu():
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime

    t0, (c0, k0) = time.time(), cpu()
    yield
    c1, k1 = cpu()
    with open(path, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "start": t0, "wall": time.time() - t0, "cpu": c1 - c0,
                            "children_cpu": k1 - k0, "worker": os.environ.get("PYTEST_XDIST_WORKER", "-")}) + "\n")


@pytest.fixture(scope="session")
def compose():
    """compose(*overrides) -> resolved point config, through Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from core.config import CONFIG_DIR, SEARCHPATH

    GlobalHydra.instance().clear()
    ctx = initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3")
    ctx.__enter__()

    def _compose(*overrides: str):
        cfg = hydra_compose(config_name="config", overrides=[SEARCHPATH, *overrides])
        OmegaConf.resolve(cfg)
        return cfg

    yield _compose
    ctx.__exit__(None, None, None)


def run_cli(*args: str, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run a repo script the way a user does: `python sweeps/run.py ...`. A script is forked from this worker's
    pre-imported Python (tests/zygote.py: the same process a fresh interpreter would be, without re-importing
    torch, timm and MLflow each time); `MIMSWEEP_TEST_ZYGOTE=0` runs each as a fresh interpreter."""
    full_env = {**os.environ, "MIMSWEEP_PROGRESS": "0", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if env is None or "MLFLOW_TRACKING_URI" not in env else None
    zygote = _zygote(args, full_env)
    if zygote is not None:
        return zygote.run(list(args), cwd=cwd, env=full_env, timeout=timeout)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# Variables a library reads when it is imported: a run whose environment differs from the zygote's in one of
# these gets a fresh interpreter.
_FRESH_ONLY = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS", "TORCH", "CUDA", "LD_", "MLFLOW_DISABLE_TELEMETRY",
               "MLFLOW_LOGGING", "MLFLOW_CONFIGURE_LOGGING", "HYDRA", "TIMM", "HF_", "XDG_CACHE_HOME")
_ZYGOTE: list = []


def _zygote(args, env: dict):
    """This worker's zygote if it can run `python *args` under `env`, else None."""
    if os.environ.get("MIMSWEEP_TEST_ZYGOTE", "1") == "0" or not args or not str(args[0]).endswith(".py"):
        return None
    if not _ZYGOTE:
        _ZYGOTE.append(_Zygote())
    zygote = _ZYGOTE[0]
    changed = {k for k in env.keys() | zygote.env.keys() if env.get(k) != zygote.env.get(k)}
    return None if any(k.startswith(_FRESH_ONLY) for k in changed) else zygote


def _reply(conn) -> str:
    """One line from tests/zygote.py, read a byte at a time (a timeout may interrupt it; nothing is lost)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            raise RuntimeError("tests/zygote.py went away during a run")
        line += byte
    return line.decode()


class _Zygote:
    """The client of tests/zygote.py: one server per pytest worker, started on first use, gone with it."""

    def __init__(self):
        import atexit
        self.env = dict(os.environ)
        self.path = os.path.join(tempfile.mkdtemp(prefix="mimsweep-zygote-"), "socket")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py"), self.path], cwd=REPO,
                                     env=self.env, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"tests/zygote.py did not start (exit {self.proc.wait()})")
        atexit.register(self.close)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    def run(self, argv: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import json
        import signal
        import socket
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            request = json.dumps({"argv": argv, "cwd": str(cwd), "env": env}).encode() + b"\n"
            socket.send_fds(conn, [request], [out.fileno(), err.fileno()])
            first = _reply(conn).split()
            if first[:1] != ["pid"]:
                raise RuntimeError(f"tests/zygote.py refused the run: {' '.join(first)}")
            pid = int(first[1])
            conn.settimeout(timeout)
            try:
                last = _reply(conn)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                conn.settimeout(None)
                _reply(conn)
                out.seek(0), err.seek(0)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out.read(), err.read())
            code = int(last.split()[1])
            out.seek(0), err.seek(0)
            return subprocess.CompletedProcess([sys.executable, *argv], code,
                                               out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def queued_jobs(under) -> set:
    """Ids of the queued SLURM jobs whose output file lies below `under` (the tests on other xdist workers
    submit jobs of their own meanwhile, so a test asks only about its own folder)."""
    out = subprocess.run(["squeue", "-h", "-O", "ArrayJobID:20,StdOut:1000"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if f" {under}/" in line}


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves os.environ as it found it: an in-process launch puts a URI's credentials into
    MLFLOW_TRACKING_USERNAME/PASSWORD (for the jobs it starts) and a job sets MLflow's HTTP retry
    variables; later tests' subprocesses must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def replacing(base: list[str], *overrides: str) -> list[str]:
    """`base` + `overrides`, each override replacing the entry of its key (a launch refuses a key given twice)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [o for o in base if o.split("=", 1)[0].lstrip("+~") not in keys] + list(overrides)


# The smallest real configuration: the embedded data, vit_micro, a handful of steps. No time estimate: timing a
# new shape starts two more processes (~15 CPU-seconds), and the tests of the estimate ask for it (estimate=auto).
TINY = ["preset=smoke", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "evaluate.floor=false",
        "estimate=false"]


def _need(tool_ok: bool, what: str, how: str):
    """Tests needing a real service: skip on a laptop without it, fail in CI (CI must provide it)."""
    if tool_ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but missing: {how}")
    pytest.skip(f"{what} missing: {how}")


@pytest.fixture(scope="session")
def slurm_cluster():
    import shutil
    ok = shutil.which("sbatch") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    _need(ok, "a SLURM cluster", "run `bash cluster/local_slurm.sh up` (as root)")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (lean: one worker, no job runner)."""
    import socket
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    _need(mlflow_bin.exists(), "the mlflow CLI", "pip install mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(uri + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"mlflow server did not come up; see {root / 'server.log'}")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)

# mcm_recon_range with its "masked" point made to fail for real: inputs divided by ~0 overflow to inf,
# so the loss is not finite at step 1. The "all" point is healthy.
FAILING_POINTS = ("+sweep.points=[{label:masked,overrides:['method.recon_range=masked','data.std=[1e-38]']},"
                  "{label:all,overrides:['method.recon_range=all']}]")
