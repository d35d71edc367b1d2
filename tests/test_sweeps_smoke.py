"""Every SemanticMIM and MaskAlign sweep, as a user rehearses it: `preset=smoke` locally into a fresh
MLflow store, then its report; and one sweep of each method (its first and last points) as a job array on the
local SLURM cluster."""
import pytest
from mlflow.tracking import MlflowClient

from core.config import CONFIG_DIR
from tests.conftest import TINY, TINY_SLURM, run_cli

NEW_SWEEPS = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml")
                    if p.stem.startswith(("semanticmim_", "maskalign_")))


def _points(uri, experiment):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("mimsweep.kind") == "point"]


@pytest.mark.parametrize("sweep", NEW_SWEEPS)
def test_sweep_runs_with_preset_smoke_and_its_report_is_built(sweep, tmp_path):
    args = [f"sweep={sweep}", *TINY, f"output_root={tmp_path}"]
    res = run_cli("sweeps/run.py", *args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = _points(f"sqlite:///{tmp_path}/mlflow.db", sweep)
    assert runs and {r.info.status for r in runs} == {"FINISHED"}
    rep = run_cli("reports/build.py", *args)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    labels = {r.data.tags["mimsweep.label"] for r in runs}
    table_rows = {line.split("|")[1].strip().removesuffix(" (default)") for line in rep.stdout.splitlines()
                  if line.startswith("| ")}
    assert labels <= table_rows
    assert (tmp_path / "reports" / sweep / f"{sweep}.png").stat().st_size > 0


def _first_and_last_points(sweep: str) -> str:
    """An override keeping the sweep's first and last points (a SLURM task is a fresh Python: ~7 CPU-seconds)."""
    import yaml
    points = yaml.safe_load((CONFIG_DIR / "sweep" / f"{sweep}.yaml").read_text())["points"]
    return "sweep.points=[" + ",".join(
        "{label:'%s',overrides:[%s]}" % (p["label"], ",".join(f"'{o}'" for o in p["overrides"]))
        for p in (points[0], points[-1])) + "]"


@pytest.mark.slurm
@pytest.mark.parametrize("sweep", ["semanticmim_proxy_count", "maskalign_topk"])
def test_a_new_methods_sweep_runs_as_a_slurm_array(sweep, slurm_cluster, mlflow_server, tmp_path):
    from tests.test_slurm import SMALL, _queued_ids, _wait_runs
    args = ["sweeps/run.py", f"sweep={sweep}", _first_and_last_points(sweep), *TINY_SLURM, *SMALL,
            f"tracking.uri={mlflow_server}", f"tracking.experiment=slurm_{sweep}", f"output_root={tmp_path}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    ids = _queued_ids(first.stdout)
    assert len(ids) == 1, first.stdout
    n = first.stdout.count("  new ")
    assert n == 2, first.stdout
    runs = _wait_runs(mlflow_server, f"slurm_{sweep}", n)
    assert {r.info.status for r in runs} == {"FINISHED"}, [r.data.tags.get("mimsweep.failure") for r in runs]
    assert {r.data.tags["mimsweep.slurm_job_all"].split("_")[0] for r in runs} == {ids[0]}
    assert all("knn_top1" in r.data.metrics for r in runs)
    c = MlflowClient(mlflow_server)
    figures = [a.path for a in c.list_artifacts(runs[0].info.run_id, "figures")]
    assert "figures/attention_distance.png" in figures
