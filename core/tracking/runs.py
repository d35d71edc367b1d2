"""MLflow layout of a sweep, and the buffered metric logger of a job.

- one experiment per sweep (named after it), a *parent* run per launch, a *child* run per grid point;
- child params: the flattened resolved config, with the config's own key names (`method.mask_ratio`);
- child tags: sweep, row label, the point's overrides, git commit/dirty, host, launch, and its identity
  (core/identity.py): `pretrain_signature`, `eval_signature`, the legacy `signature`; `checkpoint` (the
  absolute path of the finished pre-training's checkpoint, set by the job that trained it) or, on a run
  that only evaluates another's pre-training, `pretrained_by` (that run's id) and `pretrained_checkpoint`;
- child metrics: `train_loss`/`lr`/`throughput_img_s` per logged step (sent in batches at every
  checkpoint, never one blocking call per step), `knn_top1`, `linear_top1`, their `floor_` twins at
  random init, `pretrain_wall_s`, `wall_s`;
- artifact: `config.yaml`, the resolved config.
A point's identity finds its runs again: FINISHED ones are skipped by the next launch, others resumed, and
finished pre-trainings are found in the whole store (sweeps/plan.py decide).

Credentials: a tracking URI may carry them (`http://user:secret@host:5000`). They are never stored or
printed: `client()` strips the user-info from the URI and hands it to MLflow through its own variables
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (unless the user set those already), and every URI
that is shown, tracked or written uses `redact()` (`http://user:***@host:5000`). SLURM jobs get the
same two variables through sbatch's exported environment, never through the script (cluster/slurm.py).

Stores: a default SQLite store is created (schema and migrations) under a file lock next to the
database, so parallel launches on a fresh store do not race; experiments are create-or-get.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from core.config import REPO, flatten

TAG = "mimsweep."
FINISHED = "FINISHED"


def resolve_uri(uri: str | None, output_root: str | Path) -> str:
    """Explicit uri > $MLFLOW_TRACKING_URI > sqlite file under output_root (absolute, so that jobs started
    from another folder or node write to the same store). Creates nothing: see open_store()."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """'http://user:pw@host:5000/x' -> ('http://host:5000/x', 'user', 'pw'); URIs without user-info unchanged."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc or parts.scheme in ("sqlite", "file", ""):
        return uri, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, unquote(password) if sep else None


def redact(uri: str | None) -> str | None:
    """The URI as it may be shown or stored: the password replaced by ***."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc or parts.scheme in ("sqlite", "file", ""):
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, _ = userinfo.partition(":")
    return urlunsplit((parts.scheme, f"{user}:***@{hostport}" if sep else f"{user}@{hostport}", parts.path,
                       parts.query, parts.fragment))


def redact_text(text: str, uri: str | None) -> str:
    """`text` with every occurrence of the URI's password (raw and %-encoded) replaced by ***."""
    if not uri:
        return text
    _, _, password = split_credentials(uri)
    raw_pw = urlsplit(uri).netloc.rpartition("@")[0].partition(":")[2]
    for secret in {password, raw_pw} - {None, ""}:
        text = text.replace(secret, "***")
    return text


CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def use_credentials(uri: str) -> str:
    """Move the URI's user-info into MLflow's credential variables of this process (and so of the jobs it
    starts); returns the URI without it. Variables the user set themselves win."""
    clean, user, password = split_credentials(uri)
    for var, value in zip(CREDENTIAL_VARS, (user, password)):
        if value is not None:
            os.environ.setdefault(var, value)
    return clean


def client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=use_credentials(uri))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def open_store(uri: str, create: bool):
    """A client whose store answers. A SQLite store that does not exist is created only when `create`
    (else None: nothing to read, and a dry run must write nothing); its creation and schema migration run
    under an exclusive file lock next to the database, so parallel launches never race on them. A new store
    is built as a temp file and renamed into place: a launch killed while creating it (MLflow's dozens of
    schema migrations take seconds) leaves no half-made database that every later launch would trip on."""
    db = sqlite_path(uri)
    if db is None:
        c = client(uri)
        c.search_experiments(max_results=1)
        return c
    if not create and not db.is_file():
        return None
    from filelock import FileLock
    if create:
        db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        if not db.is_file():
            _create_sqlite(db)
        c = client(uri)
        c.search_experiments(max_results=1)  # creates / migrates the schema, once, under the lock
    return c


