"""What identifies a pre-training and an evaluation: the rules, in one place.

A point = one pre-training + one evaluation of it. Its two halves have their own identity:

- **pre-training signature** (`pretrain_signature`): a hash of the resolved config minus
  * the run-only keys (core.config.RUN_ONLY: where and how it runs: cluster, tracking, output_root, device,
    checkpoint/log intervals, ...),
  * `evaluate.*` (the evaluation config, whatever protocols it holds),
  * `data.test_limit`: only evaluation reads the test split. Pre-training reads it for one thing, the
    pictures of the `figures/` artifact (the first images of the test split); those illustrate the trained
    model and are no result, so a different test_limit reuses the pre-training (and its pictures, made with
    the trainer run's test_limit),
  * `teacher.*` when the method asks for no teacher (its `teacher_request` is None, core/methods/base.py): an
    unused teacher changes nothing that is trained. The caller says which (`uses_teacher`): identity knows
    rules, not methods.
- **evaluation signature** (`eval_signature`): a hash of `evaluate.*` and `data.test_limit`. An evaluation is
  identified by (pre-training signature, evaluation signature): that pair is a point run's identity.
- **legacy signature** (`legacy_signature` = core.config.signature): the hash of the whole config minus the
  run-only keys, the only identity before this module (tag `mimsweep.signature`). Every run still carries
  it, and a run that has no `mimsweep.pretrain_signature` tag (tracked by the old code) is matched by it:
  the compatibility rule, so runs tracked before keep being skipped when finished and resumed otherwise.

How a launch uses them (sweeps/plan.py `decide`):
1. a point run of the sweep with the same (pre-training, evaluation) pair, or an old run with the same legacy
   signature: FINISHED -> skip; otherwise resume it;
2. else a *finished pre-training* of the same pre-training signature anywhere in the store (any sweep, any
   experiment; `reuse=experiment` looks in the launch's experiment only, `reuse=none` never): a run tagged `mimsweep.checkpoint` (the absolute path of its final checkpoint, set by the job
   when its pre-training completed) whose file still exists -> a new point run that only evaluates, on that
   checkpoint, tagged `mimsweep.pretrained_by` = the run that trained it;
3. else a pre-training of this launch (an earlier point of the plan) or a queued/running SLURM task of an
   earlier launch will produce it -> evaluate only, after it (chained on SLURM);
4. else pre-train and evaluate (new).
"""
from __future__ import annotations

import hashlib
import json

from core.config import RUN_ONLY, flatten, under

EVAL_ONLY = ("evaluate", "data.test_limit")   # read by evaluation only (see the docstring)
TEACHER = "teacher"


def _hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pretrain_params(cfg, uses_teacher: bool, flat: dict | None = None) -> dict:
    """The flattened config keys that change what pre-training computes (`uses_teacher`: whether the
    point's method builds its teacher, core.methods.uses_teacher; `flat`: flatten(cfg) if the caller has it)."""
    drop = RUN_ONLY + EVAL_ONLY + (() if uses_teacher else (TEACHER,))
    return {k: v for k, v in (flat if flat is not None else flatten(cfg)).items() if not under(k, drop)}


def eval_params(cfg, flat: dict | None = None) -> dict:
    """The flattened evaluation config (everything under evaluate.*, and data.test_limit), run-only keys out."""
    return {k: v for k, v in (flat if flat is not None else flatten(cfg)).items()
            if under(k, EVAL_ONLY) and not under(k, RUN_ONLY)}


def pretrain_signature(cfg, uses_teacher: bool, flat: dict | None = None) -> str:
    return _hash(pretrain_params(cfg, uses_teacher, flat))


def eval_signature(cfg, flat: dict | None = None) -> str:
    return _hash(eval_params(cfg, flat))


def legacy_signature(cfg, flat: dict | None = None) -> str:
    from core.config import signature
    return signature(cfg, flat)
