"""How a process ends (core/entry.py), and the tests' pre-imported Python (tests/zygote.py) against a fresh one.

`finish` skips only the module teardown: whatever else Python's exit does that can be seen (threads joined,
atexit handlers, buffered output flushed, the status) must still happen. The zygote must give a script what
a fresh interpreter gives it (argv, cwd, environment, sys.path[0], __main__) and end it the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, _Zygote, run_cli

ENDING = textwrap.dedent("""
    import atexit, os, sys, threading, time
    sys.path.insert(0, {repo!r})
    from core.entry import finish, run
    out = open(sys.argv[1], "w")             # block-buffered, never closed: teardown would flush it, finish must not lose it
    out.write("buffered\\n")
    atexit.register(lambda: open(sys.argv[1] + ".atexit", "w").write("ran"))
    def late():
        time.sleep(0.3)
        open(sys.argv[1] + ".thread", "w").write("joined")
    threading.Thread(target=late).start()    # not a daemon: the exit waits for it
    print("to stdout", end="")                # no newline, stdout to a pipe: still in the buffer
    out.flush()
    mode = sys.argv[2]
    if mode == "code":
        finish(3)
    if mode == "message":
        finish("a message")
    if mode == "none":
        finish(None)
    if mode == "systemexit":
        run(lambda: sys.exit(4))
    run(lambda: 5)
""")


@pytest.mark.parametrize("mode,code,stderr", [("code", 3, ""), ("message", 1, "a message\n"), ("none", 0, ""),
                                             ("systemexit", 4, ""), ("returned", 5, "")])
def test_finish_ends_as_python_does_less_the_teardown(tmp_path, mode, code, stderr):
    script = tmp_path / "end.py"
    script.write_text(ENDING.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), mode], capture_output=True, text=True,
                         env=env, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (code, "to stdout", stderr)
    assert (tmp_path / "out").read_text() == "buffered\n"
    assert (tmp_path / "out.atexit").read_text() == "ran"
    assert (tmp_path / "out.thread").read_text() == "joined"


PROBE = textwrap.dedent("""
    import json, os, sys
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                      "file": __file__, "probe": os.environ.get("PROBE"),
                      "pid_is_new": os.getpid() != int(os.environ["PARENT_PID"])}))
    print("to stderr", file=sys.stderr)
    what = sys.argv[1]
    if what == "exit":
        sys.exit(7)
    if what == "raise":
        raise ValueError("boom")
    if what == "interrupt":
        raise KeyboardInterrupt
""")


@pytest.fixture(scope="module")
def zygote():
    """One zygote for this module's tests of it (each starts with imports of ~5 CPU-seconds)."""
    z = _Zygote()
    yield z
    z.close()


