"""What an MLflow user finds after a sweep, read through MLflow's REST API and in its real UI.

A real smoke sweep (4 points, 2 local workers, floors on) goes into a real `mlflow server`; every check
reads what the server answers (`/api/2.0/mlflow/...`), as the UI does:
- the experiment has a kind (runs, not GenAI traces) and a description (title, paper table, launch command);
- the points are named for what they are; their params hold no operational key (those stay in config.yaml);
- a point's start time is its job's start (2 workers: never more than 2 runs overlap) and its wait is
  `queue_s`; its output is the artifact logs/point.log; the data it read are its dataset inputs;
- random-init floors are runs of their own experiment, one per key, also when points reach them together
  (2 and 8 processes at once, on SQLite and on a server), and a holder that died does not block the others;
- the report's files are attached to the launch run;
- in headless Chromium, the experiment opens on its runs and Compare shows the swept param and the metrics
  (screenshots: docs/img/, regenerated with MIMSWEEP_SCREENSHOTS=docs/img).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from core.config import RUN_ONLY
from tests.conftest import FAILING_POINTS, REPO, TINY, _need, popen, run_cli

SWEEP = [o for o in TINY if not o.startswith(("evaluate.floor", "cluster.workers"))]
# evaluate.knn.k / linear.epochs: floor keys of this module only (the server is shared by the session)
LAYOUT = ["sweep=mcm_mask_ratio", *SWEEP, "evaluate.floor=true", "evaluate.knn.k=7", "evaluate.linear.epochs=3",
          "cluster.workers=2", "tracking.experiment=layout_mcm"]
TITLE, PAPER = "MCM Tab. 2: channel mask ratio", "Chen et al., MCM, Entropy 2025, Table 2"


# ------------------------------------------------------------------------------------------------ REST
def rest(uri: str, endpoint: str, body: dict | None = None, **query) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read() or b"{}")


def artifact(uri: str, run_id: str, path: str) -> str:
    url = f"{uri}/get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    return urllib.request.urlopen(url, timeout=60).read().decode()


def experiment(uri: str, name: str) -> dict:
    exp = rest(uri, "experiments/get-by-name", experiment_name=name)["experiment"]
    exp["tags"] = {t["key"]: t["value"] for t in exp.get("tags", [])}
    return exp


def runs_of(uri: str, exp_id: str) -> list[dict]:
    runs = rest(uri, "runs/search", {"experiment_ids": [exp_id], "max_results": 1000}).get("runs", [])
    for r in runs:  # key/value lists -> dicts
        for part in ("tags", "params", "metrics"):
            r["data"][part] = {x["key"]: x["value"] for x in r["data"].get(part, [])}
    return runs


def kind(r: dict) -> str:
    return r["data"]["tags"].get("mimsweep.kind", "")


def artifacts(uri: str, run_id: str, path: str = "") -> list[str]:
    return [f["path"] for f in rest(uri, "artifacts/list", run_id=run_id, path=path).get("files", [])]


@pytest.fixture(scope="module")
def layout(mlflow_server, tmp_path_factory):
    """A smoke sweep with floors, 2 workers, into the server; then its report."""
    out = tmp_path_factory.mktemp("layout")
    args = [*LAYOUT, f"output_root={out}", f"tracking.uri={mlflow_server}"]
    launched = run_cli("sweeps/run.py", *args)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    report = run_cli("reports/build.py", *args)
    assert report.returncode == 0, report.stdout + report.stderr
    exp = experiment(mlflow_server, "layout_mcm")
    runs = runs_of(mlflow_server, exp["experiment_id"])
    return {"uri": mlflow_server, "exp": exp, "launched": launched, "out": out,
            "points": [r for r in runs if kind(r) == "point"], "launch": next(r for r in runs if kind(r) == "launch")}


def test_the_experiment_has_a_kind_and_says_what_it_is(layout):
    tags = layout["exp"]["tags"]
    assert tags["mlflow.experimentKind"] == "custom_model_development"   # not a GenAI experiment
    note = tags["mlflow.note.content"]
    assert TITLE in note and PAPER in note, note
    assert "python sweeps/run.py sweep=mcm_mask_ratio" in note and "python reports/build.py" in note, note
    assert "mimsweep-floors" in note
    # the launch prints the link that opens it on its runs
    assert f"MLflow: {layout['uri']}/#/experiments/{layout['exp']['experiment_id']}/runs?workflowType=machine_learning" \
        in layout["launched"].stdout, layout["launched"].stdout


def test_points_are_named_for_their_point_and_log_no_operational_params(layout):
    points = layout["points"]
    assert sorted(r["info"]["run_name"] for r in points) == [
        "mask_ratio=60% seed=0", "mask_ratio=75% seed=0", "mask_ratio=80% seed=0", "mask_ratio=90% seed=0"]
    for r in points:
        params = r["data"]["params"]
        leaked = [k for k in params if any(k == o or k.startswith(o + ".") for o in RUN_ONLY)]
        assert not leaked, leaked
        assert "method.mask_ratio" in params and "evaluate.knn.k" in params
        assert r["data"]["tags"]["mimsweep.cluster.backend"] == "local"     # what the report reads of them
        config = artifact(layout["uri"], r["info"]["run_id"], "config.yaml")
        assert re.search(r"^output_root: ", config, re.M) and re.search(r"^dry_run: false", config, re.M), config
        assert r["data"]["tags"]["mlflow.parentRunId"] == layout["launch"]["info"]["run_id"]


def test_a_point_starts_when_its_job_starts_and_its_wait_is_queue_s(layout):
    launch_start = int(layout["launch"]["info"]["start_time"])
    spans = []
    for r in layout["points"]:
        start, end = int(r["info"]["start_time"]), int(r["info"]["end_time"])
        queue = float(r["data"]["metrics"]["queue_s"])
        assert abs(queue - (start - launch_start) / 1000) < 3, (queue, start - launch_start)
        spans.append((start, end))
    # 2 workers: at no moment are more than 2 of the 4 runs running (created at launch, all 4 would be)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = [sum(d for _, d in events[:i + 1]) for i in range(len(events))]
    assert max(running) == 2, spans
    assert max(float(r["data"]["metrics"]["queue_s"]) for r in layout["points"]) > min(
        (e - s) / 1000 for s, e in spans) / 2   # the later points waited for the first ones


def test_each_point_keeps_its_log_and_its_dataset_inputs(layout):
    digests = set()
    for r in layout["points"]:
        rid = r["info"]["run_id"]
        assert "logs/point.log" in artifacts(layout["uri"], rid, "logs")
        log = artifact(layout["uri"], rid, "logs/point.log")
        assert f"run={rid}" in log and "evaluate knn: knn_top1=" in log, log
        inputs = {i["dataset"]["name"]: i for i in r["inputs"]["dataset_inputs"]}
        assert set(inputs) == {"fashion_mnist_embedded-train", "fashion_mnist_embedded-test"}, inputs
        for split, i in inputs.items():
            assert re.fullmatch(r"[0-9a-f]{12}", i["dataset"]["digest"])
            assert {t["key"]: t["value"] for t in i["tags"]}["mlflow.data.context"] == split.rsplit("-", 1)[1]
            assert json.loads(i["dataset"]["source"])["uri"].endswith("fashion_mnist_subset.npz")
        digests.add(inputs["fashion_mnist_embedded-train"]["dataset"]["digest"])
    assert len(digests) == 1                             # the same data, the same digest


def test_floors_are_runs_of_their_own_experiment_one_per_key(layout):
    uri = layout["uri"]
    assert not [r for r in layout["points"] if kind(r) == "floor"]
    used = {json.dumps(json.loads(r["data"]["tags"]["mimsweep.floor_runs"]), sort_keys=True) for r in layout["points"]}
    assert len(used) == 1                                # every point read the same floor runs
    floor_ids = set(json.loads(used.pop()).values())
    floors = runs_of(uri, experiment(uri, "mimsweep-floors")["experiment_id"])
    mine = [r for r in floors if r["info"]["run_id"] in floor_ids]
    keys = {r["data"]["tags"]["mimsweep.floor_key"] for r in mine}
    assert len(mine) == 2 and len(keys) == 2             # k-NN and linear: one run each
    assert len([r for r in floors if r["data"]["tags"]["mimsweep.floor_key"] in keys]) == 2   # computed once
    for r in mine:
        assert r["info"]["status"] == "FINISHED" and kind(r) == "floor"
        assert r["data"]["tags"]["mimsweep.source_run"] in {p["info"]["run_id"] for p in layout["points"]}
        assert r["inputs"]["dataset_inputs"]
    p = layout["points"][0]["data"]["metrics"]
    knn = next(r for r in mine if r["data"]["tags"]["mimsweep.floor_protocol"] == "knn")
    assert float(p["floor_knn_top1"]) == float(knn["data"]["metrics"]["knn_top1"])
    assert experiment(uri, "mimsweep-floors")["tags"]["mlflow.experimentKind"] == "custom_model_development"
    assert not [e for e in rest(uri, "experiments/search", {"max_results": 1000, "view_type": "ACTIVE_ONLY"})
                ["experiments"] if e["name"].startswith("mimsweep-claims/")]   # every claim released


def test_the_report_is_attached_to_the_launch_run(layout):
    files = artifacts(layout["uri"], layout["launch"]["info"]["run_id"], "report")
    assert sorted(Path(f).name for f in files) == sorted(
        [f"mcm_mask_ratio.{e}" for e in ("csv", "html", "md", "png", "svg", "tex")] + ["mcm_mask_ratio_agreement.csv"])
    assert "| 75%" in artifact(layout["uri"], layout["launch"]["info"]["run_id"], "report/mcm_mask_ratio.md")
    note = layout["launch"]["data"]["tags"]["mlflow.note.content"]
    assert "python sweeps/run.py" in note and "sweep=mcm_mask_ratio" in note


# ------------------------------------------------------------------------------------------- the real UI
@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    _need(bool(path and sync_playwright), "headless Chromium and Playwright",
          "apt-get install -y chromium; pip install playwright")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def _shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    if os.environ.get("MIMSWEEP_SCREENSHOTS"):
        folder = Path(os.environ["MIMSWEEP_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, folder / name)


@pytest.mark.browser
def test_the_ui_opens_the_experiment_on_its_runs_and_compares_the_points(layout, chromium, tmp_path):
    page = chromium.new_page(viewport={"width": 1500, "height": 900})
    link = layout["launched"].stdout.split("MLflow: ", 1)[1].split()[0]
    page.goto(link)
    page.wait_for_url(re.compile(r".*/experiments/\d+/runs\?.*"), timeout=60_000)
    page.get_by_text(TITLE).first.wait_for(timeout=60_000)            # the description, above the runs
    close = page.get_by_label("Close")                                 # the assistant's side panel
    if close.count():
        close.first.click()
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()   # unfold the launch run
    names = page.locator('[col-id="attributes.`Run Name`"] a')
    names.nth(4).wait_for(timeout=30_000)
    shown = names.all_inner_texts()
    assert sorted(shown[1:]) == sorted(r["info"]["run_name"] for r in layout["points"]), shown
    assert shown[0].startswith("mcm_mask_ratio launch") and not [n for n in shown if n.startswith("floor")]
    head = page.locator('.ag-header-cell[col-id="attributes.`Run Name`"]').first.bounding_box()
    x, y = head["x"] + head["width"] - 2, head["y"] + head["height"] / 2    # widen the names' column (its
    page.mouse.move(x, y)                                                  # right edge) for the picture
    page.mouse.down()
    page.mouse.move(x + 130, y, steps=8)
    page.mouse.up()
    rows = page.locator('.ag-pinned-left-cols-container input.ag-checkbox-input, '
                        '.ag-center-cols-container input.ag-checkbox-input').all()
    assert len(rows) == 5, len(rows)
    for box in rows[1:]:                                               # the 4 points
        box.click()
    _shot(page, tmp_path, "mlflow_runs.png")
    page.get_by_role("button", name="Compare").click()
    page.wait_for_url(re.compile(r".*compare-runs.*"), timeout=60_000)
    page.get_by_text("Run details").first.wait_for(timeout=60_000)
    text = page.inner_text("body")
    assert "Comparing 4 Runs" in text, text[:2000]
    params = text[text.index("\nParameters\n"):text.index("\nMetrics\n")]     # the table of params, then metrics
    metrics = text[text.index("\nMetrics\n"):]
    assert re.search(r"^method\.mask_ratio\t", params, re.M) and re.search(r"^knn_top1$", metrics, re.M), params
    for op in ("output_root", "dry_run", "cluster.backend", "tracking.uri", "device"):
        assert not re.search(rf"^{re.escape(op)}\t", params, re.M), op
    _shot(page, tmp_path, "mlflow_compare.png")
    page.close()


# ---------------------------------------------------------------------------- floors computed once, for real
def _floor_points(uri: str, n: int, tmp_path: Path, extra: list[str], env: dict | None = None,
                  go: bool = True) -> subprocess.Popen:
    """n points reaching their floor (forked by tests/floor_worker.py, each a process); released together once
    all wait. `_outputs` reads what each printed."""
    gate = tmp_path / "go"
    proc = popen([sys.executable, str(REPO / "tests/floor_worker.py"), uri, "floor_race", str(gate), str(tmp_path),
                  str(n), *extra], cwd=REPO,
                 env={**os.environ, "OMP_NUM_THREADS": "1", "MIMSWEEP_PROGRESS": "0", **(env or {})},
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while go and time.time() < deadline and not all((tmp_path / f"out{i}.json.ready").exists() for i in range(n)):
        assert proc.poll() is None, proc.communicate()[0] + "\n".join(_outputs(tmp_path, n))
        time.sleep(0.2)
    gate.touch()
    return proc


def _outputs(tmp_path: Path, n: int) -> list[str]:
    """What each of the n points printed (their logs)."""
    return [(tmp_path / f"out{i}.log").read_text() if (tmp_path / f"out{i}.log").exists() else "" for i in range(n)]


def _floor_runs(uri: str, extra_filter: str = "") -> list:
    from core import tracking
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("mimsweep-floors")
    return c.search_runs([exp.experiment_id], f"tags.`mimsweep.kind` = 'floor'{extra_filter}") if exp else []


def _claims(uri: str) -> list:
    from mlflow.entities import ViewType

    from core import tracking
    return [e for e in tracking.client(uri).search_experiments(view_type=ViewType.ALL)
            if e.name.startswith("mimsweep-claims/")]


@pytest.mark.parametrize("n, store", [(2, "sqlite"), (8, "sqlite"), (8, "server")])
def test_points_reaching_a_floor_together_compute_it_once(n, store, tmp_path, request):
    from core import tracking
    uri = request.getfixturevalue("mlflow_server") if store == "server" else f"sqlite:///{tmp_path}/mlflow.db"
    tracking.open_store(uri, create=True)          # as a launch does before its jobs start
    seed = f"seed={100 + n + (50 if store == 'server' else 0)}"    # floor keys of this case only
    proc = _floor_points(uri, n, tmp_path, [seed])
    said = proc.communicate(timeout=600)[0]
    outs = _outputs(tmp_path, n)
    assert proc.returncode == 0, said + "\n".join(outs)
    assert all(outs) and len(list(tmp_path.glob("out*.json"))) == n, outs   # n points, each its own process
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(n)]
    assert len({json.dumps(r["floor"], sort_keys=True) for r in results}) == 1     # everyone read the same floors
    assert len({json.dumps(r["floor_runs"], sort_keys=True) for r in results}) == 1
    ids = set(results[0]["floor_runs"].values())
    floors = [r for r in _floor_runs(uri) if r.info.run_id in ids]
    keys = {r.data.tags["mimsweep.floor_key"] for r in floors}
    same_keys = [r for r in _floor_runs(uri) if r.data.tags["mimsweep.floor_key"] in keys]
    assert len(keys) == 2 and len(same_keys) == 2, [(r.data.tags, r.info.status) for r in same_keys]  # once per key
    assert {r.info.status for r in same_keys} == {"FINISHED"}
    # one process computed each key (two may have split them), every other one waited and read them
    computed = [o for o in outs if "evaluate floor" in o]
    assert 1 <= len(computed) <= len(keys), outs
    assert all("waiting for another point" in o for o in outs if o not in computed), outs
    assert all(e.lifecycle_stage == "deleted" for e in _claims(uri))


def test_a_floor_whose_computing_point_died_is_taken_over(tmp_path):
    """The point computing a floor is killed (-9) with its claim held: the next point does not wait for it."""
    from core import tracking
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.open_store(uri, create=True)
    dead = _floor_points(uri, 1, tmp_path, ["seed=7"], env={"MIMSWEEP_FAULT": "floor.started"})
    dead.communicate(timeout=300)
    assert dead.returncode == -signal.SIGKILL, _outputs(tmp_path, 1)
    held = [e for e in _claims(uri) if e.lifecycle_stage == "active"]
    assert len(held) == 2, held                                   # its two claims (k-NN, linear) were left
    assert {r.info.status for r in _floor_runs(uri)} == {"RUNNING"}
    alive = _floor_points(uri, 1, tmp_path, ["seed=7"])
    said = alive.communicate(timeout=300)[0]
    out = _outputs(tmp_path, 1)[0]
    assert alive.returncode == 0, said + out
    assert "waiting for another point" not in out, out     # taken over at once, not after STALE_S (180 s)
    runs = _floor_runs(uri)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    assert all("ended before it finished" in r.data.tags["mimsweep.failure"] for r in runs if r.info.status == "FAILED")
    result = json.loads((tmp_path / "out0.json").read_text())
    assert set(result["floor_runs"].values()) == {r.info.run_id for r in runs if r.info.status == "FINISHED"}
    assert all(e.lifecycle_stage == "deleted" for e in _claims(uri))


def test_a_claim_of_another_host_is_alive_while_its_heartbeat_is_recent():
    from core.tracking.claims import STALE_S, holder_alive
    now = time.time()
    other = {"mimsweep.host": "elsewhere", "mimsweep.pid": "1"}
    assert holder_alive({**other, "mimsweep.heartbeat": str(now - 5)}, now)
    assert not holder_alive({**other, "mimsweep.heartbeat": str(now - STALE_S - 1)}, now)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                                                   # a pid of this host that is gone
    import socket
    mine = {"mimsweep.host": socket.gethostname(), "mimsweep.pid": str(proc.pid), "mimsweep.heartbeat": str(now)}
    assert not holder_alive(mine, now)
    assert holder_alive({**mine, "mimsweep.pid": str(os.getpid())}, now)


# ----------------------------------------------------------------------------------------------- names, logs
def test_run_names_say_the_point(compose):
    from sweeps.plan import sweep_points
    names = lambda sweep: [p.run_name for p in sweep_points(compose(f"sweep={sweep}"))[1]]  # noqa: E731
    assert names("mcm_mask_ratio") == ["mask_ratio=60% seed=0", "mask_ratio=75% seed=0", "mask_ratio=80% seed=0",
                                       "mask_ratio=90% seed=0"]
    assert names("semanticmim_proxy_count")[:3] == ["BEiT seed=0", "num_proxies=1 seed=0", "num_proxies=2 seed=0"]
    assert names("mcm_target")[0] == [p.label for p in sweep_points(compose("sweep=mcm_target"))[1]][0] + " seed=0"


def test_a_multirun_job_is_named_by_its_overrides(tmp_path):
    res = run_cli("sweeps/run.py", "-m", *TINY, "method.mask_ratio=0.6,0.9", f"output_root={tmp_path}")
    assert res.returncode == 0, res.stdout + res.stderr
    from core import tracking
    c = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    names = sorted(r.info.run_name for r in c.search_runs([c.get_experiment_by_name("mimsweep").experiment_id])
                   if r.data.tags.get("mimsweep.kind") == "point")
    assert len(names) == 2 and not [n for n in names if n.startswith("default")], names
    assert names[0].endswith("method.mask_ratio=0.6 seed=0") and names[1].endswith("method.mask_ratio=0.9 seed=0")
    assert "output_root" not in names[0] and "preset=smoke" in names[0]


def test_a_failed_point_keeps_its_log_too(tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *TINY, FAILING_POINTS, "~sweep.grid",
                  f"output_root={tmp_path}")
    assert res.returncode == 1, res.stdout + res.stderr
    from core import tracking
    c = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.data.tags["mimsweep.label"]: r for r in c.search_runs([c.get_experiment_by_name(
        "mcm_recon_range").experiment_id]) if r.data.tags.get("mimsweep.kind") == "point"}
    failed = runs["masked"]
    assert failed.info.status == "FAILED"
    log = Path(c.download_artifacts(failed.info.run_id, "logs/point.log", str(tmp_path))).read_text()
    reason = failed.data.tags["mimsweep.failure"]                 # "non-finite loss: loss is nan on ..."
    assert reason.startswith("non-finite loss: ") and reason.split(": ", 1)[1] in log, (reason, log)
