"""Random-init floors, computed once per key and reused by every later point that has the same key.

The floor of a protocol is what the protocol gives on the same encoder architecture at random init
(seeded by `seed`): what pre-training has to beat. It depends only on the architecture, the input size,
the data, the seed and that protocol's own config, never on the method, so the 4 points of a mask-ratio
sweep (or the points of every sweep on the same model/data/seed) share it. The key is a hash of exactly
those (`floor_key`); one key per protocol, so adding `finetune` to a finished sweep computes only the
fine-tuning floor.

Where the cache lives: in MLflow, as runs of their own experiment `mimsweep-floors` (one for the whole
store, so every sweep shares them), tagged `mimsweep.kind=floor` and `mimsweep.floor_key=<key>`, holding the
protocol's metrics under its own names (`knn_top1`, ...). Every job already talks to the tracking server, so
SLURM tasks on different nodes find each other's floors; a file under `output_root` would need a filesystem
shared by the nodes, which a cluster's node-local scratch is not. A sweep's experiment holds its points only:
its charts and Compare never mix floors in. Each point run logs the floor's metrics as `floor_<metric>` and
tags the floor runs it took them from (`mimsweep.floor_runs`, {protocol: run id}), so reports read floors as
before. Floor runs that older versions kept in the sweep's experiment are still found and reused.

Exactly once per key, however many points reach it together: the point that takes the key's claim
(core/tracking/claims.py: an atomic create in the store, released when the floor run is FINISHED, taken over
when its holder died) computes it into a RUNNING floor run; the others wait for that run to finish and read
it. A point holding some keys and waiting for others computes its own first, so nobody waits while holding.
"""
from __future__ import annotations

import hashlib
import json
import time

import torch
from omegaconf import OmegaConf

from core import faults, tracking
from core.evaluation.common import arch_kwargs
from core.evaluation.evaluate import FLOOR_PROTOCOLS, evaluate

FLOOR_VERSION = 1  # bump when a protocol's computation changes: old floors are then recomputed
PREFIXES = {"knn": "knn_", "linear": "linear_", "finetune": "finetune_", "seg_linear": ("seg_miou", "seg_linear_")}


def _protocol_config(cfg, protocol: str) -> dict:
    e = cfg.evaluate
    sub = {"knn": {"knn": e.knn, "layer": e.layer, "pool": e.pool},
           "linear": {"linear": e.linear, "layer": e.layer, "pool": e.pool},
           "finetune": {"finetune": e.finetune, "precision": cfg.pretrain.precision},
           "seg_linear": {"seg_linear": e.seg_linear}}[protocol]
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in sub.items()}


def floor_key(encoder, cfg, protocol: str) -> str:
    from core.config import science_params
    data = {k: v for k, v in science_params(cfg).items() if k.startswith("data.")}
    blob = {"version": FLOOR_VERSION, "arch": arch_kwargs(encoder), "input_size": cfg.model.input_size,
            "data": data, "seed": cfg.seed, "protocol": protocol, "config": _protocol_config(cfg, protocol)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def floor_encoder(encoder, seed: int):
    """The same architecture at random init, from the seed alone (not from what ran before)."""
    from core.vit import ViTEncoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTEncoder(**arch_kwargs(encoder))


FLOORS = "mimsweep-floors"
POLL_S = 2.0   # how often a point waiting for another's floor looks again
NOTE = ("**Random-init floors** of mimsweep: what each evaluation protocol gives on the same encoder "
        "architecture at random init (seeded by `seed`), the number pre-training has to beat. One run per key "
        "(`mimsweep.floor_key`: architecture, input size, data, seed and the protocol's config), computed once "
        "and shared by every sweep of this store; point runs log these values as `floor_<metric>` and name "
        "the runs they took them from in the tag `mimsweep.floor_runs`. See core/evaluation/floors.py.")


def floors_experiment(c, uri: str) -> str:
    """The store's floor experiment (create-or-get), with its kind and description."""
    exp_id = tracking.experiment_id(c, FLOORS, uri)
    tracking.describe_experiment(c, exp_id, NOTE)
    return exp_id


def find_floor(c, exp_ids: list[str], key: str, status: str = "FINISHED"):
    runs = c.search_runs(exp_ids, filter_string=f"tags.`{tracking.TAG}floor_key` = '{key}' and "
                                                f"attributes.status = '{status}'",
                         max_results=100 if status != "FINISHED" else 1, order_by=["attributes.start_time ASC"])
    return runs if status != "FINISHED" else (runs[0] if runs else None)


def start_floor(c, exp_id: str, key: str, protocol: str, cfg, source_run: str) -> str:
    """The key's floor run, RUNNING while it is computed (its start time and duration are the computation's).
    Floor runs of the key left RUNNING by a holder that died are marked FAILED first: only the claim's holder
    computes a key, so none of them is still at work."""
    from mlflow.entities import Param
    for stale in find_floor(c, [exp_id], key, status="RUNNING"):
        tracking.set_status(c, stale.info.run_id, "FAILED", "the job computing this floor ended before it finished")
    run = c.create_run(exp_id, run_name=f"floor {protocol} {cfg.model.name} {cfg.data.name} seed={cfg.seed}",
                       tags={tracking.TAG + "kind": "floor", tracking.TAG + "floor_key": key,
                             tracking.TAG + "floor_protocol": protocol, tracking.TAG + "source_run": source_run})
    rid = run.info.run_id
    c.log_batch(rid, params=[Param("seed", str(cfg.seed)), Param("model.name", str(cfg.model.name)),
                             Param("data.name", str(cfg.data.name))])
    tracking.set_status(c, rid, "RUNNING")
    return rid


def finish_floor(c, rid: str, metrics: dict, datasets: list[dict]) -> None:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    tracking.log_datasets(c, rid, datasets)
    tracking.set_status(c, rid, tracking.FINISHED)


def of_protocol(metrics: dict, protocol: str) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(PREFIXES[protocol])}


