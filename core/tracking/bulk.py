"""Many runs read or written at once: what reports and the site read from a store of any size, and the runs
a big launch creates.

MLflow's `search_runs` on a database store builds an ORM object per param, tag and metric of every run:
10,000 runs of ~110 params took 33 s here (bench/site_scale.py). A database store (SQLite, PostgreSQL,
MySQL: MLflow's SqlAlchemyStore) is therefore read through MLflow's own engine and table models with one
column query per table (runs, tags, params, latest metrics), which returns the same values in about a
twentieth of the time; any other store (a tracking server) through the paged search. Both give the same
records (tests/test_site.py compares them on one store). Only live runs of live experiments are read,
as the search's default view does.

A record has the attributes reports use of an MLflow Run: `info.run_id / experiment_id / status /
start_time / end_time / run_name` and `data.tags / params / metrics` (the latest value of each metric;
NaN stays NaN), plus `data.metric_time`: the latest timestamp among those metrics (ms, 0 if none).

Writing: a SLURM launch creates every point's run before it submits (the queue outlives the launch). Through
the client that is 5 transactions a run (create, two batches of params, status, identity tags), each a
commit with an fsync on SQLite: ~70 ms a point, 71 s for 1,000 (docs/performance.md). `create_runs` writes
all of them, with the rows MLflow's own `create_run` / `log_batch` would write, in one transaction through
MLflow's engine and table models; `set_tags` the same for one tag per run. Both answer False on any other
store (a tracking server), where the caller writes run by run. tests/test_tracking_bulk.py compares runs
written both ways through the REST API.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

CHUNK = 500  # run ids per IN (...) of a history query: far below any database's bound-parameter limit
SCAN_ABOVE = 2000  # more runs than this are read in one pass over each table (a metric key's entries) instead of by run


@dataclass
class Info:
    run_id: str
    experiment_id: str
    status: str
    start_time: int | None = None
    end_time: int | None = None
    run_name: str = ""


@dataclass
class Data:
    tags: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    metric_time: int = 0


@dataclass
class Record:
    """One run: `info` and `data` as on an MLflow Run."""
    info: Info
    data: Data


def _sql_store(c):
    """The client's SqlAlchemyStore, or None for any other store."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    store = c._tracking_client.store  # the client has no bulk read of its own
    return store if isinstance(store, SqlAlchemyStore) else None


def experiments(c) -> dict[str, str]:
    """{experiment id: name} of every live experiment."""
    out, token = {}, None
    while True:
        page = c.search_experiments(max_results=1000, page_token=token)
        out.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            return out


def runs(c, experiment_ids: list[str], tags: dict[str, str] | None = None, detail=None) -> list[Record]:
    """Every live run of these experiments that carries all of `tags` (key: value), oldest first. `detail(tags)`:
    whether a run's params and metrics are wanted (a report: only the runs its plan matches, by their identity
    tags; the others of the sweep, earlier variants, come with their info and tags only). None: all of them."""
    if not experiment_ids:
        return []
    store = _sql_store(c)
    return _runs_sql(store, experiment_ids, tags or {}, detail) if store else _runs_search(c, experiment_ids, tags or {})


def record_of(run) -> Record:
    """An MLflow Run as a record."""
    i, d = run.info, run.data
    stamps = [m.timestamp or 0 for m in getattr(d, "_metric_objs", [])]
    return Record(Info(i.run_id, i.experiment_id, i.status, i.start_time, i.end_time, i.run_name or ""),
                  Data(dict(d.tags), dict(d.params), dict(d.metrics), max(stamps, default=0)))


def _runs_search(c, experiment_ids: list[str], tags: dict[str, str]) -> list[Record]:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    out = []
    for i in range(0, len(experiment_ids), 100):  # the search takes at most 100 experiments a call
        token = None
        while True:
            page = c.search_runs(experiment_ids[i:i + 100], filter_string=flt, max_results=1000, page_token=token,
                                 order_by=["attributes.start_time ASC"])
            out += [record_of(r) for r in page]
            token = page.token
            if not token:
                break
    return sorted(out, key=lambda r: r.info.start_time or 0)


