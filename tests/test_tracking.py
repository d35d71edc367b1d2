"""The tracking layer: one place writes run status; a finished run carries no stale failure tag."""
from __future__ import annotations

import re
from pathlib import Path

from core import tracking

REPO = Path(__file__).resolve().parents[1]


def test_only_tracking_writes_run_status():
    writers = []
    for path in [*REPO.glob("core/**/*.py"), *REPO.glob("cluster/*.py"), *REPO.glob("sweeps/*.py"),
                 *REPO.glob("reports/*.py")]:
        if path.relative_to(REPO).as_posix() == "core/tracking/runs.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.(set_terminated|update_run)\(", line):
                writers.append(f"{path.relative_to(REPO)}:{i}")
    assert writers == [], f"run status written outside core.tracking.set_status: {writers}"


def test_finished_run_drops_the_failure_tag_of_an_earlier_attempt(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.open_store(uri, create=True)
    exp = tracking.experiment_id(c, "t", uri)
    rid = c.create_run(exp).info.run_id
    tracking.set_status(c, rid, "FAILED", "OSError: disk full")
    assert c.get_run(rid).data.tags[tracking.TAG + "failure"] == "OSError: disk full"
    tracking.set_status(c, rid, "RUNNING")          # the resumed attempt
    assert c.get_run(rid).info.status == "RUNNING"
    tracking.set_status(c, rid, "FINISHED")
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and tracking.TAG + "failure" not in run.data.tags
