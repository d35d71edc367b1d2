"""Random-init floors, computed once per key and reused by every later point that has the same key.

The floor of a protocol is what the protocol gives on the same encoder architecture at random init
(seeded by `seed`): what pre-training has to beat. It depends only on the architecture, the input size,
the data, the seed and that protocol's own config, never on the method, so the 4 points of a mask-ratio
sweep (or the points of every sweep on the same model/data/seed) share it. The key is a hash of exactly
those (`floor_key`); one key per protocol, so adding `finetune` to a finished sweep computes only the
fine-tuning floor.

Where the cache lives: in MLflow, as a run of the point's experiment tagged `mimsweep.kind=floor` and
`mimsweep.floor_key=<key>` holding the floor's metrics. Every job already talks to the tracking server,
so SLURM tasks on different nodes find each other's floors; a file under `output_root` would need a
filesystem shared by the nodes, which a cluster's node-local scratch is not. Point runs are tagged
`kind=point` and floors `kind=floor`, so launches and reports (which select point runs) never see floors.
Two tasks that miss the same key at the same moment both compute it and both store it (the same numbers
up to nondeterministic kernels); later ones take the oldest. Each point run still logs the floor's
metrics (`floor_<metric>`) and tags the floor run it took them from (`mimsweep.floor_runs`), so reports
read floors as before.
"""
from __future__ import annotations

import hashlib
import json
import time

import torch
from omegaconf import OmegaConf

from core import tracking
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


def find_floor(c, exp_id: str, key: str):
    runs = c.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG}floor_key` = '{key}' and "
                                                 f"attributes.status = 'FINISHED'",
                         max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def store_floor(c, exp_id: str, key: str, protocol: str, metrics: dict, cfg, source_run: str) -> str:
    from mlflow.entities import Metric, Param
    run = c.create_run(exp_id, run_name=f"floor {protocol} {key}", tags={
        tracking.TAG + "kind": "floor", tracking.TAG + "floor_key": key, tracking.TAG + "floor_protocol": protocol,
        tracking.TAG + "source_run": source_run})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                params=[Param("seed", str(cfg.seed)), Param("model.name", str(cfg.model.name)),
                        Param("data.name", str(cfg.data.name))])
    tracking.set_status(c, rid, tracking.FINISHED)
    return rid


def of_protocol(metrics: dict, protocol: str) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(PREFIXES[protocol])}


def floor_metrics(c, run_id: str, encoder, cfg, train_split, test_split, device) -> tuple[dict, dict]:
    """-> ({'floor_<metric>': value}, {protocol: floor run id}) for the floor-able protocols of
    `evaluate.protocols`: reused where a finished floor run has the key, computed (and stored) otherwise."""
    exp_id = c.get_run(run_id).info.experiment_id
    wanted = [p for p in cfg.evaluate.protocols if p in FLOOR_PROTOCOLS]
    keys = {p: floor_key(encoder, cfg, p) for p in wanted}
    found = {p: find_floor(c, exp_id, k) for p, k in keys.items()}
    metrics, runs = {}, {}
    for p, r in found.items():
        if r is not None:
            metrics.update(of_protocol(r.data.metrics, p))
            runs[p] = r.info.run_id
    missing = [p for p, r in found.items() if r is None]
    if missing:  # one evaluation of the untrained encoder for all of them (k-NN and linear share features)
        fresh = floor_encoder(encoder, cfg.seed).to(device)
        computed = evaluate(fresh, cfg, train_split, test_split, device, protocols=missing, name="floor ")
        for p in missing:
            mine = of_protocol(computed, p)
            runs[p] = store_floor(c, exp_id, keys[p], p, mine, cfg, run_id)
            metrics.update(mine)
    return {f"floor_{k}": v for k, v in metrics.items()}, runs