def _runs_sql(store, experiment_ids: list[str], tags: dict[str, str], detail=None) -> list[Record]:
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import exists, select

    chosen = select(SqlRun.run_uuid, SqlRun.experiment_id, SqlRun.status, SqlRun.start_time, SqlRun.end_time,
                    SqlRun.name).where(SqlRun.experiment_id.in_([int(e) for e in experiment_ids]),
                                       SqlRun.lifecycle_stage == "active")
    for k, v in tags.items():  # per run of these experiments, a look-up of its tag (not every run's tag of that key)
        chosen = chosen.where(exists().where(SqlTag.run_uuid == SqlRun.run_uuid, SqlTag.key == k, SqlTag.value == v))
    with store.ManagedSessionMaker() as session:
        db = session.connection()  # SQLAlchemy Core: rows as tuples, no ORM bookkeeping per row
        out = {r[0]: Record(Info(r[0], str(r[1]), r[2], r[3], r[4], r[5] or ""), Data()) for r in db.execute(chosen)}
        ids = list(out)

        # Most of the store (the site): one pass over each table in its stored order, keeping the chosen runs'
        # rows. Through the run index instead, SQLite jumps from run to run across the table in the index's
        # (random: uuid) order, a disk read a run when the file is not in the page cache (bench/site_scale.py,
        # 10,000 runs, cold: 9.4 s read by run, 3.5 s in one pass). A few runs (a report): by run id.
        def rows_of(*columns):  # columns[0] is the table's run_uuid
            if len(ids) > SCAN_ABOVE:
                yield from db.execute(select(*columns))
            else:
                for i in range(0, len(ids), CHUNK):
                    yield from db.execute(select(*columns).where(columns[0].in_(ids[i:i + CHUNK])))

        for run_id, key, value in rows_of(SqlTag.run_uuid, SqlTag.key, SqlTag.value):
            if run_id in out:
                out[run_id].data.tags[key] = value
        if detail is not None:  # params (~110 a run) and metrics of the wanted runs only
            ids = [i for i in ids if detail(out[i].data.tags)]
            wanted = set(ids)
        else:
            wanted = out
        for run_id, key, value in rows_of(SqlParam.run_uuid, SqlParam.key, SqlParam.value):
            if run_id in wanted:
                out[run_id].data.params[key] = value
        for run_id, key, value, stamp, is_nan in rows_of(SqlLatestMetric.run_uuid, SqlLatestMetric.key,
                                                         SqlLatestMetric.value, SqlLatestMetric.timestamp,
                                                         SqlLatestMetric.is_nan):
            if run_id in wanted:
                d = out[run_id].data
                d.metrics[key] = math.nan if is_nan else value
                d.metric_time = max(d.metric_time, stamp or 0)
    return sorted(out.values(), key=lambda r: (r.info.start_time or 0))


def histories(c, run_ids: list[str], key: str) -> dict[str, list] | None:
    """{run id: [(step, value, timestamp ms), ...]} of one metric of many runs from a database store in
    one query per CHUNK runs (unsorted); None for any other store."""
    store = _sql_store(c)
    if store is None:
        return None
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from sqlalchemy import select

    out: dict[str, list] = {r: [] for r in run_ids}
    columns = (SqlMetric.run_uuid, SqlMetric.step, SqlMetric.value, SqlMetric.timestamp, SqlMetric.is_nan)
    if len(run_ids) > SCAN_ABOVE:
        # most of a store: one pass over the metric's entries in the primary key, which starts with the key
        # and holds every column read here (SQLite, 10,000 runs: 0.6 s instead of 2.6 s by run)
        queries = [select(*columns).where(SqlMetric.key == key)]
    else:  # a few runs (the running points of a sweep): through the (run, key, step) index
        queries = [select(*columns).where(SqlMetric.key == key, SqlMetric.run_uuid.in_(run_ids[i:i + CHUNK]))
                   for i in range(0, len(run_ids), CHUNK)]
    with store.ManagedSessionMaker() as session:
        db = session.connection()  # SQLAlchemy Core: rows as tuples, no ORM bookkeeping per row
        for q in queries:
            for run_id, step, value, stamp, is_nan in db.execute(q):
                if run_id in out:
                    out[run_id].append((step, math.nan if is_nan else value, stamp))
    return out