def reachable(url: str, timeout: float) -> str | None:
    """None if a TCP connection to the URL's host opens within `timeout` s (name lookup included), else
    why not. A quick probe before a client whose own retries take minutes to give up (MLflow's HTTP)."""
    from concurrent.futures import ThreadPoolExecutor, TimeoutError
    parts = urlsplit(url)
    default = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
    host, port = parts.hostname, parts.port or default.get(parts.scheme.split("+")[0], 443)
    if not host:
        return f"the URI names no host"
    pool = ThreadPoolExecutor(1)
    try:
        pool.submit(lambda: socket.create_connection((host, port), timeout=timeout).close()).result(timeout)
        return None
    except TimeoutError:
        return f"{host}:{port} did not answer within {timeout:g} s"
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or e})"
    finally:
        pool.shutdown(wait=False)


def _create_sqlite(db: Path) -> None:
    """The schema in `.NAME.PID.tmp`, then one rename (under the caller's lock; stale temps are removed)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from core import faults
    for stale in db.parent.glob(f".{db.name}.*.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    store = SqlAlchemyStore(f"sqlite:///{tmp}", (db.parent / "mlartifacts").as_uri())
    store.engine.dispose()
    faults.point("store.created")
    os.replace(tmp, db)


@functools.lru_cache(maxsize=1)  # once per launch, not twice per point of a 1,000-point grid
def git_state() -> tuple[str, bool]:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit or "unknown", dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def find_experiment(c, name: str) -> str | None:
    """Read-only: the id of a live experiment, or None."""
    exp = c.get_experiment_by_name(name) if c is not None else None
    return exp.experiment_id if exp is not None and exp.lifecycle_stage != "deleted" else None


def experiment_id(c, name: str, uri: str) -> str:
    """Create-or-get: a launch racing another one for the same new experiment gets the winner's."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the caller's CWD
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - RESOURCE_ALREADY_EXISTS (server) / unique constraint (SQL store)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _search_all(c, exp_ids: list[str], flt: str) -> list:
    """Every run of the experiments matching the filter, oldest first (paged)."""
    runs, token = [], None
    while exp_ids:
        page = c.search_runs(exp_ids, filter_string=flt, max_results=1000, page_token=token,
                             order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def point_runs(c, exp_id: str, sweep: str | None = None) -> list:
    """The point runs of an experiment (of one sweep), oldest first: one paged search."""
    flt = f"tags.`{TAG}sweep` = '{sweep}'" if sweep else ""
    return [r for r in _search_all(c, [exp_id], flt) if r.data.tags.get(TAG + "kind") == "point"]


def pretrainings(c, write: bool = True, exp_ids: list[str] | None = None) -> list:
    """Every point run of the store (all experiments, or only `exp_ids`) that pre-trains itself, oldest first:
    the candidates a point of any sweep may reuse (core/identity.py). Runs that only evaluate another's
    checkpoint are left out."""
    if exp_ids is None:
        exp_ids, token = [], None
        while True:
            page = c.search_experiments(max_results=1000, page_token=token)
            exp_ids += [e.experiment_id for e in page]
            token = page.token
            if not token:
                break
    runs = []
    for i in range(0, len(exp_ids), 100):
        runs += _search_all(c, exp_ids[i:i + 100], f"tags.`{TAG}pretrain_signature` LIKE '%'")
        runs += migrate_legacy(c, exp_ids[i:i + 100], write)
    runs.sort(key=lambda r: r.info.start_time or 0)
    return [r for r in runs if r.data.tags.get(TAG + "kind") == "point" and not r.data.tags.get(TAG + "pretrained_by")]


def migrate_legacy(c, exp_ids: list[str], write: bool = True) -> list:
    """The migration of FINISHED point runs tracked before core/identity.py (only `mimsweep.signature`):
    their pre-training and evaluation signatures, work folder and checkpoint are worked out from their own
    `config.yaml` artifact (the resolved config the old code stored) and written as the tags the current
    code sets (`write`; a dry run only adds them in memory), with `mimsweep.identity_migrated`. From then on
    they are pre-trainings like any other: a point whose evaluation changed evaluates their checkpoint
    instead of pre-training again. Returns those runs."""
    import tempfile

    from omegaconf import OmegaConf

    from core import identity
    found = _search_all(c, exp_ids, f"tags.`{TAG}kind` = 'point' and attributes.status = 'FINISHED'")
    out, names = [], {}
    for r in found:
        tags = r.data.tags
        if tags.get(TAG + "pretrain_signature") or not tags.get(TAG + "signature") or tags.get(TAG + "pretrained_by"):
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = OmegaConf.create(Path(c.download_artifacts(r.info.run_id, "config.yaml", tmp)).read_text())
            if r.info.experiment_id not in names:
                names[r.info.experiment_id] = c.get_experiment(r.info.experiment_id).name
            workdir = (Path(cfg.output_root).resolve() / "runs" / names[r.info.experiment_id]
                       / f"{tags[TAG + 'signature']}-{r.info.run_id[:8]}")
            new = {TAG + "pretrain_signature": identity.pretrain_signature(cfg),
                   TAG + "eval_signature": identity.eval_signature(cfg), TAG + "workdir": str(workdir),
                   TAG + "identity_migrated": "from config.yaml"}
        except Exception as e:  # noqa: BLE001 - no config.yaml, a method this code lacks: leave it as it was
            print(f"note: run {r.info.run_id[:8]} (tracked by an older mimsweep) keeps its old identity: "
                  f"{type(e).__name__}: {str(e)[:120]}")
            continue
        if (workdir / "checkpoint.pt").is_file():
            new[TAG + "checkpoint"] = str(workdir / "checkpoint.pt")
        if write:
            for k, v in new.items():
                c.set_tag(r.info.run_id, k, v)
        r.data.tags.update(new)
        out.append(r)
    return out


def finished_checkpoint(run) -> str | None:
    """The absolute path of the run's finished pre-training checkpoint if the job recorded one and the file is
    still there, else None."""
    path = run.data.tags.get(TAG + "checkpoint")
    return path if path and Path(path).is_file() else None


def runs_by_signature(c, exp_id: str, sweep: str | None = None) -> dict:
    """{legacy signature: latest run} of an experiment (one paged search, not one call per point)."""
    runs = point_runs(c, exp_id, sweep)
    out = {}
    for r in runs:
        sig = r.data.tags.get(TAG + "signature")
        if sig and r.data.tags.get(TAG + "kind") == "point":
            out[sig] = r  # later runs overwrite earlier ones
    return out


def start_launch(c, exp_id: str, sweep: str, overrides: list[str], n_points: int) -> str:
    commit, dirty = git_state()
    run = c.create_run(exp_id, run_name=f"{sweep} launch {time.strftime('%Y-%m-%d %H:%M:%S')}", tags={
        TAG + "kind": "launch", TAG + "sweep": sweep, TAG + "overrides": json.dumps(overrides),
        TAG + "points": str(n_points), TAG + "git_commit": commit, TAG + "git_dirty": str(dirty),
        TAG + "host": socket.gethostname(), TAG + "pid": str(os.getpid()), "mlflow.source.git.commit": commit})
    return run.info.run_id


def close_orphaned_launches(c, exp_id: str) -> list[str]:
    """Launch runs left RUNNING by a launch process of this host that no longer exists (killed with -9, or
    it ended while the store was unreachable): marked FAILED with that reason. -> their ids."""
    host, closed = socket.gethostname(), []
    runs = c.search_runs([exp_id], filter_string=f"tags.`{TAG}kind` = 'launch' and attributes.status = 'RUNNING'",
                         max_results=1000)
    for r in runs:
        tags = r.data.tags
        if tags.get(TAG + "host") != host or not tags.get(TAG + "pid", "").isdigit():
            continue
        try:
            os.kill(int(tags[TAG + "pid"]), 0)
            continue  # alive: a launch running now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        set_status(c, r.info.run_id, "FAILED", "its launch process ended without closing it (killed, or the "
                   "tracking store was unreachable when it ended); its points are resumed by later launches")
        closed.append(r.info.run_id)
    return closed


