"""The site over a store (reports/site.py), built from real launches and opened in a real headless Chromium.

Two real tiny sweeps land in one store: `mcm_mask_ratio` (2 points, finished) and `mcm_recon_range` whose
"masked" point fails for real (non-finite loss). `python reports/build.py --site` writes the site; Debian's
chromium (driven by Playwright) opens it from file://: the index lists every sweep with its state, each page's
table holds the numbers MLflow holds, no page logs a console error, the figures are drawn, and a screenshot
is not blank. Without chromium or Playwright the browser tests skip on a workstation and fail in CI.
"""
from __future__ import annotations

import io
import os
import shutil

import pytest

from reports import site
from tests.conftest import FAILING_POINTS, TINY, _need, run_cli

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("site_store")
    grid = "sweep.grid={method.mask_ratio:[0.6,0.75]}"
    ok = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", *TINY, grid, f"output_root={out}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *TINY, FAILING_POINTS, "~sweep.grid", f"output_root={out}")
    assert bad.returncode == 1, bad.stdout + bad.stderr          # the masked point failed, for real
    built = run_cli("reports/build.py", "--site", "--output-root", str(out), "--ui", "http://mlflow.example:5000")
    assert built.returncode == 0, built.stdout + built.stderr
    from mlflow.tracking import MlflowClient
    c = MlflowClient(f"sqlite:///{out}/mlflow.db")
    points = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])
              if r.data.tags.get("mimsweep.kind") == "point"]
    return out, points


def test_cli_says_where_no_store_is(tmp_path):
    r = run_cli("reports/build.py", "--site", "--output-root", str(tmp_path))
    assert r.returncode == 1 and "no MLflow store at sqlite:///" in r.stderr and "No site was written" in r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "site").exists()  # nothing created


def test_variants_are_the_result_changing_overrides():
    assert site.variant_of(["preset=smoke", "output_root=/tmp/x", "cluster.workers=1", "tracking.uri=x"]) == "preset=smoke"
    assert site.variant_of(["evaluate.protocols=[finetune]", "reuse=none"]) == "evaluate.protocols=[finetune]"
    a = site.Sweep("1", "mcm_mask_ratio", "mcm_mask_ratio", "")
    b = site.Sweep("1", "mcm_mask_ratio", "mcm_mask_ratio", "preset=smoke")
    c = site.Sweep("2", "mine", "mcm_mask_ratio", "")
    assert len({a.slug, b.slug, c.slug}) == 3 and a.slug == "mcm_mask_ratio"


def test_site_files_from_the_store(store):
    out, points = store
    root = out / "site"
    assert (root / "index.html").is_file() and (root / "assets" / site.PLOTLY).is_file()
    pages = sorted(p.name.split("--")[0] for p in (root / "sweeps").glob("*.html"))
    assert pages == ["mcm_mask_ratio", "mcm_recon_range"]
    recon = page_of(root, "mcm_recon_range").read_text()
    assert "1 finished · 0 running · 0 queued · 1 failed" in recon
    assert "non-finite loss" in recon                             # the failure reason beside the run
    for r in points:
        link = f"http://mlflow.example:5000/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}"
        name = r.data.tags["mimsweep.sweep"]
        assert link in page_of(root, name).read_text()



def test_pages_built_by_several_processes_are_the_ones_one_process_builds(store, tmp_path, monkeypatch):
    """A big store's reports and pages are built by one forked process per CPU (reports/site.py): the same
    files, byte for byte but the build time, as one process writes; the index keeps the sweeps' order."""
    import re
    out, _ = store
    uri = f"sqlite:///{out}/mlflow.db"
    one = site.build(uri, tmp_path / "one", ui="http://mlflow.example:5000")
    monkeypatch.setattr(site, "PARALLEL_FROM", 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})   # 2 CPUs, whatever this machine has
    two = site.build(uri, tmp_path / "two", ui="http://mlflow.example:5000")
    assert "(1 process)" in one["timings"] and "(2 processes)" in two["timings"], (one, two)
    built = lambda text: re.sub(r"built \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "built T", text)  # noqa: E731
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".html"]) == 3          # the index and one page per sweep
    for f in files:
        if f.suffix in (".html", ".csv"):
            assert built((tmp_path / "two" / f).read_text()) == built((tmp_path / "one" / f).read_text()), f

