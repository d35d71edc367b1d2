"""How far a running point is, from its metric history in MLflow: step, loss, rate and the time left.

A job logs `train_loss`, `lr`, `throughput_img_s` and `progress` (= step / total steps) at every logged
step and sends them in batches at each checkpoint (core/tracking/metrics.py), so what the tracker shows
lags the job by at most one checkpoint interval. Used by `cluster/status.py --watch` and the site's index
(reports/site.py), which read many runs' histories at once: `histories` fetches one metric of many runs in
as few calls as the store allows (one SQL query a 500 runs for a database store: core/tracking/bulk.py, 100 runs a request from a tracking
server, one call per run otherwise).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

LOSS = "train_loss"
SERVER_BATCH = 100   # runs per get-history-bulk-interval request (the server's limit)
RATE_WINDOW = 5      # logged steps the step rate is measured over


@dataclass
class Progress:
    """A point's pre-training as its history shows it; None where the history does not say."""
    step: int | None = None
    loss: float | None = None
    fraction: float | None = None   # of the pre-training's steps
    steps_per_s: float | None = None
    eta_s: float | None = None      # until the pre-training ends (evaluation not counted)


def histories(c, run_ids: list[str], key: str = LOSS, points: int | None = None) -> dict[str, list]:
    """{run id: [(step, value, timestamp ms), ...] in step order} of one metric. `points`: at most that many
    per run, evenly sampled with the first and the last kept (None: all of them)."""
    out: dict[str, list] = {r: [] for r in run_ids}
    if not run_ids:
        return out
    from mlflow.store.tracking.rest_store import RestStore

    from core.tracking import bulk
    store = c._tracking_client.store  # the client has no bulk read of its own
    found = bulk.histories(c, run_ids, key)
    if found is not None:  # a database store: column queries
        out = found
    elif isinstance(store, RestStore):
        from mlflow.utils.rest_utils import http_request
        for i in range(0, len(run_ids), SERVER_BATCH):
            resp = http_request(store.get_host_creds(), "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
                                "GET", params={"run_ids": run_ids[i:i + SERVER_BATCH], "metric_key": key,
                                               "max_results": points or 2500})
            resp.raise_for_status()
            for m in resp.json().get("metrics", []):
                out[m["run_id"]].append((int(m.get("step", 0)), float(m["value"]), int(m.get("timestamp", 0))))
    else:
        for r in run_ids:
            out[r] = [(m.step, m.value, m.timestamp) for m in c.get_metric_history(r, key)]
    for r, h in out.items():
        h.sort()
        out[r] = sample(h, points) if points else h
    return out


def sample(history: list, points: int) -> list:
    """At most `points` entries, evenly spaced, the first and the last kept."""
    if len(history) <= points:
        return history
    if points == 1:
        return history[-1:]
    step = (len(history) - 1) / (points - 1)
    return [history[round(i * step)] for i in range(points)]


def progress_of(run, history: list) -> Progress:
    """A running point's progress from its latest metrics and its `train_loss` history: the step rate is
    measured over the last RATE_WINDOW logged steps (their timestamps), the total from `progress`."""
    m = run.data.metrics
    p = Progress(fraction=m.get("progress"), loss=m.get(LOSS))
    if history:
        p.step, p.loss = int(history[-1][0]), history[-1][1]
        first = history[max(0, len(history) - 1 - RATE_WINDOW)]
        last = history[-1]
        if last[2] > first[2] and last[0] > first[0]:
            p.steps_per_s = (last[0] - first[0]) / ((last[2] - first[2]) / 1000)
    if p.steps_per_s is None:  # one logged step: images per second over the batch size
        try:
            p.steps_per_s = m["throughput_img_s"] / float(run.data.params["pretrain.batch_size"])
        except (KeyError, ValueError, ZeroDivisionError):
            pass
    if p.step and p.fraction and p.steps_per_s:
        total = p.step / p.fraction
        p.eta_s = max(total - p.step, 0.0) / p.steps_per_s
    return p


def fmt_duration(seconds: float | None) -> str:
    """"1 h 05 min", "4 min 10 s", "12 s", "-"."""
    if seconds is None or math.isnan(seconds):
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def ago(ms: int | None, now: float | None = None) -> str:
    """How long ago an MLflow timestamp (ms) was."""
    if not ms:
        return "-"
    return fmt_duration((now or time.time()) - ms / 1000) + " ago"
