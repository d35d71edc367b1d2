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
# pytest imports this file as `conftest`, the tests as `tests.conftest`: one module, not two copies (the zygote,
# the CPU its runs took for MIMSWEEP_TEST_TIMES and the other module state must be the same object for both)
sys.modules.setdefault("tests.conftest" if __name__ == "conftest" else "conftest", sys.modules[__name__])
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
    """`-n auto`: one worker per CPU and one more, at most 4: the suite is CPU-bound (~2 % idle on 2 cores), the
    extra worker fills the waits on subprocesses, servers and the SLURM queue; each worker more adds its imports,
    its zygote and contention (on 2 cores, 3 workers: 895 s, 4: 934-952 s, 6: slower still)."""
    return max(2, min(4, len(os.sched_getaffinity(0)) + 1))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Groups of tests that run one after another on one worker (pytest-xdist's `--dist loadgroup`):
    - the tests that submit to the SLURM cluster: they share the one node and some read the whole queue (a dry
      run submits nothing; a cancel clears the sweep's jobs);
    - the tests of a module that share one of its module-scoped fixtures (a finished sweep, a reference run):
      on one worker the fixture runs once, where spread over the workers it ran once on each."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif item.get_closest_marker("xdist_group") is None and _module_fixtures(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def _module_fixtures(item) -> list[str]:
    """The module-scoped fixtures that `item` uses and its own module defines."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None or getattr(item, "module", None) is None:
        return []
    return [name for name, defs in info.name2fixturedefs.items()
            if defs and defs[-1].scope == "module" and getattr(defs[-1].func, "__module__", None) == item.module.__name__]


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
    waited for included, the runs tests/zygote.py forked for it too, its worker), to find what makes the suite long on a 2-core machine."""
    path = os.environ.get("MIMSWEEP_TEST_TIMES")
    if not path:
        yield
        return
    import json
    import resource
    import time

    def cpu():
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime + _ZYGOTE_CPU[0]

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
# these gets a fresh interpreter (PYTHONPATH excepted: the zygote builds the run's sys.path from it).
_FRESH_ONLY = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS", "TORCH", "CUDA", "LD_", "MLFLOW_DISABLE_TELEMETRY",
               "MLFLOW_LOGGING", "MLFLOW_CONFIGURE_LOGGING", "HYDRA", "TIMM", "HF_", "XDG_CACHE_HOME")
_ZYGOTE: list = []
_ZYGOTE_CPU = [0.0]  # CPU seconds of the runs forked for this worker so far (for MIMSWEEP_TEST_TIMES)


def _zygote(args, env: dict):
    """This worker's zygote if it can run `python *args` under `env`, else None."""
    if os.environ.get("MIMSWEEP_TEST_ZYGOTE", "1") == "0" or not args or not str(args[0]).endswith(".py"):
        return None
    if not _ZYGOTE:
        _ZYGOTE.append(_Zygote())
    zygote = _ZYGOTE[0]
    changed = {k for k in env.keys() | zygote.env.keys() if env.get(k) != zygote.env.get(k)}
    return None if any(k.startswith(_FRESH_ONLY) and k != "PYTHONPATH" for k in changed) else zygote


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

    def start(self, argv: list[str], cwd, env: dict, out: int, err: int, **how) -> tuple:
        """Fork `python *argv` with `out` and `err` as its stdout and stderr -> (connection, pid); `how`:
        new_session, default_sigint (tests/zygote.py)."""
        import json
        import socket
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            request = json.dumps({"argv": argv, "cwd": str(cwd), "env": env, **how}).encode() + b"\n"
            socket.send_fds(conn, [request], [out, err])
            first = _reply(conn).split()
        except BaseException:
            conn.close()
            raise
        if first[:1] != ["pid"]:
            conn.close()
            raise RuntimeError(f"tests/zygote.py refused the run: {' '.join(first)}")
        return conn, int(first[1])

    def run(self, argv: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import signal
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            conn, pid = self.start(argv, cwd, env, out.fileno(), err.fileno())
            with conn:
                conn.settimeout(timeout)
                try:
                    code = _ended(_reply(conn), argv)
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    conn.settimeout(None)
                    _ended(_reply(conn), argv)
                    out.seek(0), err.seek(0)
                    raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out.read(), err.read())
            out.seek(0), err.seek(0)
            return subprocess.CompletedProcess([sys.executable, *argv], code,
                                               out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def _ended(line: str, argv: list[str]) -> int:
    """A run's exit code from the zygote's last line ("exit CODE CPU"); its CPU counts for MIMSWEEP_TEST_TIMES,
    which also gets a line of its own for the run: {"run": argv, "cpu": seconds, "test": the test's id}."""
    _, code, cpu = line.split()
    _ZYGOTE_CPU[0] += float(cpu)
    path = os.environ.get("MIMSWEEP_TEST_TIMES")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"run": argv, "cpu": float(cpu), "code": int(code),
                                "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]}) + "\n")
    return int(code)


def popen(args: list[str], *, cwd=REPO, env=None, stdout=None, stderr=None, text=False, start_new_session=False,
          preexec_fn=None):
    """subprocess.Popen(args, ...) for `[sys.executable, "script.py", ...]`, forked from this worker's zygote
    when `run_cli` would fork it (and `preexec_fn` is none or bench.reliability.default_sigint): a process of
    its own, with its pid, process group or session, pipes, signals and exit status, without importing torch,
    timm and MLflow again. Anything else is a subprocess.Popen."""
    from bench.reliability import default_sigint
    env = dict(os.environ if env is None else env)
    script = list(args[1:2]) if len(args) > 1 and args[0] == sys.executable else []
    zygote = _zygote(script, env) if script and preexec_fn in (None, default_sigint) else None
    if zygote is None:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text,
                                start_new_session=start_new_session, preexec_fn=preexec_fn)
    return _Forked(zygote, list(args[1:]), cwd, env, stdout, stderr, text, new_session=start_new_session,
                   default_sigint=preexec_fn is default_sigint)


class _Forked:
    """What subprocess.Popen gives for a run the zygote forked: pid, stdout / stderr (PIPE, STDOUT, None, a
    file), poll, wait, communicate (with timeouts), send_signal / terminate / kill, returncode. stdin is
    /dev/null. The run is the zygote's child, not ours: its status comes over the zygote's connection, and the
    zygote reaps it as soon as it ends (no zombie keeps its pid, as one would for a Popen not yet waited for):
    signal it, or its process group, only while poll() is None."""

    def __init__(self, zygote, argv, cwd, env, stdout, stderr, text, **how):
        self.args, self.returncode, self._text = [sys.executable, *argv], None, text
        out_r, out_w = self._target(stdout, 1)
        err_r, err_w = (None, os.dup(out_w)) if stderr == subprocess.STDOUT else self._target(stderr, 2)
        try:
            self._conn, self.pid = zygote.start(argv, cwd, env, out_w, err_w, **how)
        finally:
            os.close(out_w)
            os.close(err_w)
        self.stdout = open(out_r, "r" if text else "rb") if out_r is not None else None
        self.stderr = open(err_r, "r" if text else "rb") if err_r is not None else None
        self._read: dict = {}

    @staticmethod
    def _target(spec, ours: int) -> tuple:
        """-> (the end we read or None, an fd for the run)."""
        if spec == subprocess.PIPE:
            return os.pipe()
        if spec == subprocess.DEVNULL:
            return None, os.open(os.devnull, os.O_WRONLY)
        return None, os.dup(ours if spec is None else spec if isinstance(spec, int) else spec.fileno())

    def poll(self):
        import select
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self.wait()
        return self.returncode

    def wait(self, timeout=None):
        import select
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = _ended(_reply(self._conn), self.args[1:])  # the line comes whole once it has begun
            self._conn.close()
        return self.returncode

    def communicate(self, input=None, timeout=None):
        """Read stdout and stderr to their end, then wait; a timeout leaves what was read for the next call."""
        import selectors
        import time
        assert input is None, "stdin is /dev/null"
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for f in (self.stdout, self.stderr):
                if f is not None and not f.closed:
                    self._read.setdefault(f, [])
                    sel.register(f.fileno(), selectors.EVENT_READ, f)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        self._read[key.data].append(chunk)
                    else:
                        sel.unregister(key.fd)
                        key.data.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        got = [b"".join(self._read[f]) if f in self._read else None for f in (self.stdout, self.stderr)]
        return tuple(g.decode(errors="replace") if g is not None and self._text else g for g in got)

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self):
        import signal
        self.send_signal(signal.SIGTERM)

    def kill(self):
        import signal
        self.send_signal(signal.SIGKILL)


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
# Points one after another in the launch's process (cluster.workers=1): parallel workers start a fork server
# that imports torch, timm and MLflow again (~3 CPU-seconds a launch, more than points of a few steps take);
# the tests of parallel workers ask for them (cluster.workers=2).
# Batches of 32, not the smoke preset's 64: training and the teacher are a third to a half of a TINY launch's CPU.
TINY = ["preset=smoke", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "pretrain.batch_size=32",
        "evaluate.floor=false", "estimate=false", "cluster.workers=1"]
# TINY for cluster=slurm, which has no cluster.workers (each point is a task of the array)
TINY_SLURM = [o for o in TINY if not o.startswith("cluster.")]
# The environment of a launch a test stops, kills, interrupts or launches again while its points train: each step
# also sleeps (core/faults.py pace), so a point stays in the middle of its training for a known wall time, however
# fast or loaded the machine, without spending CPU (a step of TINY takes ~40 ms: points of 100 steps had ended
# before a loaded machine's test caught them). A SLURM task gets it too (sbatch --export=ALL). Not in the config:
# a relaunch without it runs the same points (the same signatures) at full speed.
def paced(seconds: float = 0.3) -> dict:
    return {"MIMSWEEP_PACE": f"train.step={seconds}"}


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