def floor_metrics(c, run_id: str, uri: str, encoder, cfg, train_split, test_split, device,
                  datasets: list[dict] = ()) -> tuple[dict, dict]:
    """-> ({'floor_<metric>': value}, {protocol: floor run id}) for the floor-able protocols of
    `evaluate.protocols`: read from the key's finished floor run, computed (once: see the module's docstring)
    where there is none. `datasets`: the inputs to record on a floor run this point computes."""
    exp_id = floors_experiment(c, uri)
    where = list(dict.fromkeys([exp_id, c.get_run(run_id).info.experiment_id]))  # + floors of older versions
    keys = {p: floor_key(encoder, cfg, p) for p in cfg.evaluate.protocols if p in FLOOR_PROTOCOLS}
    metrics, runs, said = {}, {}, set()
    location = tracking.artifact_location(uri)
    while len(runs) < len(keys):
        for p in [p for p in keys if p not in runs]:
            r = find_floor(c, where, keys[p])
            if r is not None:
                metrics.update(of_protocol(r.data.metrics, p))
                runs[p] = r.info.run_id
        missing = [p for p in keys if p not in runs]
        held = {p: tracking.claim(c, f"floor {keys[p]}", f"a point is computing the {p} floor {keys[p]}", location)
                for p in missing}
        mine = [p for p in missing if held[p] is not None]
        try:
            for p in mine:  # a holder that finished between our search and our claim: its run is there now
                r = find_floor(c, where, keys[p])
                if r is not None:
                    metrics.update(of_protocol(r.data.metrics, p))
                    runs[p] = r.info.run_id
            todo = [p for p in mine if p not in runs]
            if todo:  # one evaluation of the untrained encoder for all of them (k-NN and linear share features)
                started = {p: start_floor(c, exp_id, keys[p], p, cfg, run_id) for p in todo}
                faults.point("floor.started")   # tests/test_tracking_layout.py: a holder killed here
                try:
                    fresh = floor_encoder(encoder, cfg.seed).to(device)
                    computed = evaluate(fresh, cfg, train_split, test_split, device, protocols=todo, name="floor ")
                except BaseException as e:
                    for rid in started.values():
                        tracking.set_status(c, rid, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED",
                                            f"{type(e).__name__}: {e}")
                    raise
                for p in todo:
                    finish_floor(c, started[p], of_protocol(computed, p), list(datasets))
                    runs[p] = started[p]
                    metrics.update(of_protocol(computed, p))
        finally:
            for claim in held.values():
                if claim is not None:
                    claim.release()
        waiting = [p for p in keys if p not in runs]
        if waiting:
            if not said.issuperset(waiting):
                print(f"floor: waiting for another point's {', '.join(waiting)} floor", flush=True)
                said.update(waiting)
            time.sleep(POLL_S)
    return {f"floor_{k}": v for k, v in metrics.items()}, runs
