"""Many runs read at once, as plain records: what reports and the site read from a store of any size.

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

CHUNK = 500  # run ids per IN (...) of a history query: far below any database's bound-parameter limit
SCAN_ABOVE = 2000  # histories of more runs than this: one pass over the metric key instead of by run


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


def runs(c, experiment_ids: list[str], tags: dict[str, str] | None = None) -> list[Record]:
    """Every live run of these experiments that carries all of `tags` (key: value), oldest first."""
    if not experiment_ids:
        return []
    store = _sql_store(c)
    return _runs_sql(store, experiment_ids, tags or {}) if store else _runs_search(c, experiment_ids, tags or {})


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


def _runs_sql(store, experiment_ids: list[str], tags: dict[str, str]) -> list[Record]:
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import and_, select

    chosen = select(SqlRun.run_uuid).where(SqlRun.experiment_id.in_([int(e) for e in experiment_ids]),
                                           SqlRun.lifecycle_stage == "active")
    for k, v in tags.items():
        chosen = chosen.where(SqlRun.run_uuid.in_(select(SqlTag.run_uuid).where(and_(SqlTag.key == k,
                                                                                      SqlTag.value == v))))
    with store.ManagedSessionMaker() as session:
        db = session.connection()  # SQLAlchemy Core: rows as tuples, no ORM bookkeeping per row
        rows = db.execute(select(SqlRun.run_uuid, SqlRun.experiment_id, SqlRun.status, SqlRun.start_time,
                                      SqlRun.end_time, SqlRun.name).where(SqlRun.run_uuid.in_(chosen))).all()
        out = {r[0]: Record(Info(r[0], str(r[1]), r[2], r[3], r[4], r[5] or ""), Data()) for r in rows}
        for run_id, key, value in db.execute(select(SqlTag.run_uuid, SqlTag.key, SqlTag.value)
                                                  .where(SqlTag.run_uuid.in_(chosen))):
            out[run_id].data.tags[key] = value
        for run_id, key, value in db.execute(select(SqlParam.run_uuid, SqlParam.key, SqlParam.value)
                                                  .where(SqlParam.run_uuid.in_(chosen))):
            out[run_id].data.params[key] = value
        for run_id, key, value, stamp, is_nan in db.execute(
                select(SqlLatestMetric.run_uuid, SqlLatestMetric.key, SqlLatestMetric.value,
                       SqlLatestMetric.timestamp, SqlLatestMetric.is_nan).where(SqlLatestMetric.run_uuid.in_(chosen))):
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
