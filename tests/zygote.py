"""A Python that has imported the heavy libraries once and forks the tests' CLI runs from there.

`python sweeps/run.py ...` spends ~2-5 CPU-seconds importing torch, timm, MLflow and Hydra before it does
anything; the suite runs ~170 of them, on 2 cores. Each pytest worker starts one of these servers
(tests/conftest.py `run_cli`); a run is then a fork of it that does what `python script args` does:
its own process and pid, the test's argv, working directory, environment and output files, `sys.path[0]`
the script's folder, the script run as `__main__`, and the end our entry points have (core/entry.py: threads
stopped, atexit handlers, flushed output; the status of `sys.exit`, or 1 with an uncaught exception's traceback).

What differs from a fresh interpreter, and how the suite keeps it from mattering:
- the third-party libraries below are already imported, under the environment the server started with.
  A run whose environment differs in a variable read at import (PYTHON*, OMP_*, MLFLOW_DISABLE_TELEMETRY,
  ...; conftest `_FRESH_ONLY`) is run as a fresh process instead; PYTHONPATH is honoured here (the run's
  entries go on its sys.path, the server's are taken off). mimsweep's own modules are not preloaded: each run
  imports them itself;
- no thread starts in the server after its imports (checked before each fork);
- warnings printed while the libraries were imported are not printed again.
`MIMSWEEP_TEST_ZYGOTE=0 pytest` runs every CLI run as a fresh process.

Protocol (one connection per run, a Unix socket): the client sends one JSON line {argv, cwd, env, and optionally
new_session and default_sigint, as Popen's start_new_session and a preexec_fn restoring Ctrl-C} with the run's
stdout and stderr file descriptors (SCM_RIGHTS); stdin is /dev/null. The server answers "pid N" once forked, then
"exit N CPU" when the run ends: N the status as subprocess reports it (negative for a signal), CPU the run's
user + system seconds, those of the processes it waited for included (what RUSAGE_CHILDREN would have counted
in the client had it started the run itself).
"""
from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import sys
import threading

# Set before the imports below, as every mimsweep entry point does (core/config.py) before it imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ("torch", "torchvision", "timm", "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
           "hydra", "hydra.core.global_hydra", "omegaconf", "pandas", "submitit", "sqlalchemy", "yaml",
           "matplotlib.figure", "matplotlib.backends.backend_agg", "tabulate")  # a run's figures, a report's tables


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n"):
        msg, ancdata, _flags, _addr = conn.recvmsg(1 << 20, socket.CMSG_LEN(16 * 4))
        if not msg:
            raise EOFError("client went away")
        data += msg
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
    return json.loads(data), fds


def _pythonpath(value: str | None) -> list[str]:
    return [os.path.abspath(p) for p in (value or "").split(os.pathsep) if p]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _entry():
    """core/entry.py (standard library only, no state), loaded once by its path: a run's sys.path stays the
    script's own."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_zygote_entry", os.path.join(REPO, "core", "entry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(request: dict, out: int, err: int, finish) -> None:
    """In the forked child: become `python argv...`. It ends as our entry points end (core/entry.py: Python's
    exit less the module teardown, which the forked copy of the server's modules would take ~1.5 s for); an
    uncaught exception prints its traceback and ends with 1 (KeyboardInterrupt: by SIGINT), as Python does."""
    import runpy
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (null, out, err):
        os.close(fd)
    if request.get("new_session"):             # Popen(start_new_session=True)
        os.setsid()
    if request.get("default_sigint"):          # a fresh Python's Ctrl-C, even where the server's was ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    ours = _pythonpath(os.environ.get("PYTHONPATH"))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script, *args = request["argv"]
    sys.argv = [script, *args]
    # sys.path as a fresh interpreter builds it: the script's folder, then the run's PYTHONPATH (not the server's)
    theirs = _pythonpath(request["env"].get("PYTHONPATH"))
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *theirs, *(p for p in sys.path[1:] if p not in ours)]
    if not os.path.isfile(script):
        print(f"{sys.executable}: can't open file {os.path.abspath(script)!r}: [Errno 2] No such file or directory",
              file=sys.stderr)
        finish(2)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        finish(e.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        finish(1)
    finish(0)


def serve(path: str) -> None:
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    parent = os.getppid()
    # torch and MLflow's allocator (jemalloc) each start an idle native thread when imported, as they do in a
    # fresh interpreter (and in the local workers' fork server, which forks points after the same imports);
    # anything beyond those, or any Python thread, and the server refuses to fork.
    native = _threads()
    finish = _entry().finish
    print("ready", flush=True)
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    while True:
        ready, _, _ = select.select([listener, *running], [], [], 1.0)
        if os.getppid() != parent:  # the pytest worker is gone: so are we (runs still going finish on their own)
            return
        for fd in ready:
            if fd is listener:
                conn, _ = listener.accept()
                try:
                    request, (out, err) = _recv_request(conn)
                except (EOFError, ValueError, OSError):
                    conn.close()
                    continue
                if _threads() > native or threading.active_count() != 1:
                    conn.sendall(f"error the server has {_threads()} threads: it cannot fork safely\n".encode())
                    conn.close()
                    os.close(out)
                    os.close(err)
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    for pidfd, (_, other) in running.items():
                        os.close(pidfd)
                        other.close()
                    _run(request, out, err, finish)  # never returns
                os.close(out)
                os.close(err)
                running[os.pidfd_open(pid)] = (pid, conn)
                conn.sendall(f"pid {pid}\n".encode())
            else:
                pid, conn = running.pop(fd)
                os.close(fd)
                _, status, usage = os.wait4(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                try:
                    conn.sendall(f"exit {code} {usage.ru_utime + usage.ru_stime:.3f}\n".encode())
                except OSError:
                    pass
                conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