def create_point_run(c, exp_id: str, parent_id: str | None, sweep: str, label: str, overrides: list[str],
                     sig: str, cfg, identity: dict | None = None) -> str:
    """A SCHEDULED child run holding the point's params, tags and resolved config. `sig`: the legacy
    signature (tag `signature`); `identity`: more tags (pretrain_signature, eval_signature, pretrained_by, ...)."""
    from mlflow.entities import Param, RunTag
    from omegaconf import OmegaConf

    commit, dirty = git_state()
    tags = {TAG + "kind": "point", TAG + "sweep": sweep, TAG + "label": label, TAG + "signature": sig,
            **{TAG + k: v for k, v in (identity or {}).items() if v is not None},
            TAG + "overrides": json.dumps(overrides), TAG + "git_commit": commit, TAG + "git_dirty": str(dirty),
            TAG + "host": socket.gethostname(), "mlflow.source.git.commit": commit}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run = c.create_run(exp_id, run_name=f"{label} seed={cfg.seed}", tags=tags)
    rid = run.info.run_id
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(rid, params=params[i:i + 100])
    c.log_text(rid, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    set_status(c, rid, "SCHEDULED")
    return rid


STATUSES = ("SCHEDULED", "RUNNING", "FINISHED", "FAILED", "KILLED")


def set_status(c, run_id: str, status: str, reason: str | None = None) -> None:
    """The one place a run's status is written. FAILED/KILLED carry their reason in `mimsweep.failure`,
    FAILED counts itself in `mimsweep.failures`; FINISHED removes a failure tag an earlier attempt left (a run that finished is not marked failed)."""
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}")
    if status == "FAILED":  # attempts: cluster.max_attempts failures and a launch no longer retries the point
        failures = int(c.get_run(run_id).data.tags.get(TAG + "failures", "0")) + 1
        c.set_tag(run_id, TAG + "failures", str(failures))
    if reason is not None:
        c.set_tag(run_id, TAG + "failure", reason[:5000])
    elif status == FINISHED and TAG + "failure" in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, TAG + "failure")
    if status in ("SCHEDULED", "RUNNING"):
        c.update_run(run_id, status=status)
    else:
        c.set_terminated(run_id, status)


