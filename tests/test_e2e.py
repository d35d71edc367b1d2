"""End to end, the way a user runs it: a smoke sweep into a fresh MLflow store, a re-run that runs
nothing, a failing point that is the only one redone, and the rebuilt table."""
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FAILING_POINTS, TINY, run_cli


def _runs(uri, exp_name, kind):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(exp_name)
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("mimsweep.kind") == kind]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    args = ["sweeps/run.py", "sweep=mcm_mask_ratio", *TINY, f"output_root={out}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    return out, args, first


def test_smoke_sweep_tracks_every_point(swept):
    out, _, first = swept
    uri = f"sqlite:///{out}/mlflow.db"
    points = _runs(uri, "mcm_mask_ratio", "point")
    launches = _runs(uri, "mcm_mask_ratio", "launch")
    assert len(points) == 4 and len(launches) == 1
    assert {r.info.status for r in points} == {"FINISHED"}
    assert {r.data.tags["mimsweep.label"] for r in points} == {"60%", "75%", "80%", "90%"}
    assert {r.data.params["method.mask_ratio"] for r in points} == {"0.6", "0.75", "0.8", "0.9"}
    c = MlflowClient(uri)
    for r in points:
        assert r.data.tags["mlflow.parentRunId"] == launches[0].info.run_id
        assert len(r.data.tags["mimsweep.signature"]) == 12
        assert json.loads(r.data.tags["mimsweep.overrides"])[-1] == "seed=0"
        assert 0 <= r.data.metrics["knn_top1"] <= 100 and 0 <= r.data.metrics["linear_top1"] <= 100
        history = c.get_metric_history(r.info.run_id, "train_loss")
        assert [m.step for m in history] == [2, 4, 6]           # log_every=2, max_steps=6, each once
        assert "config.yaml" in [a.path for a in c.list_artifacts(r.info.run_id)]


def test_rerun_skips_finished_points(swept):
    out, args, _ = swept
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert len(re.findall(r"^  skip ", again.stdout, re.M)) == 4          # the action column of the plan
    uri = f"sqlite:///{out}/mlflow.db"
    assert len(_runs(uri, "mcm_mask_ratio", "point")) == 4
    assert len(_runs(uri, "mcm_mask_ratio", "launch")) == 1


def test_a_failed_point_is_the_only_one_redone(tmp_path):
    out = tmp_path
    # The 90% point's inputs overflow (data.std tiny only there): its loss is not finite.
    base = ["sweeps/run.py", "sweep=mcm_recon_range", *TINY, f"output_root={out}"]
    bad = run_cli(*base, FAILING_POINTS, "~sweep.grid")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    uri = f"sqlite:///{out}/mlflow.db"
    runs = {r.data.tags["mimsweep.label"]: r for r in _runs(uri, "mcm_recon_range", "point")}
    assert runs["masked"].info.status == "FAILED"
    assert "non-finite loss" in runs["masked"].data.tags["mimsweep.failure"]
    assert runs["all"].info.status == "FINISHED"
    again = run_cli(*base, FAILING_POINTS, "~sweep.grid", "cluster.max_attempts=2")
    assert "resume masked" in " ".join(again.stdout.split())
    assert "skip all" in " ".join(again.stdout.split())
    assert again.returncode == 1
    # two failures = cluster.max_attempts: the next launch runs nothing and says how to retry
    given_up = run_cli(*base, FAILING_POINTS, "~sweep.grid", "cluster.max_attempts=2")
    assert given_up.returncode == 1, given_up.stdout + given_up.stderr
    assert "failed masked" in " ".join(given_up.stdout.split())
    assert "failed 2 times" in given_up.stdout and "retry_failed=true" in given_up.stdout
    assert len(_runs(uri, "mcm_recon_range", "launch")) == 2          # no launch run: nothing was started
    runs = {r.data.tags["mimsweep.label"]: r for r in _runs(uri, "mcm_recon_range", "point")}
    assert runs["masked"].data.tags["mimsweep.failures"] == "2"
    retried = run_cli(*base, FAILING_POINTS, "~sweep.grid", "cluster.max_attempts=2", "retry_failed=true")
    assert "resume masked" in " ".join(retried.stdout.split())
    runs = {r.data.tags["mimsweep.label"]: r for r in _runs(uri, "mcm_recon_range", "point")}
    assert runs["masked"].data.tags["mimsweep.failures"] == "3"


def test_report_rebuilds_the_table_from_mlflow(swept):
    out, args, _ = swept
    res = run_cli("reports/build.py", *args[1:])
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "%" in line.split("|")[1]]
    assert [r.split("|")[1].strip() for r in rows] == ["60%", "75% (default)", "80%", "90%"]
    assert "84.82" in rows[1] and "83.94" in rows[0]                 # the paper's column beside ours
    for ext in ("md", "tex", "csv", "html", "png"):
        assert (out / "reports" / "mcm_mask_ratio" / f"mcm_mask_ratio.{ext}").stat().st_size > 0
    import pandas as pd
    table = pd.read_csv(out / "reports" / "mcm_mask_ratio" / "mcm_mask_ratio.csv")
    c = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = c.get_experiment_by_name("mcm_mask_ratio")
    tracked = {r.data.tags["mimsweep.label"]: r.data.metrics["knn_top1"] for r in c.search_runs([exp.experiment_id])
               if r.data.tags.get("mimsweep.kind") == "point"}
    table = table.set_index(table.columns[0])
    assert list(table.index[table["ours"]]) == ["60%", "75%", "80%", "90%"]
    for label, knn in tracked.items():
        assert table.loc[label, "knn_top1"] == pytest.approx(knn, abs=0.0051)  # as displayed: 2 decimals (34.375: 34.38)


def test_every_point_leaves_a_timm_loadable_encoder_and_its_figures(swept, tmp_path):
    import json

    import timm
    import torch
    out, _, _ = swept
    uri = f"sqlite:///{out}/mlflow.db"
    c = MlflowClient(uri)
    run = _runs(uri, "mcm_mask_ratio", "point")[0]
    assert "figures/attention_distance.png" in [a.path for a in c.list_artifacts(run.info.run_id, "figures")]
    local = Path(c.download_artifacts(run.info.run_id, "encoder", str(tmp_path)))
    kwargs = json.loads((local / "timm_kwargs.json").read_text())
    net = timm.create_model(kwargs.pop("model_name"), pretrained=False,
                            checkpoint_path=str(local / "timm_state_dict.pth"), **kwargs).eval()
    state = torch.load(local / "timm_state_dict.pth")
    assert torch.equal(net.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    x = torch.rand(2, kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])
    assert net(x).shape == (2, kwargs["embed_dim"])
