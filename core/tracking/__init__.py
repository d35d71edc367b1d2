"""Tracking: everything mimsweep keeps in MLflow, and the rules that find it again.

Owns the store (`store`: URIs, credentials, clients, experiments, waiting out an outage), the layout of a
sweep's runs (`runs`: launch and point runs, their tags, params, statuses, the store-wide search for
finished pre-trainings), a job's metric log (`metrics`: each metric sent exactly once) and run identity
(`identity`: what makes two points the same pre-training or the same evaluation).
May import: core.config, core.faults, core.net, and MLflow. Nothing here knows a method, a model or a
protocol: what identity needs of a method (does it use a teacher?) is handed in by the caller.
The names below are the package's API (`from core import tracking; tracking.set_status(...)`).
"""
from core.tracking.metrics import MetricLog
from core.tracking.runs import (FINISHED, STATUSES, TAG, close_orphaned_launches, create_point_run,
                                finished_checkpoint, git_state, logged_at, migrate_legacy, point_runs,
                                pretrainings, runs_by_signature, set_status, start_launch)
from core.tracking.store import (CREDENTIAL_VARS, JOB_HTTP_ENV, TrackingUnavailable, client, experiment_id,
                                 find_experiment, job_client, open_store, patiently, redact, redact_text,
                                 resolve_uri, split_credentials, sqlite_path, use_credentials)

__all__ = ["MetricLog", "FINISHED", "STATUSES", "TAG", "close_orphaned_launches", "create_point_run",
           "finished_checkpoint", "git_state", "logged_at", "migrate_legacy", "point_runs", "pretrainings",
           "runs_by_signature", "set_status", "start_launch", "CREDENTIAL_VARS", "JOB_HTTP_ENV",
           "TrackingUnavailable", "client", "experiment_id", "find_experiment", "job_client", "open_store",
           "patiently", "redact", "redact_text", "resolve_uri", "split_credentials", "sqlite_path",
           "use_credentials"]