# A job's client gives up on an unreachable server after ~10 s (MLflow's default retries take ~4 minutes);
# the job itself then waits out an outage at the points that need the server (see MetricLog, patiently).
JOB_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def job_client(uri: str):
    import logging
    for var, value in JOB_HTTP_ENV.items():
        os.environ.setdefault(var, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one line per retry otherwise
    return client(uri)


class TrackingUnavailable(RuntimeError):
    """The tracking store stayed unreachable longer than `tracking.outage_wait_s`."""


def patiently(fn, *args, wait_s: float = 0.0, what: str = "", **kwargs):
    """fn(*args) retried every few seconds while the store is unreachable, for up to wait_s seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - connection refused, 5xx, timeouts: all mean "try again later"
            if time.monotonic() >= deadline or not _transient(e):
                if _transient(e):
                    raise TrackingUnavailable(
                        f"the tracking store did not answer for {wait_s:.0f} s (tracking.outage_wait_s; sending "
                        f"{what}): {type(e).__name__}: {str(e)[:160]}. Relaunch the sweep when the server is back: "
                        "the run resumes from its checkpoint and sends its spooled metrics") from e
                raise
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))


def _transient(e: BaseException) -> bool:
    """Connection-level failures and server errors (5xx); not a bad request (4xx: retrying cannot help)."""
    if isinstance(e, (ConnectionError, TimeoutError)) or any(
            k.__module__.split(".")[0] in ("requests", "urllib3") for k in type(e).__mro__):
        return True
    from mlflow.exceptions import MlflowException
    if isinstance(e, MlflowException):
        text = str(e)
        return ("Max retries exceeded" in text or "Connection" in text or "timed out" in text.lower()
                or getattr(e, "get_http_status_code", lambda: 0)() >= 500)
    return False


def logged_at(c, run_id: str, keys: list[str], step: int) -> set[str]:
    """Those of `keys` the run already holds at `step`."""
    return {k for k in keys if any(m.step == step for m in c.get_metric_history(run_id, k))}


class MetricLog:
    """The metrics of one run, each sent exactly once however the job ends.

    `log(key, value, step)` buffers a metric (its timestamp taken now). The training loop writes every
    checkpoint with `pending()` inside it and calls `flush()` once the checkpoint is in place, so what the
    store holds is always covered by a checkpoint:
    - killed between the checkpoint's rename and the flush: the resumed job `replay()`s the metrics the
      checkpoint carries. The store drops exact duplicates (same key, value, timestamp, step), so a replay
      of metrics that did arrive adds nothing;
    - an exception between checkpoints (Ctrl-C, disk full, a crash): the job `drop()`s the buffer; the
      resumed job recomputes those steps from the checkpoint and logs them then, once;
    - the store unreachable at a flush (after the client's few retries): the batch is appended to a spool
      file in the job's work folder (fsync'd) and training goes on; every later flush, and the next job of
      the run, sends the spool first, then deletes it.
    """

    def __init__(self, c, run_id: str, enabled: bool = True, spool: Path | None = None, wait_s: float = 0.0):
        self.c, self.run_id, self.enabled, self.buffer = c, run_id, enabled, []
        self.spool, self.wait_s = (Path(spool) if spool else None), wait_s
        self.spooled = 0  # metrics written to the spool by this process (reported by the job)

    def __call__(self, key: str, value: float, step: int = 0) -> None:
        from mlflow.entities import Metric
        if self.enabled:
            self.buffer.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def pending(self) -> list[tuple]:
        """The buffered metrics as (key, value, timestamp, step): what a checkpoint written now carries."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self.buffer]

    def replay(self, records: list[tuple]) -> None:
        """Send metrics a checkpoint carried (again: duplicates of what arrived are dropped by the store)."""
        from mlflow.entities import Metric
        self._send([Metric(k, float(v), int(t), int(s)) for k, v, t, s in records])

    def flush(self) -> None:
        """Send the buffer: call it only when a checkpoint covers every buffered step (or at the job's end)."""
        batch, self.buffer = self.buffer, []
        self._send(batch)

    def drop(self) -> int:
        """Forget the metrics no checkpoint covers (the resumed job logs those steps again); -> how many."""
        n, self.buffer = len(self.buffer), []
        return n

    def drain(self, wait_s: float | None = None) -> bool:
        """Send the spool, waiting up to wait_s for the store; -> True when nothing is left spooled."""
        if not self.enabled or self.spool is None or not self.spool.exists():
            return True
        try:
            patiently(self._send_spool, wait_s=self.wait_s if wait_s is None else wait_s, what="spooled metrics")
            return True
        except TrackingUnavailable:
            return False

    def _send_spool(self) -> None:
        from mlflow.entities import Metric
        if not self.spool.exists():
            return
        records = []
        for line in self.spool.read_text().splitlines():
            try:
                records.append(Metric(*json.loads(line)))
            except (ValueError, TypeError):  # a line torn by a kill: its metrics are in the checkpoint too
                continue
        self._log(records)
        self.spool.unlink()

    def _log(self, metrics: list) -> None:
        for i in range(0, len(metrics), 1000):
            self.c.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _send(self, batch: list) -> None:
        if not self.enabled or not batch:
            return
        try:
            if self.spool is not None and self.spool.exists():
                self._send_spool()
            self._log(batch)
        except Exception as e:  # noqa: BLE001
            if self.spool is None or not _transient(e):
                raise
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spool, "a") as f:
                for m in batch:
                    f.write(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if not self.spooled:
                print(f"[mimsweep] tracking store unreachable ({type(e).__name__}); metrics go to {self.spool} "
                      "and are sent when it answers again", flush=True)
            self.spooled += len(batch)

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            patiently(self.c.set_tag, self.run_id, key if key.startswith("mlflow.") else TAG + key, value,
                      wait_s=self.wait_s, what="a tag")
