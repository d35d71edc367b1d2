"""Run identity (core/tracking/identity.py): what a pre-training signature hashes, finished pre-trainings found across
sweeps and experiments of one store, an evaluation change that pre-trains nothing, and runs tracked before
the change (only the old `mimsweep.signature` tag) that keep being skipped or resumed."""
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, run_cli


def _points(uri, exp_name):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(exp_name)
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("mimsweep.kind") == "point"]


def _plan_lines(stdout):
    return {ln.split()[1]: ln for ln in stdout.splitlines() if re.match(r"^  (new|resume|skip|queued) ", ln)}


# ------------------------------------------------------------------------------------------- the rules
def test_pretrain_signature_hashes_only_what_changes_pretraining(compose):
    from core.methods import uses_teacher
    from core.tracking import identity
    from core.tracking.identity import eval_signature, legacy_signature

    def pretrain_signature(cfg):  # what the planner hashes: the method says whether it uses its teacher
        return identity.pretrain_signature(cfg, uses_teacher(cfg))
    px = "method.target=norm_pixel"                   # MCM on pixels: no teacher asked for
    base = compose(px)
    p0, e0, l0 = pretrain_signature(base), eval_signature(base), legacy_signature(base)
    for evaluation in ("evaluate.linear.epochs=3", "evaluate.knn.k=10", "evaluate.pool=cls", "data.test_limit=100",
                       "evaluate.floor=false"):
        cfg = compose(px, evaluation)
        assert pretrain_signature(cfg) == p0, evaluation
        assert eval_signature(cfg) != e0, evaluation
        assert legacy_signature(cfg) != l0, evaluation     # the old identity re-trained for these
    for unused in ("teacher.input_size=64", "teacher=clip_vit_b16"):  # no teacher asked for: not hashed
        assert pretrain_signature(compose(px, unused)) == p0, unused
        assert legacy_signature(compose(px, unused)) != l0, unused
    for run_only in ("pretrain.checkpoint_every=7", "output_root=/elsewhere", "device=cpu"):
        cfg = compose(px, run_only)
        assert (pretrain_signature(cfg), eval_signature(cfg)) == (p0, e0), run_only
    for science in ("method.mask_ratio=0.6", "seed=1", "model.depth=6", "pretrain.epochs=5", "data.train_limit=100",
                    "method.target=teacher"):
        cfg = compose(px, science)
        assert pretrain_signature(cfg) != p0, science
        assert eval_signature(cfg) == e0, science
    teacher = compose()                                # MCM's default target is the teacher's: then it is hashed
    assert teacher.method.target == "teacher"
    assert pretrain_signature(compose("teacher.input_size=64")) != pretrain_signature(teacher)
    assert pretrain_signature(compose("evaluate.knn.k=10")) == pretrain_signature(teacher)


