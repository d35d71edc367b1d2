"""Local backend: run the points on this machine, no scheduler needed.

`cluster.workers` says how many points run at once: 1 = one after another in this process; N > 1 = N
worker processes, each with `cpus // N` threads (on a small CPU several narrow processes do more work
than one wide one: on 2 cores two 1-thread points train ~1.2x faster together than one 2-thread point);
`auto` = as many as the launch has points, up to the CPU count, and 1 on a GPU. A point that evaluates
another's pre-training of this launch (`after` in the plan) starts when that one has ended.

A point's MLflow run is created when the point starts (cluster/backend.py `open_run`), so its start time
and duration in MLflow are its own; the wait since the launch began is its metric `queue_s`. Its output
(every line its job prints, a progress bar one line per 15 s) goes to `point.log` in its work folder, attached
to its run as `logs/point.log` when it ends, however it ends (a worker killed -9 leaves only the file).

A failing point is recorded as FAILED in MLflow with its reason and the sweep goes on with the next;
the next launch resumes it from its last checkpoint. A worker that dies (killed, out of memory) leaves
its point FAILED with the signal as the reason. Ctrl-C or SIGTERM to the launch, or the launch itself
killed (even with -9), stops the workers: their points end KILLED, to be resumed by the next launch.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

from cluster.backend import Backend
from cluster.estimate import WORKER_IMPORTS
from core import faults
from core.config import cpu_count
from core.job import run_point
from core.tracking import TrackingUnavailable
from core.training.loop import DiskFull, NonFiniteLoss

# Failures whose message says all (what happened, what to do): no traceback for them.
EXPLAINED = (DiskFull, NonFiniteLoss, TrackingUnavailable)


def workers_for(cfg, n_points: int) -> int:
    """How many points of this launch run at once (`cluster.workers`, checked by cluster/checks.py)."""
    w = cfg.cluster.get("workers", 1)
    if w == "auto":
        import torch
        on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        w = 1 if on_gpu else cpu_count()
    return max(1, min(int(w), n_points))


LOG = "point.log"   # a point's output, in its work folder and as the artifact logs/point.log


def _attempt(pl, uri: str, root: Path, queue_s: float | None = None) -> tuple[str, dict, str]:
    """One point in this process -> (status, metrics, failure reason). Its output also goes to its log file,
    which is attached to its run when it ends."""
    workdir = root / pl.workdir_name
    workdir.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    with open(workdir / LOG, "a", encoding="utf-8") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {pl.point.run_name} run={pl.run_id} on "
                f"{socket.gethostname()} pid {os.getpid()} ===\n")
        sys.stdout, sys.stderr = _Tee(out, _Lines(f, "")), _Tee(err, _Lines(f, ""))
        try:
            res = run_point(pl.cfg, pl.run_id, uri, str(workdir), phase=pl.phase, checkpoint=pl.checkpoint,
                            queue_s=queue_s)
        except KeyboardInterrupt:
            raise
        except EXPLAINED as e:
            f.write(f"FAILED: {e}\n")   # the launch prints it (cluster/local.py _ended); the log keeps it too
            return "FAILED", {}, str(e)
        except Exception as e:  # noqa: BLE001 - reported, tracked as FAILED, and the sweep continues
            traceback.print_exc()
            return "FAILED", {}, f"{type(e).__name__}: {e}"
        finally:
            sys.stdout, sys.stderr = out, err
            f.flush()
            _attach_log(pl, uri, workdir)
    return "FINISHED", {k: v for k, v in res.items() if k.endswith(("top1", "miou"))}, ""


def _attach_log(pl, uri: str, workdir: Path) -> None:
    from core import tracking
    try:
        tracking.attach_files(tracking.job_client(uri), pl.run_id, {LOG: workdir / LOG}, "logs")
    except Exception as e:  # noqa: BLE001 - the log stays in the work folder
        print(f"[mimsweep] could not attach {workdir / LOG}: {type(e).__name__}: {e}", file=sys.stderr)


class _Tee:
    """Writes to a stream and to a copy (the point's log); everything else is the stream's (isatty, ...).
    A logger that kept this stream after its point ended writes to the stream alone (the log is closed)."""

    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy

    def write(self, s: str) -> int:
        self.stream.write(s)
        try:
            self.copy.write(s)
        except ValueError:  # the point's log file is closed
            pass
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        try:
            self.copy.flush()
        except ValueError:
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _started(i: int, n: int, pl) -> None:
    print(f"[{i}/{n}] {pl.point.label} seed={pl.point.seed} sig={pl.signature} run={pl.run_id}"
          + (" (evaluation only)" if pl.phase == "evaluate" else ""), flush=True)


def _ended(row: dict, reason: str, who: str = "") -> None:
    if row["status"] == "FINISHED":
        shown = ", ".join(f"{k}={v:.2f}" for k, v in row["metrics"].items())
        print(f"    {who}done in {row['wall_s']:.0f}s: {shown}", flush=True)
    else:
        print(f"    {who}{row['status']}: {reason}", flush=True)


def _open(pl, open_run, queued_at: float | None) -> float | None:
    """Create the point's run now that it starts (cluster/backend.py open_run) -> its wait since `queued_at`."""
    waited = None if queued_at is None else time.time() - queued_at
    if open_run is not None:
        open_run(pl)
    return waited


def run_all(todo, uri: str, root: Path, workers: int = 1, open_run=None, queued_at: float | None = None) -> list[dict]:
    """Runs the points; returns one row per point (in `todo` order): label, seed, status, metrics, wall time.
    `open_run(planned)`: creates the point's run as it starts; `queued_at`: when the launch handed the points
    over (epoch seconds)."""
    if workers > 1:
        return _run_parallel(todo, uri, root, workers, open_run, queued_at)
    rows = []
    for i, pl in enumerate(todo, 1):
        queue_s = _open(pl, open_run, queued_at)
        _started(i, len(todo), pl)
        t0 = time.perf_counter()
        status, metrics, reason = _attempt(pl, uri, root, queue_s)
        rows.append({"point": pl.point.label, "seed": pl.point.seed, "run": pl.run_id, "status": status,
                     "estimate_s": getattr(pl, "estimate_s", None),
                     "metrics": metrics, "wall_s": time.perf_counter() - t0})
        _ended(rows[-1], reason)
    return rows


# ---- N points at once: worker processes -------------------------------------------------------------

class _Lines:
    """A text stream that writes whole lines to `out`, each prefixed (the worker's point label). A progress
    bar redraws itself with carriage returns: of those redraws, one line per `every` seconds is shown."""

    def __init__(self, out, prefix: str, every: float = 15.0):
        self.out, self.prefix, self.every, self.buf, self.shown = out, prefix, every, "", 0.0

    def write(self, s: str) -> int:
        pieces = re.split(r"([\r\n])", self.buf + s)  # text, separator, text, separator, ..., the unended rest
        self.buf, lines = pieces[-1], []
        for text, sep in zip(pieces[0::2], pieces[1::2]):
            if not text.strip():
                continue
            if sep == "\n":
                lines.append(f"{self.prefix}{text}\n")
            elif time.monotonic() - self.shown >= self.every:
                lines.append(f"{self.prefix}{text}\n")
                self.shown = time.monotonic()
        if lines:
            self.out.write("".join(lines))
            self.out.flush()
        return len(s)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False


def _launch_ended(launch: int) -> None:
    """Return once the launch process `launch` has ended (killed -9 included). A worker's parent is the fork
    server, which lives as long as any worker does, so the worker watches the launch itself: a pidfd, readable
    when the process exits; without one (Linux < 5.3), its /proc entry, once a second."""
    try:
        fd = os.pidfd_open(launch)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        import select
        select.select([fd], [], [])
        return
    while True:
        try:
            if Path(f"/proc/{launch}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (OSError, IndexError):
            return
        time.sleep(1)


def _serve(conn, threads: int, launch: int) -> None:
    """A worker process: runs the points it is sent, one at a time, with `threads` threads. `launch`: the
    launch's pid."""
    import _thread

    import mlflow.tracking  # noqa: F401 - here, not in the first point: a Ctrl-C inside an import breaks it
    import torch
    os.setpgrp()  # Ctrl-C in a terminal reaches the launch, not the points (the launch tells each worker once)
    torch.set_num_threads(threads)
    os.environ["MIMSWEEP_WORKER_CPUS"] = str(threads)  # data.num_workers=auto shares the CPUs, too
    orphan = threading.Event()

    stopped = threading.Event()

    def interrupted(_signum, _frame):  # -> run_point marks its run KILLED with this reason
        stopped.set()
        raise KeyboardInterrupt("the launch process died" if orphan.is_set() else "the launch was stopped")
    signal.signal(signal.SIGINT, interrupted)  # even when the launch itself was started ignoring SIGINT

    def watch() -> None:  # the launch was killed (-9): stop the point as the launch would have
        _launch_ended(launch)
        orphan.set()
        _thread.interrupt_main()
    threading.Thread(target=watch, daemon=True).start()
    out, err = sys.stdout, sys.stderr
    conn.send("ready")  # imports done: a point sent now starts at once (its run is created just before)
    while True:
        try:
            job = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is None:
            return
        pl, uri, root, queue_s = job
        sys.stdout, sys.stderr = _Lines(out, f"  {pl.point.label} | "), _Lines(err, f"  {pl.point.label} | ")
        try:
            conn.send(_attempt(pl, uri, root, queue_s))
        except KeyboardInterrupt:  # run_point marked its run KILLED
            return
        finally:
            sys.stdout, sys.stderr = out, err
        if stopped.is_set():  # interrupted, though its point ended another way: no next point
            return


class _Worker:
    def __init__(self, ctx, threads: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, threads, os.getpid()), name="mimsweep-worker")
        self.proc.start()
        child.close()
        # The worker's own handle: its state as the fork server reports it is lost if the fork server dies
        # (SIGTERM to the launch's process group reaches it), while the worker itself may still run.
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.job = None  # (index, Planned, row, t0) while it runs a point
        self.started = False

    def signal(self, sig: int) -> None:
        """Send `sig` to the worker if it still runs (through its pidfd: never to a pid reused since)."""
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            elif self.proc.is_alive():
                os.kill(self.proc.pid, sig)
        except (ProcessLookupError, OSError):
            pass

    def wait(self, timeout: float) -> bool:
        """Whether the worker has ended within `timeout` seconds."""
        if self.pidfd is None:
            self.proc.join(timeout=timeout)
            return not self.proc.is_alive()
        import select
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def start_up(self) -> None:
        """Wait until the process has imported everything (seconds, once), so that a point's run, created
        when it is sent, starts when its work does."""
        if not self.started:
            if self.conn.recv() != "ready":
                raise RuntimeError("a worker process said something else than ready")
            self.started = True


PRELOAD = [*WORKER_IMPORTS, "cluster.local"]  # what the fork server imports once for every worker


def _context():
    """Workers are forked from a fork server: a clean interpreter (no thread, lock, open store or MLflow client
    of the launch) started once per launch, which imports PRELOAD once for every worker: 2 workers import
    it once, not twice (`spawn` would start each worker from scratch)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _run_parallel(todo, uri: str, root: Path, workers: int, open_run=None, queued_at: float | None = None) -> list[dict]:
    from core import tracking
    threads = max(1, cpu_count() // workers)
    print(f"running {workers} points at a time, {threads} thread(s) each (cluster.workers)", flush=True)
    ctx = _context()
    pool = [_Worker(ctx, threads) for _ in range(workers)]
    rows = [{"point": pl.point.label, "seed": pl.point.seed, "run": pl.run_id, "status": "KILLED", "metrics": {},
             "wall_s": 0.0, "estimate_s": getattr(pl, "estimate_s", None)} for pl in todo]
    pending, ended = list(range(len(todo))), set()

    def ready(i: int) -> bool:  # an `after` point waits for its trainer of this launch to end
        after = todo[i].after if todo[i].pretrain == "after" else None
        return not any(after is pl and j not in ended for j, pl in enumerate(todo))

    try:
        while pending or any(w.job for w in pool):
            for w in pool:
                if w.job is None and pending:
                    i = next((i for i in pending if ready(i)), None)
                    if i is None:
                        if any(x.job for x in pool):
                            break
                        i = pending[0]  # nothing runs that it could wait for: let run_point say what is missing
                    pending.remove(i)
                    w.start_up()
                    queue_s = _open(todo[i], open_run, queued_at)
                    rows[i]["run"] = todo[i].run_id
                    _started(i + 1, len(todo), todo[i])
                    w.job = (i, time.perf_counter())
                    w.conn.send((todo[i], uri, root, queue_s))
            busy = [w for w in pool if w.job]
            wait([x for w in busy for x in (w.conn, w.proc.sentinel)])
            for k, w in enumerate(pool):
                if w.job is None or not (w.conn.poll() or not w.proc.is_alive()):
                    continue
                i, t0 = w.job
                row = rows[i]
                try:
                    row["status"], row["metrics"], reason = w.conn.recv()
                except EOFError:  # died without a word: nothing in it could mark its run
                    w.proc.join(timeout=10)
                    code = w.proc.exitcode
                    if code == 0:  # its own Ctrl-C (SIGINT to the worker alone): run_point marked the run KILLED
                        row["status"], reason = "KILLED", "its worker process was interrupted (SIGINT)"
                    else:
                        reason = (f"the worker process running it died ({signal.Signals(-code).name})"
                                  if code and code < 0 else f"the worker process running it exited with code {code}")
                        row["status"] = "FAILED"
                        try:
                            tracking.set_status(tracking.job_client(uri), todo[i].run_id, "FAILED", reason)
                        except Exception as e:  # noqa: BLE001 - the launch marks it when it ends
                            print(f"warning: could not mark run {todo[i].run_id} FAILED: {e}", file=sys.stderr)
                    w.close()
                    pool[k] = _Worker(ctx, threads)
                row["wall_s"] = time.perf_counter() - t0
                ended.add(i)
                pool[k].job = None
                _ended(row, reason, f"{todo[i].point.label}: ")
    except BaseException:  # Ctrl-C / SIGTERM / a bug here: stop the points, each marks its run KILLED
        for w in pool:
            if w.job:
                w.signal(signal.SIGINT)
        raise
    finally:
        for w in pool:  # a busy one reads it after its point (one that was told to stop exits before)
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in pool:
            if not w.wait(120):
                w.signal(signal.SIGKILL)
                w.wait(10)
            w.proc.join(timeout=1)
            w.close()
    return rows


def print_summary(rows: list[dict], skipped: int, report_cmd: str | None, wall_s: float | None = None,
                  estimate_s: float | None = None) -> None:
    """The table a local sweep ends with (each point's wall time beside its estimate, cluster/estimate.py, and
    the sweep's), and the command to run next."""
    keys = sorted({k for r in rows for k in r["metrics"]})
    est = any(r.get("estimate_s") for r in rows)
    head = ["point", "seed", "status", *keys, "wall", *(["estimate"] if est else [])]
    body = [[r["point"], str(r["seed"]), r["status"], *(f"{r['metrics'][k]:.2f}" if k in r["metrics"] else "-"
                                                        for k in keys), f"{r['wall_s']:.0f} s",
             *([f"{r['estimate_s']:.0f} s" if r.get("estimate_s") else "-"] if est else [])] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    print("\nsummary" + (f" ({skipped} point(s) skipped: already finished)" if skipped else ""))
    for line in [head, *body]:
        print("  " + "  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    if wall_s is not None:
        print(f"sweep: {wall_s:.0f} s" + (f" (estimate {estimate_s:.0f} s)" if estimate_s else ""))
    if report_cmd:
        print(f"next: {report_cmd}")



class Local(Backend):
    """The points on this machine (`cluster.workers` at a time); ends with the summary and the report command.
    A point's run is created when it starts (`opens_runs_at_start`)."""

    opens_runs_at_start = True

    def describe(self, todo) -> str:
        w = workers_for(self.cfg, len(todo))
        how = "one after another" if w == 1 else f"{w} at a time, {max(1, cpu_count() // w)} thread(s) each"
        return f"dry run: nothing was started ({len(todo)} point(s) would run here, {how})."

    def start(self, c, parent, todo, handed_over, skipped) -> int:
        import json
        import shlex

        from core import tracking
        launched = c.get_run(parent).info.start_time / 1000
        t0 = time.perf_counter()
        rows = run_all(todo, self.uri, self.root, workers_for(self.cfg, len(todo)), self.open_run, launched)
        wall = time.perf_counter() - t0
        handed_over.update(pl.run_id for pl in todo)   # run_point ended each of them, one way or another
        failed = sum(r["status"] != "FINISHED" for r in rows)
        report = None
        if self.sweep != "single":  # the report composes the same grid: it takes the launch's overrides
            report = "python reports/build.py " + " ".join(
                shlex.quote(tracking.redact_text(o, self.raw_uri)) for o in self.task_overrides
                if not o.startswith("hydra"))
        print_summary(rows, skipped, report, wall, getattr(self, "estimate_s", None))
        if failed:  # a point may have failed because the store is down: wait for it as long as a job does
            c = c.within(float(self.cfg.tracking.get("outage_wait_s", 0) or 0))
        faults.point("launch.points_done")  # tests/test_reliability.py: killed before it closes its own run
        try:
            c.set_tag(parent, tracking.TAG + "summary",
                      json.dumps({"ran": len(todo), "failed": failed, "skipped": skipped}))
            tracking.set_status(c, parent, "FAILED" if failed else "FINISHED")
        except tracking.TrackingUnavailable:
            print("[mimsweep] the launch run's summary is not recorded: the tracking store does not answer "
                  "(its points' metrics are spooled, see above); the next launch closes the run", flush=True)
        return 1 if failed else 0
