"""Tracking: everything mimsweep keeps in MLflow, and the rules that find it again.

Owns the store (`store`: URIs, credentials, clients, experiments, waiting out an outage), the layout of a
sweep's runs (`runs`: launch and point runs, their tags, params, statuses, the store-wide search for
finished pre-trainings), a job's metric log (`metrics`: each metric sent exactly once) and run identity
(`identity`: what makes two points the same pre-training or the same evaluation), and claims (`claims`: one
process of many does a shared piece of work, such as a random-init floor).
May import: core.config, core.faults, core.net, and MLflow. Nothing here knows a method, a model or a
protocol: what identity needs of a method (does it use a teacher?) is handed in by the caller.
The names below are the package's API (`from core import tracking; tracking.set_status(...)`).
"""
from core.tracking import bulk
from core.tracking.claims import Claim, claim
from core.tracking.metrics import MetricLog
from core.tracking.runs import (FINISHED, KIND, STATUSES, TAG, attach_files, close_orphaned_launches,
                                create_point_run, describe_experiment, finished_checkpoint, git_state,
                                latest_launch, log_datasets, logged_at, migrate_legacy, operational_tags, point_run,
                                point_runs, pretrainings, runs_by_signature, set_status, start_launch)
from core.tracking.store import (CREDENTIAL_VARS, JOB_HTTP_ENV, TrackingUnavailable, artifact_location, client,
                                 experiment_id, find_experiment, job_client, open_store, patiently, redact,
                                 redact_text, resolve_uri, split_credentials, sqlite_path, ui_link, use_credentials)

__all__ = ["bulk", "Claim", "claim", "MetricLog", "FINISHED", "KIND", "STATUSES", "TAG", "attach_files",
           "close_orphaned_launches", "create_point_run", "describe_experiment", "latest_launch", "log_datasets",
           "operational_tags", "point_run", "artifact_location", "finished_checkpoint", "git_state", "logged_at", "migrate_legacy", "point_runs", "pretrainings",
           "runs_by_signature", "set_status", "start_launch", "CREDENTIAL_VARS", "JOB_HTTP_ENV",
           "TrackingUnavailable", "client", "experiment_id", "find_experiment", "job_client", "open_store",
           "patiently", "redact", "redact_text", "resolve_uri", "split_credentials", "sqlite_path",
           "ui_link", "use_credentials"]