@pytest.mark.parametrize("what,code", [("ok", 0), ("exit", 7), ("raise", 1), ("interrupt", -2)])
def test_a_script_forked_from_the_zygote_sees_and_ends_as_in_a_fresh_python(tmp_path, what, code, zygote):
    (tmp_path / "sub").mkdir()
    script = tmp_path / "sub" / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "PROBE": "x y", "PARENT_PID": str(os.getpid())}
    fresh = subprocess.run([sys.executable, str(script), what, "a b"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    forked = zygote.run([str(script), what, "a b"], cwd=tmp_path, env=env, timeout=60)
    assert fresh.returncode == forked.returncode == code
    assert json.loads(forked.stdout) == json.loads(fresh.stdout) == {
        "argv": [str(script), what, "a b"], "cwd": str(tmp_path), "path0": str(tmp_path / "sub"), "name": "__main__",
        "file": str(script), "probe": "x y", "pid_is_new": True}
    assert forked.stderr.splitlines()[0] == fresh.stderr.splitlines()[0] == "to stderr"
    if what in ("raise", "interrupt"):
        assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
        assert "Traceback (most recent call last):" in forked.stderr


def test_a_run_past_its_timeout_is_killed(tmp_path, zygote):
    script = tmp_path / "slow.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as e:
        zygote.run([str(script)], cwd=tmp_path, env={}, timeout=2)
    assert e.value.output == b"started\n"
    missing = [str(tmp_path / "missing.py")]
    fresh = subprocess.run([sys.executable, *missing], capture_output=True, text=True, timeout=60)
    forked = zygote.run(missing, cwd=tmp_path, env={}, timeout=30)
    assert (forked.returncode, forked.stderr) == (fresh.returncode, fresh.stderr) == (2, fresh.stderr)


def test_run_cli_takes_a_fresh_python_where_an_import_time_variable_differs(monkeypatch):
    """The zygote imported torch under its own OMP_NUM_THREADS: a run asking for another gets a fresh interpreter."""
    monkeypatch.delenv("MIMSWEEP_TEST_ZYGOTE", raising=False)
    probe = ["-c", "print('x')"]
    assert run_cli(*probe).stdout == "x\n"
    from tests import conftest
    zygote_env = {"OMP_NUM_THREADS": "1", "A": "1"}
    monkeypatch.setattr(conftest, "_ZYGOTE", [type("Z", (), {"env": zygote_env})()])
    assert conftest._zygote(["s.py"], {"OMP_NUM_THREADS": "1", "A": "2"}) is conftest._ZYGOTE[0]
    assert conftest._zygote(["s.py"], {"OMP_NUM_THREADS": "2", "A": "1"}) is None
    assert conftest._zygote(["s.py"], {"A": "1"}) is None
    assert conftest._zygote(["-c", "pass"], dict(zygote_env)) is None


def test_finish_stops_a_thread_pool_as_python_does(tmp_path):
    """concurrent.futures' idle workers wait for work until threading's exit hook tells them to stop (MLflow
    downloads artifacts through such a pool): joining the threads without that hook waits forever."""
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from concurrent.futures import ThreadPoolExecutor
        from core.entry import finish
        pool = ThreadPoolExecutor(2)
        print(sum(pool.map(abs, [-1, -2, -3])))
        finish(0)
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (0, "6\n"), res.stderr


WAITER = textwrap.dedent("""
    import json, os, signal, sys, time
    print(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "path1": sys.path[1],
                      "ctrl_c": signal.getsignal(signal.SIGINT) is signal.default_int_handler}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("sig,code,traceback", [("SIGTERM", -15, False), ("SIGINT", -2, True)])
def test_popen_forks_a_process_that_is_signalled_and_ends_as_a_fresh_one(tmp_path, monkeypatch, sig, code, traceback):
    """tests/conftest.py popen (the launches a test signals, kills or watches): the forked run is the process
    at p.pid, in a session of its own, with Ctrl-C restored, its PYTHONPATH on sys.path, its output on the pipe,
    and it ends by a signal as a fresh interpreter does."""
    import signal

    from bench.reliability import default_sigint
    from tests import conftest
    monkeypatch.delenv("MIMSWEEP_TEST_ZYGOTE", raising=False)
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "extra")}
    ends = {}
    for how, start in (("fresh", subprocess.Popen), ("forked", conftest.popen)):
        p = start([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=default_sigint)
        assert isinstance(p, conftest._Forked) == (how == "forked")
        seen = json.loads(p.stdout.readline())
        assert seen == {"pid": p.pid, "pgid": p.pid, "sid": p.pid, "path1": str(tmp_path / "extra"), "ctrl_c": True}
        assert p.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=0.2)
        os.killpg(p.pid, getattr(signal, sig))      # its own group, as the tests' launches are signalled
        rest, _ = p.communicate(timeout=30)
        ends[how] = (p.returncode, "KeyboardInterrupt" in rest)
    assert ends["forked"] == ends["fresh"] == (code, traceback)


def test_popen_communicate_times_out_keeps_what_it_read_and_separates_the_streams(tmp_path, monkeypatch):
    from tests import conftest
    monkeypatch.delenv("MIMSWEEP_TEST_ZYGOTE", raising=False)
    script = tmp_path / "talk.py"
    script.write_text("import sys, time\nprint('out 1', flush=True)\nprint('err 1', file=sys.stderr, flush=True)\n"
                      "time.sleep(1.5)\nprint('out 2')\nsys.exit(3)\n")
    p = conftest.popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert isinstance(p, conftest._Forked)
    with pytest.raises(subprocess.TimeoutExpired):
        p.communicate(timeout=0.5)
    assert p.communicate(timeout=30) == (b"out 1\nout 2\n", b"err 1\n") and p.returncode == 3
