"""The interface every backend (cluster/local.py, cluster/slurm.py) implements for cluster/launch.py."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sweeps.plan import Planned


class Backend:
    """What a launch asks of the place its points run (cluster/local.py `Local`, cluster/slurm.py `Slurm`):

    - `prepare(planned, todo, trained) -> todo`: read-only checks of that place (a scheduler's tools,
      partition, `sbatch --test-only`), before any run exists; may leave out points already queued there;
    - `describe(todo) -> str`: what a dry run prints about what would start;
    - `start(c, parent, todo, handed_over, skipped) -> exit code`: run or submit the points, whose runs now
      exist; put each point whose run a job now owns into `handed_over` (the launch marks the others
      FAILED/KILLED if it fails) and end the launch run `parent`;
    - `live_jobs(job_ids) -> {job id: state}`: those of the jobs still queued or running there (a backend
      with no queue has none); the planner asks it through this interface, never a backend directly.

    Point runs: the launch gives the backend `open_run(planned) -> run id` (it creates a new point's run and
    writes its launch tags). A backend with `opens_runs_at_start` calls it as each point's job starts, so
    MLflow's start time is the job's (the local backend); for any other the launch opens every run before
    `start` (SLURM: the queue outlives the launch, and the next launch must find queued points' runs).
    """

    opens_runs_at_start = False
    open_run = None

    def __init__(self, cfg, uri: str, root: Path, sweep: str, task_overrides: list[str], raw_uri: str):
        self.cfg, self.uri, self.root, self.sweep = cfg, uri, root, sweep
        self.task_overrides, self.raw_uri = task_overrides, raw_uri

    def command(self, script: str) -> str:
        """`python SCRIPT` with the launch's overrides (password redacted), as the user types it next:
        cluster/status.py and reports/build.py compose the same grid only from the same overrides."""
        import shlex

        from core import tracking
        return " ".join(["python", script, *(shlex.quote(tracking.redact_text(o, self.raw_uri))
                                             for o in self.task_overrides if not o.startswith("hydra"))])

    def prepare(self, planned: list[Planned], todo: list[Planned], trained: list) -> list[Planned]:
        return todo

    def live_jobs(self, job_ids: list[str]) -> dict[str, str]:
        return {}

    def describe(self, todo: list[Planned]) -> str:
        raise NotImplementedError

    def start(self, c, parent: str, todo: list[Planned], handed_over: set, skipped: int) -> int:
        raise NotImplementedError