def writes_in_bulk(c) -> bool:
    """Whether `create_runs` / `set_tags` write to this client's store in one transaction."""
    return _sql_store(c) is not None


def create_runs(c, experiment_id: str, runs: list[dict]) -> bool:
    """Create runs in one transaction on a database store: each {"run_id" (32 hex), "name", "tags", "params",
    "status", "config" (text of its `config.yaml` artifact, or None)}, started now. The rows are those MLflow's
    `create_run` and `log_batch` write (the `mlflow.runName` tag, user "unknown" unless `mlflow.user` is a
    tag), checked by MLflow's own validators first. -> False, writing nothing, on any other store."""
    store = _sql_store(c)
    if store is None:
        return False
    from mlflow.entities import LifecycleStage, SourceType
    from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
    from mlflow.utils.time import get_current_time_millis
    from mlflow.utils.uri import append_to_uri_path
    from mlflow.utils.validation import _validate_param, _validate_run_id, _validate_tag
    from sqlalchemy import insert

    experiment = store.get_experiment(experiment_id)
    store._check_experiment_is_active(experiment)
    now = get_current_time_millis()
    run_rows, tag_rows, param_rows = [], [], []
    for r in runs:
        _validate_run_id(r["run_id"])
        # MLflow's validators: a bad key raises, a value over the limit is cut as log_batch cuts it
        tags = {t.key: t.value for t in (_validate_tag(k, v) for k, v in {**r["tags"], MLFLOW_RUN_NAME: r["name"]}.items())}
        params = {p.key: p.value for p in (_validate_param(k, v) for k, v in r["params"].items())}
        run_rows.append({"run_uuid": r["run_id"], "name": r["name"], "source_type": SourceType.to_string(SourceType.UNKNOWN),
                         "source_name": "", "entry_point_name": "", "user_id": tags.get(MLFLOW_USER, "unknown"),
                         "status": r["status"], "start_time": now, "end_time": None, "deleted_time": None,
                         "source_version": "", "lifecycle_stage": LifecycleStage.ACTIVE,
                         "artifact_uri": append_to_uri_path(experiment.artifact_location, r["run_id"], "artifacts"),
                         "experiment_id": int(experiment_id)})
        tag_rows += [{"run_uuid": r["run_id"], "key": k, "value": v} for k, v in tags.items()]
        param_rows += [{"run_uuid": r["run_id"], "key": k, "value": v} for k, v in params.items()]
    with store.ManagedSessionMaker() as session:
        db = session.connection()  # SQLAlchemy Core executemany: no ORM object per row
        if run_rows:
            db.execute(insert(SqlRun), run_rows)
        if tag_rows:
            db.execute(insert(SqlTag), tag_rows)
        if param_rows:
            db.execute(insert(SqlParam), param_rows)
    for r, row in zip(runs, run_rows):
        if r.get("config") is not None:
            _write_artifact(row["artifact_uri"], "config.yaml", r["config"])
    return True


def set_tags(c, tags: dict[str, dict[str, str]]) -> bool:
    """{run id: {key: value}} in one transaction on a database store (a tag that exists is replaced, as
    `set_tag` does). -> False, writing nothing, on any other store."""
    store = _sql_store(c)
    if store is None:
        return False
    from mlflow.store.tracking.dbmodels.models import SqlTag
    from mlflow.utils.validation import _validate_tag
    from sqlalchemy import and_, delete, insert, or_

    rows = [{"run_uuid": rid, "key": t.key, "value": t.value}
            for rid, kv in tags.items() for t in (_validate_tag(k, v) for k, v in kv.items())]
    with store.ManagedSessionMaker() as session:
        db = session.connection()
        for i in range(0, len(rows), CHUNK):
            part = rows[i:i + CHUNK]
            db.execute(delete(SqlTag).where(or_(*(and_(SqlTag.run_uuid == r["run_uuid"], SqlTag.key == r["key"])
                                                  for r in part))))
            db.execute(insert(SqlTag), part)
    return True


def _write_artifact(artifact_uri: str, name: str, text: str) -> None:
    """A text file into a run's artifact root, as `MlflowClient.log_text` writes it (without looking the run up)."""
    import tempfile
    from pathlib import Path

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text, encoding="utf-8")
        get_artifact_repository(artifact_uri).log_artifact(str(path))