def page_of(root, name):
    """The page of the one sweep of that name (its file name carries a hash of the launch's overrides)."""
    (found,) = list((root / "sweeps").glob(f"{name}--*.html")) + list((root / "sweeps").glob(f"{name}.html"))
    return found


def _as_plain(records) -> dict:
    """{run id: record as a dict}, NaN as a string (NaN != NaN)."""
    import dataclasses
    import math
    nan = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    out = {}
    for r in records:
        d = dataclasses.asdict(r)
        d["data"]["metrics"] = {k: nan(v) for k, v in d["data"]["metrics"].items()}
        out[r.info.run_id] = d
    return out


def test_bulk_read_of_a_database_store_equals_mlflows_search(store, tmp_path, monkeypatch):
    """core/tracking/bulk.py's column queries give what the paged search gives: same runs (deleted runs and
    experiments left out), tags, params, latest metrics (NaN included), their latest timestamp, histories."""
    import math

    from mlflow.tracking import MlflowClient

    from core.tracking import bulk
    out, points = store
    shutil.copy(out / "mlflow.db", tmp_path / "mlflow.db")          # edited below: the fixture's store stays
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert bulk._sql_store(c) is not None
    finished = [r for r in points if r.info.status == "FINISHED"]
    c.log_metric(finished[0].info.run_id, "diverged", math.nan)
    c.delete_run(finished[1].info.run_id)
    gone = c.create_experiment("gone")
    c.create_run(gone)
    c.delete_experiment(gone)

    experiments = bulk.experiments(c)
    assert gone not in experiments and set(experiments.values()) >= {"mcm_mask_ratio", "mcm_recon_range"}
    fast, slow = bulk.runs(c, list(experiments)), bulk._runs_search(c, list(experiments), {})
    assert _as_plain(fast) == _as_plain(slow)
    assert [r.info.run_id for r in fast] == [r.info.run_id for r in slow]            # oldest first, both
    ids = {r.info.run_id for r in fast}
    assert finished[1].info.run_id not in ids and finished[0].info.run_id in ids
    assert math.isnan(next(r for r in fast if r.info.run_id == finished[0].info.run_id).data.metrics["diverged"])
    assert all(len(r.data.params) > 50 and r.data.metric_time > 0 for r in fast if r.info.status == "FINISHED"
               and r.data.tags.get("mimsweep.kind") == "point")

    chosen = {"mimsweep.kind": "point", "mimsweep.sweep": "mcm_recon_range"}
    picked = bulk.runs(c, list(experiments), chosen)
    assert _as_plain(picked) == _as_plain(bulk._runs_search(c, list(experiments), chosen))
    assert sorted(r.info.run_id for r in picked) == sorted(r.info.run_id for r in points if r.info.run_id in ids
                                                           and r.data.tags["mimsweep.sweep"] == "mcm_recon_range")

    # `detail`: params and metrics only for the runs it wants (a report: those its plan matches), tags of all
    keep = picked[0].data.tags["mimsweep.pretrain_signature"]
    detailed = bulk.runs(c, list(experiments), chosen, detail=lambda t: t["mimsweep.pretrain_signature"] == keep)
    assert [r.info.run_id for r in detailed] == [r.info.run_id for r in picked]
    for mine, full in zip(detailed, picked):
        wanted = full.data.tags["mimsweep.pretrain_signature"] == keep
        assert (mine.info, mine.data.tags) == (full.info, full.data.tags)
        assert (mine.data.params, mine.data.metrics) == ((full.data.params, full.data.metrics) if wanted else ({}, {}))
    assert 0 < sum(r.data.tags["mimsweep.pretrain_signature"] == keep for r in picked) < len(picked)

    by_run = bulk.histories(c, sorted(ids), "train_loss")       # a few runs: by run id
    monkeypatch.setattr(bulk, "SCAN_ABOVE", 1)
    # "most of a store": every table read in one pass, the chosen runs' rows kept (deleted run, other sweep out)
    assert _as_plain(bulk.runs(c, list(experiments))) == _as_plain(slow)
    assert _as_plain(bulk.runs(c, list(experiments), chosen)) == _as_plain(picked)
    by_key = bulk.histories(c, sorted(ids)[1:], "train_loss")   # "most of a store": one pass over the key
    for run_id in ids:
        want = sorted((m.step, m.value, m.timestamp) for m in c.get_metric_history(run_id, "train_loss"))
        assert sorted(by_run[run_id]) == want
        assert sorted(by_key[run_id]) == want if run_id != sorted(ids)[0] else run_id not in by_key
    assert sum(map(len, by_run.values())) > 0


