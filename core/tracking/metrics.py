"""The buffered metric logger of a job: every metric sent exactly once, however the job ends."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from core.tracking.runs import TAG
from core.tracking.store import TrackingUnavailable, patiently, transient


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
            if self.spool is None or not transient(e):
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