def test_count_pretrainings_of_the_mcm_sweeps():
    """The 8 MCM sweeps planned (not run) by bench/count_pretrainings.py: the default point is one
    pre-training under the new identity, shared by every sweep that holds it."""
    res = run_cli("bench/count_pretrainings.py", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["sweeps"]) == 8 and all(s.startswith("mcm_") for s in out["sweeps"])
    for preset, n in out["presets"].items():
        assert n["new"] < n["old"] <= n["points"], preset
        assert n["old_distinct"] <= n["old"]
        assert n["default_point_sweeps"] == n["default_point_old_pretrainings"] > 1, preset  # in several sweeps ...
        assert n["default_point_pretrainings"] == 1, preset                                  # ... trained once
        print(preset, n)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity")
    args = ["sweeps/run.py", "sweep=mcm_mask_ratio", *TINY, f"output_root={out}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    return out, args


def test_changing_the_evaluation_pretrains_nothing(finished):
    out, args = finished
    uri = f"sqlite:///{out}/mlflow.db"
    before = {r.info.run_id: r for r in _points(uri, "mcm_mask_ratio")}
    checkpoints = {r.data.tags["mimsweep.checkpoint"] for r in before.values()}
    assert len(checkpoints) == 4 and all(Path(p).is_file() for p in checkpoints)

    res = run_cli(*args, "evaluate.linear.epochs=3")
    assert res.returncode == 0, res.stdout + res.stderr
    plan = _plan_lines(res.stdout)
    assert len(plan) == 4 and all("pretrain reuse (run " in ln and "evaluate new" in ln for ln in plan.values())
    assert "pre-train" not in res.stdout and "pretrain:" not in res.stdout     # no training loop started
    runs = _points(uri, "mcm_mask_ratio")
    new = [r for r in runs if r.info.run_id not in before]
    assert len(new) == 4 and {r.info.status for r in new} == {"FINISHED"}
    c = MlflowClient(uri)
    for r in new:
        trainer = before[r.data.tags["mimsweep.pretrained_by"]]
        assert r.data.tags["mimsweep.pretrained_checkpoint"] == trainer.data.tags["mimsweep.checkpoint"]
        assert r.data.tags["mimsweep.pretrain_signature"] == trainer.data.tags["mimsweep.pretrain_signature"]
        assert r.data.tags["mimsweep.eval_signature"] != trainer.data.tags["mimsweep.eval_signature"]
        assert r.data.params["evaluate.linear.epochs"] == "3"
        assert c.get_metric_history(r.info.run_id, "train_loss") == []          # 0 pre-training steps here
        assert "mimsweep.checkpoint" not in r.data.tags
        assert r.data.metrics["knn_top1"] == trainer.data.metrics["knn_top1"]  # the same weights, same k-NN
        assert "linear_top1" in r.data.metrics
    assert len({r.data.tags["mimsweep.pretrained_by"] for r in new}) == 4
    # each work folder holds the one checkpoint its pre-training wrote: none more
    assert sorted(str(p) for p in (out / "runs").rglob("checkpoint.pt")) == sorted(checkpoints)

    # the report of the new evaluation finds its runs, k-NN and linear columns filled
    rep = run_cli("reports/build.py", *args[1:], "evaluate.linear.epochs=3")
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "4/4 point(s)" in rep.stderr
    import pandas as pd
    table = pd.read_csv(out / "reports" / "mcm_mask_ratio" / "mcm_mask_ratio.csv")
    table = table.set_index(table.columns[0])
    for r in new:
        assert table.loc[r.data.tags["mimsweep.label"], "linear_top1"] == pytest.approx(
            r.data.metrics["linear_top1"], abs=0.0051)  # the CSV: as displayed, 2 decimals (34.375: 34.38)

    again = run_cli(*args, "evaluate.linear.epochs=3")                      # and now: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert all("evaluate skip" in ln for ln in _plan_lines(again.stdout).values())


def test_finished_pretrainings_are_found_across_sweeps_and_experiments(finished):
    out, args = finished
    uri = f"sqlite:///{out}/mlflow.db"
    c = MlflowClient(uri)
    trained = {r.data.tags["mimsweep.pretrain_signature"]: r for r in _points(uri, "mcm_mask_ratio")
               if "mimsweep.checkpoint" in r.data.tags}
    other = ["sweeps/run.py", "sweep=mcm_decoder_depth", *TINY, f"output_root={out}", "tracking.experiment=elsewhere"]
    res = run_cli(*other)
    assert res.returncode == 0, res.stdout + res.stderr
    plan = _plan_lines(res.stdout)
    runs = {r.data.tags["mimsweep.label"]: r for r in _points(uri, "elsewhere")}
    reused = [label for label, ln in plan.items() if "pretrain reuse" in ln]
    assert len(reused) == 1 and sum("pretrain new" in ln for ln in plan.values()) == 3
    shared = runs[reused[0]]                                # the default MCM point: trained by mcm_mask_ratio
    assert shared.data.tags["mimsweep.pretrained_by"] == trained[shared.data.tags["mimsweep.pretrain_signature"]].info.run_id
    assert c.get_metric_history(shared.info.run_id, "train_loss") == []
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    for label, r in runs.items():
        if label != reused[0]:
            assert len(c.get_metric_history(r.info.run_id, "train_loss")) > 0
            assert Path(r.data.tags["mimsweep.checkpoint"]).is_file()
    # its report takes the shared point's metrics from the run that evaluated it
    rep = run_cli("reports/build.py", *other[1:])
    assert rep.returncode == 0 and "4/4 point(s)" in rep.stderr, rep.stdout + rep.stderr


def test_reuse_scope_experiment_and_none(finished):
    """`reuse=experiment` sees only the launch's experiment, `reuse=none` nothing; planned (dry run), not run."""
    out, args = finished
    other = ["sweeps/run.py", "sweep=mcm_decoder_depth", *TINY, f"output_root={out}", "dry_run=true"]
    def plan(*extra):
        res = run_cli(*other, *extra)
        assert res.returncode == 0, res.stdout + res.stderr
        return _plan_lines(res.stdout).values()
    # store (the default): at least the default point, trained in experiment mcm_mask_ratio (other tests of
    # this module may have trained more of this sweep's points elsewhere in the store)
    assert sum("pretrain reuse" in ln for ln in plan("tracking.experiment=scoped")) >= 1
    assert all("pretrain new" in ln for ln in plan("tracking.experiment=scoped", "reuse=experiment"))
    # in the experiment that trained it, the default point is found again; with reuse=none it is not
    assert sum("pretrain reuse" in ln for ln in plan("tracking.experiment=mcm_mask_ratio", "reuse=experiment")) == 1
    assert all("pretrain new" in ln for ln in plan("tracking.experiment=mcm_mask_ratio", "reuse=none"))
    bad = run_cli(*other, "reuse=everywhere")
    assert bad.returncode == 2 and "reuse='everywhere' is invalid: must be one of store, experiment, none" in bad.stderr


def test_within_one_launch_a_pretraining_is_done_once(tmp_path):
    """Two points that differ only in their evaluation: one pre-trains, the other evaluates its checkpoint."""
    args = ["sweeps/run.py", "sweep=mcm_mask_ratio", *TINY, f"output_root={tmp_path}",
            "~sweep.grid", "+sweep.points=[{label:k5,overrides:['evaluate.knn.k=5']},"
            "{label:k10,overrides:['evaluate.knn.k=10']}]"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    plan = list(_plan_lines(res.stdout).values())
    assert sum("pretrain new" in ln for ln in plan) == 1 and sum("pretrain after" in ln for ln in plan) == 1
    runs = _points(f"sqlite:///{tmp_path}/mlflow.db", "mcm_mask_ratio")
    trainer = [r for r in runs if "mimsweep.checkpoint" in r.data.tags]
    evaluator = [r for r in runs if "mimsweep.pretrained_by" in r.data.tags]
    assert len(trainer) == 1 and len(evaluator) == 1
    assert evaluator[0].data.tags["mimsweep.pretrained_by"] == trainer[0].info.run_id
    assert {r.info.status for r in runs} == {"FINISHED"}


# ------------------------------------------------------------------------------------------- old runs
def _old_code_runs(compose, tmp_path, compose_args, statuses):
    """Point runs as the code before core/tracking/identity.py wrote them: tag `mimsweep.signature` (the whole-config
    hash), params, config.yaml; no pretrain/eval signature, no checkpoint tag. -> {label: run id}."""
    from omegaconf import OmegaConf

    from core.config import flatten, signature
    from sweeps.plan import plan

    # the session's Hydra (tests/conftest.py `compose`): clearing it here would break every later test
    name, planned = plan(compose(*compose_args), list(compose_args))
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    launch = c.create_run(exp, tags={"mimsweep.kind": "launch", "mimsweep.sweep": name}).info.run_id
    c.set_terminated(launch, "FINISHED")
    ids = {}
    for pl in planned:
        run = c.create_run(exp, run_name=f"{pl.point.label} seed=0", tags={
            "mimsweep.kind": "point", "mimsweep.sweep": name, "mimsweep.label": pl.point.label,
            "mimsweep.signature": signature(pl.cfg), "mimsweep.overrides": json.dumps(pl.point.overrides),
            "mlflow.parentRunId": launch})
        rid = run.info.run_id
        for k, v in flatten(pl.cfg).items():
            c.log_param(rid, k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
        c.log_text(rid, OmegaConf.to_yaml(pl.cfg, resolve=True), "config.yaml")
        status = statuses[pl.point.label]
        if status == "FINISHED":
            c.log_metric(rid, "knn_top1", 12.5)
            c.log_metric(rid, "linear_top1", 25.0)
        c.set_terminated(rid, status)
        ids[pl.point.label] = (rid, signature(pl.cfg))
    return ids


def test_runs_tracked_before_the_change_are_skipped_or_resumed(compose, tmp_path):
    args = ["sweep=mcm_recon_range", *TINY, f"output_root={tmp_path}"]
    old = _old_code_runs(compose, tmp_path, args, {"all": "FINISHED", "masked": "FAILED"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_cli("sweeps/run.py", *args)
    assert res.returncode == 0, res.stdout + res.stderr
    plan = _plan_lines(res.stdout)
    assert plan["all"].split()[0] == "skip" and old["all"][0][:8] in plan["all"]
    assert plan["masked"].split()[0] == "resume" and "pretrain resume" in plan["masked"]
    runs = {r.data.tags["mimsweep.label"]: r for r in _points(uri, "mcm_recon_range")}
    assert len(runs) == 2                                             # no new run: the old ones are used
    assert runs["masked"].info.run_id == old["masked"][0] and runs["masked"].info.status == "FINISHED"
    rid, sig = old["masked"]                                          # resumed in the folder the old code used
    assert (tmp_path / "runs" / "mcm_recon_range" / f"{sig}-{rid[:8]}" / "checkpoint.pt").is_file()
    assert runs["masked"].data.tags["mimsweep.checkpoint"].endswith(f"{sig}-{rid[:8]}/checkpoint.pt")
    assert runs["all"].data.metrics["knn_top1"] == 12.5                # untouched
    # the report finds both: the old finished run by the compatibility rule, the resumed one by its tags
    rep = run_cli("reports/build.py", *args)
    assert rep.returncode == 0 and "2/2 point(s)" in rep.stderr, rep.stdout + rep.stderr
    again = run_cli("sweeps/run.py", *args)
    assert "nothing to do" in again.stdout, again.stdout


OLD_EVALUATE = """pool: mean
layer: -1
knn:
  k: 20
  temperature: 0.07
linear:
  epochs: 1
  lr: 0.1
  batch_size: 256
  weight_decay: 0.0
floor: false
batch_size: 256
"""


def test_finished_runs_of_an_older_version_are_migrated_and_their_pretraining_reused(tmp_path):
    """A finished point as the version before run identities left it: only `mimsweep.signature`, its
    config.yaml with that version's `evaluate` group (one linear lr), its checkpoint in `<signature>-<run>`.
    The current evaluation config differs, so the point is evaluated again, on that checkpoint: no
    pre-training, and the old run is tagged with its worked-out identity (a migration, done once)."""
    from omegaconf import OmegaConf
    args = [*TINY, "method.target=norm_pixel", "pretrain.max_steps=4", "data.train_limit=256",
            "data.test_limit=64", "evaluate.linear.epochs=1", f"output_root={tmp_path}"]
    assert run_cli("sweeps/run.py", *args).returncode == 0
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    (run,) = _points(uri, "mimsweep")
    rid, tags = run.info.run_id, run.data.tags
    for k in ("pretrain_signature", "eval_signature", "workdir", "checkpoint"):   # what the old code never set
        c.delete_tag(rid, "mimsweep." + k)
    cfg = OmegaConf.create(Path(c.download_artifacts(rid, "config.yaml", str(tmp_path))).read_text())
    cfg.evaluate = OmegaConf.create(OLD_EVALUATE)
    c.log_text(rid, OmegaConf.to_yaml(cfg), "config.yaml")
    old_dir = Path(tags["mimsweep.workdir"]).with_name(f"{tags['mimsweep.signature']}-{rid[:8]}")
    Path(tags["mimsweep.workdir"]).rename(old_dir)

    res = run_cli("sweeps/run.py", *args)
    assert res.returncode == 0, res.stdout + res.stderr
    line = _plan_lines(res.stdout)["default"]
    assert line.split()[0] == "new" and f"pretrain reuse (run {rid[:8]})" in line, res.stdout
    old, new = sorted(_points(uri, "mimsweep"), key=lambda r: r.info.start_time)
    assert old.info.run_id == rid
    assert old.data.tags["mimsweep.identity_migrated"] == "from config.yaml"
    assert old.data.tags["mimsweep.checkpoint"] == str(old_dir / "checkpoint.pt")
    assert old.data.tags["mimsweep.pretrain_signature"] == tags["mimsweep.pretrain_signature"]  # same as today's
    assert new.data.tags["mimsweep.pretrained_by"] == rid and new.info.status == "FINISHED"
    assert not c.get_metric_history(new.info.run_id, "train_loss")   # nothing pre-trained
    assert "linear_top1" in new.data.metrics
    assert "nothing to do" in run_cli("sweeps/run.py", *args).stdout
