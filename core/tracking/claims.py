"""Claims: "this process is computing X", written into the tracking store, so that jobs on any node agree on
who does a piece of work they all need (a random-init floor: core/evaluation/floors.py) and the others wait.

MLflow has no lock, but one of its writes is atomic on every store: creating an experiment whose name is
taken fails (RESOURCE_ALREADY_EXISTS; a unique constraint of the SQL schema, behind a server too). A claim
is such an experiment, named `mimsweep-claims/<what> #<generation>`, whose tags say who holds it (host, pid)
and when it last said it was alive (`heartbeat`, refreshed every HEARTBEAT_S by a thread of the holder):

- released (the work is stored, or it failed): the holder deletes the experiment. A deleted name stays
  taken, so the next claimant of the same work takes the next generation;
- abandoned (the holder was killed, its node lost): a claim whose process is gone (same host) or whose
  heartbeat is older than STALE_S (any host; clocks may differ by less than that) is deleted by whoever finds
  it, and the next generation is claimed, again atomically: two finders cannot both take it over.

A claim lives as long as its work (seconds to minutes), so it shows in MLflow's experiment list only then.
"""
from __future__ import annotations

import os
import socket
import threading
import time

from core.tracking.runs import TAG

CLAIMS = "mimsweep-claims/"
HEARTBEAT_S = 30.0
STALE_S = 180.0


class Claim:
    """A claim this process holds: its heartbeat is refreshed in a thread until `release()`."""

    def __init__(self, c, experiment_id: str, name: str):
        self.c, self.experiment_id, self.name = c, experiment_id, name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mimsweep-claim", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.c.set_experiment_tag(self.experiment_id, TAG + "heartbeat", f"{time.time():.0f}")
            except Exception:  # noqa: BLE001 - a missed beat; STALE_S spans several
                pass

    def release(self) -> None:
        """Delete the claim (best effort: an unreachable store leaves it to go stale)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.c.delete_experiment(self.experiment_id)
        except Exception:  # noqa: BLE001
            pass


def _taken(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(e)


def holder_alive(tags: dict, now: float | None = None) -> bool:
    """Whether the process that holds a claim (its tags) still runs: on this host its pid decides when it is
    gone, else (and for a pid that lives on, perhaps reused) a heartbeat younger than STALE_S."""
    if tags.get(TAG + "host") == socket.gethostname() and tags.get(TAG + "pid", "").isdigit():
        try:
            os.kill(int(tags[TAG + "pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's live process
    try:
        beat = float(tags.get(TAG + "heartbeat", "0"))
    except ValueError:
        return False
    return (now or time.time()) - beat < STALE_S


def claim(c, what: str, note: str = "", location: str | None = None) -> Claim | None:
    """Claim `what` for this process: a Claim when it is ours now, None while a live holder has it.
    `note`: the claim's description in MLflow; `location`: its artifact location (it stores none)."""
    from mlflow.exceptions import MlflowException

    from core import faults
    gen = 1
    while True:
        name = f"{CLAIMS}{what} #{gen}"
        tags = {TAG + "kind": "claim", TAG + "host": socket.gethostname(), TAG + "pid": str(os.getpid()),
                TAG + "heartbeat": f"{time.time():.0f}", "mlflow.note.content": note or f"mimsweep is computing {what}"}
        try:
            exp_id = c.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException as e:
            if not _taken(e):
                raise
        else:
            faults.point("claim.taken")
            return Claim(c, exp_id, name)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            continue  # released and purged in between: this generation is free again
        if exp.lifecycle_stage != "deleted":
            if holder_alive(exp.tags):
                return None
            try:  # abandoned: free it; whoever creates the next generation first takes the work over
                c.delete_experiment(exp.experiment_id)
            except MlflowException:
                pass  # another finder deleted it first
        gen += 1
