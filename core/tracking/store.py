"""Where runs are stored and how mimsweep talks to the store: URIs, credentials, clients, experiments.

Credentials: a tracking URI may carry them (`http://user:secret@host:5000`). They are never stored or
printed: `client()` strips the user-info from the URI and hands it to MLflow through its own variables
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (unless the user set those already), and every URI
that is shown, tracked or written uses `redact()` (`http://user:***@host:5000`). SLURM jobs get the
same two variables through sbatch's exported environment, never through the script (cluster/slurm.py).

Stores: a default SQLite store is created (schema and migrations) under a file lock next to the
database, so parallel launches on a fresh store do not race; experiments are create-or-get.
A job's client gives up on an unreachable server quickly and waits out an outage at the points that need
the server (`patiently`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit


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
    if not db.is_file():
        if not create:
            return None
        from filelock import FileLock, Timeout
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(db) + ".lock")
        try:  # held only while the store is made: a launch waits its turn as long as that takes, never gives up
            lock.acquire(timeout=10)
        except Timeout:
            print(f"waiting for another launch that is creating the tracking store {db} ...", flush=True)
            lock.acquire()
        try:
            if not db.is_file():
                _create_sqlite(db)
        finally:
            lock.release()
    c = client(uri)  # an existing store (made whole by one rename) needs no lock to be read and written
    c.search_experiments(max_results=1)
    return c


def _create_sqlite(db: Path) -> None:
    """The schema in `.NAME.PID.tmp`, then one rename (under the caller's lock; stale temps are removed).
    The schema is a copy of an empty store this machine made once for this MLflow version (schema_template):
    MLflow's own creation runs ~100 schema migrations, 2-14 s, at every new output_root."""
    import shutil
    import sqlite3

    from core import faults
    for stale in db.parent.glob(f".{db.name}.*.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    artifacts = (db.parent / "mlartifacts").as_uri()
    template = schema_template()
    if template is None:
        _new_sqlite(tmp, artifacts)
    else:  # the one row that holds a path or a time: MLflow's Default experiment, as MLflow would make it here
        shutil.copyfile(template, tmp)
        now = int(time.time() * 1000)
        with sqlite3.connect(tmp) as con:
            con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                        "WHERE experiment_id = 0", (f"{artifacts}/0", now, now))
        con.close()
    faults.point("store.created")
    os.replace(tmp, db)


def _new_sqlite(path: Path, artifacts: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    store = SqlAlchemyStore(f"sqlite:///{path}", artifacts)
    store.engine.dispose()


def schema_template() -> Path | None:
    """An empty store made by MLflow itself, once per MLflow version, in core.config.cache_dir() (~/.cache/mimsweep);
    None where that folder cannot be written (then every store is made by MLflow)."""
    import mlflow
    from core.config import cache_dir
    folder = cache_dir()
    path = folder / f"mlflow-{mlflow.__version__}-empty.db"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        _new_sqlite(tmp, (folder / "mlartifacts").as_uri())
        os.replace(tmp, path)  # made whole, then renamed: a concurrent launch sees all of it or none
        return path
    except OSError:
        return None


def find_experiment(c, name: str) -> str | None:
    """Read-only: the id of a live experiment, or None."""
    exp = c.get_experiment_by_name(name) if c is not None else None
    return exp.experiment_id if exp is not None and exp.lifecycle_stage != "deleted" else None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of the store keeps its artifacts: beside a SQLite database (not in the caller's
    CWD); None (the server's own choice) for a server."""
    return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None


def experiment_id(c, name: str, uri: str) -> str:
    """Create-or-get: a launch racing another one for the same new experiment gets the winner's."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = artifact_location(uri)
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - RESOURCE_ALREADY_EXISTS (server) / unique constraint (SQL store)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


UI_VIEW = "workflowType=machine_learning"  # MLflow 3.17's UI opens an experiment on its runs only with this


def ui_link(uri: str, exp_id: str) -> str:
    """Where a user sees the experiment's runs in MLflow's UI. Its GenAI / Model training switch (kept in the
    browser, GenAI by default) decides whether an experiment opens on traces or runs, whatever the
    experiment's kind tag says; the link's `workflowType` parameter sets it to Model training. A SQLite store
    has no server: the line says the command that serves one."""
    path = f"#/experiments/{exp_id}/runs?{UI_VIEW}"
    clean = split_credentials(uri)[0]
    if clean.startswith(("http://", "https://")):
        return f"{clean.rstrip('/')}/{path}"
    return f"`mlflow ui --backend-store-uri {redact(uri)}`, then http://127.0.0.1:5000/{path}"


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
            if time.monotonic() >= deadline or not transient(e):
                if transient(e):
                    raise TrackingUnavailable(
                        f"the tracking store did not answer for {wait_s:.0f} s (tracking.outage_wait_s; sending "
                        f"{what}): {type(e).__name__}: {str(e)[:160]}. Relaunch the sweep when the server is back: "
                        "the run resumes from its checkpoint and sends its spooled metrics") from e
                raise
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))


def transient(e: BaseException) -> bool:
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