@pytest.fixture(scope="module")
def browser():
    have = shutil.which("chromium") is not None or shutil.which(CHROMIUM) is not None
    _need(have, "Debian's chromium", "apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "Playwright", "pip install -e '.[test]' (playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, path):
    """(page, console errors and page errors collected while it loaded and drew)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors


def not_blank(png: bytes) -> float:
    from PIL import Image, ImageStat
    return max(ImageStat.Stat(Image.open(io.BytesIO(png)).convert("L")).stddev)


def test_index_lists_every_sweep_with_its_state(store, browser):
    out, points = store
    page, errors = open_page(browser, out / "site" / "index.html")
    rows = page.locator("table.index tbody tr")
    names = sorted(rows.nth(i).locator("td").first.inner_text() for i in range(rows.count()))
    assert names == sorted({r.data.tags["mimsweep.sweep"] for r in points}) == ["mcm_mask_ratio", "mcm_recon_range"]
    recon = page.locator("table.index tbody tr", has_text="mcm_recon_range").locator("td")
    assert [recon.nth(i).inner_text() for i in range(3, 7)] == ["1", "0", "0", "1"]  # finished, running, queued, failed
    assert "Verdict" not in recon.nth(8).inner_text() and "vs our" in recon.nth(8).inner_text()
    page.locator("a", has_text="mcm_mask_ratio").click()             # the link leads to the sweep's page
    page.wait_for_load_state("load")
    assert page.url == page_of(out / "site", "mcm_mask_ratio").as_uri()
    assert errors == []
    assert not_blank(page.screenshot(full_page=True)) > 10


@pytest.mark.parametrize("name", ["mcm_mask_ratio", "mcm_recon_range"])
def test_each_page_shows_its_table_with_the_numbers_mlflow_holds(store, browser, name):
    out, points = store
    page, errors = open_page(browser, page_of(out / "site", name))
    page.wait_for_function("document.querySelectorAll('.panel .main-svg').length > 0", timeout=20000)
    rows = {}
    body = page.locator("#T_report tbody tr")
    for i in range(body.count()):
        cells = [c.strip() for c in body.nth(i).locator("th, td").all_inner_texts()]
        rows[cells[0].removesuffix(" (default)")] = cells[1:]
    heads = [h.strip() for h in page.locator("#T_report thead tr").last.locator("th").all_inner_texts()][1:]
    mine = [r for r in points if r.data.tags["mimsweep.sweep"] == name]
    for r in mine:
        label = r.data.tags["mimsweep.label"]
        if r.info.status != "FINISHED":
            assert rows[label][heads.index("k-NN top-1")] == "–"        # no finished run: a dash
            continue
        for metric, heading in (("knn_top1", "k-NN top-1"), ("linear_top1", "linear top-1")):
            shown = rows[label][heads.index(heading)].rstrip("†")
            assert shown == f"{r.data.metrics[metric]:.2f}", (label, heading)
    assert page.locator(".verdict").inner_text().startswith("Verdict:")
    drawn = page.locator(".panel .main-svg").count()
    assert drawn >= 2                                                   # figure panels and loss curves
    assert errors == []
    assert not_blank(page.screenshot(full_page=True)) > 10
