"""The report's side of the evaluation protocols: paper columns beside the metric that reproduces them
(`report.compare`; a Δ only for the same protocol on the same data), protocol metrics as columns when runs have them, device-hours per row, and the issue's
"Done when" flow end to end (a finished sweep, an evaluation-only relaunch, the report)."""
import io
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from reports import table
from tests.conftest import REPO, TINY, run_cli

SPEC = {
    "name": "mcm_mask_ratio", "title": "MCM Tab. 2",
    "report": {
        "row_title": "γ", "default": "75%",
        "compare": {"IN-1k FT top-1": "finetune_top1"},
        "reference": {"columns": ["IN-1k FT top-1", "ADE20K mIoU"],
                      "rows": {"60%": [83.94, 42.87], "75%": [84.82, 43.03]}},
    },
}
LABELS = ["60%", "75%"]


def md_table(md: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    split = lambda ln: [c.strip() for c in ln.strip().strip("|").split(" | ")]  # noqa: E731
    head = split(lines[0])
    return head, {split(ln)[0]: split(ln) for ln in lines[2:]}


def report_of(runs, spec=SPEC, **kw):
    have = [k for k in runs.columns if pd.to_numeric(runs[k], errors="coerce").notna().any()]
    agg = table.aggregate(runs, LABELS, metrics=list(table.metrics_of(spec, have)))
    return table.build(agg, spec, **kw)


def test_compared_column_sits_beside_the_paper_and_the_rest_stays_paper_only():
    runs = pd.DataFrame([
        {"label": "60%", "knn_top1": 50.0, "linear_top1": 60.0, "finetune_top1": 70.0, "floor_finetune_top1": 40.0},
        {"label": "75%", "knn_top1": 51.0, "linear_top1": 61.0, "finetune_top1": 72.0, "floor_finetune_top1": 40.0},
        {"label": "75%", "knn_top1": 53.0, "linear_top1": 61.0, "finetune_top1": 74.0, "floor_finetune_top1": 40.0},
    ])
    rep = report_of(runs)
    head, rows = md_table(table.to_markdown(rep))
    i = head.index("fine-tune top-1")
    # ImageNet against Fashion-MNIST: side by side, and no Δ between numbers measured on different data
    assert head[i + 1] == "paper: IN-1k FT top-1" and not any(h.startswith("Δ") for h in head)
    assert head[-1] == "paper: ADE20K mIoU"                      # not the same measurement: paper-only
    assert head.count("fine-tune top-1") == 1 and "fine-tune floor" in head
    assert "seg. mIoU" not in head                                # no run has it: no column
    assert rows["60%"][i:i + 2] == ["70.00†", "83.94"]            # within the noise of 75%'s two seeds
    assert rows["75% (default)"][i:i + 2] == [f"73.00 ± {math.sqrt(2):.2f}†", "**84.82**"]
    tex = table.to_latex(rep)
    assert "\\multicolumn{2}{c}{ours vs paper} & \\multicolumn{1}{c}{paper}" in tex and "$\\Delta$ IN" not in tex
    assert "IN-1k FT top-1 ← finetune_top1" in table.to_markdown(rep)
    # the same protocol on the same data (declared in the spec): the Δ column comes back
    same = {**SPEC, "report": {**SPEC["report"], "compare": {"IN-1k FT top-1": {"metric": "finetune_top1",
                                                                                  "same_data": True}}}}
    rep = report_of(runs, same)
    head, rows = md_table(table.to_markdown(rep))
    assert head[i + 2].startswith("Δ IN-1k FT top-1")
    assert rows["60%"][i + 2] == f"{70.0 - 83.94:+.2f}"
    csv = pd.read_csv(io.StringIO(table.to_csv(rep)), index_col="label")
    assert csv.at["75%", "Δ IN-1k FT top-1"] == pytest.approx(73.0 - 84.82)
    assert "\\multicolumn{3}{c}{ours vs paper}" in table.to_latex(rep)


def test_old_runs_without_the_protocol_still_render_with_the_paper_column_alone():
    runs = pd.DataFrame([{"label": "60%", "knn_top1": 50.0, "linear_top1": 60.0},
                         {"label": "75%", "knn_top1": 51.0, "linear_top1": 61.0}])
    rep = report_of(runs)
    md = table.to_markdown(rep)
    head, rows = md_table(md)
    assert "fine-tune top-1" not in head and not any(h.startswith("Δ") for h in head)
    assert head[-2:] == ["paper: IN-1k FT top-1", "paper: ADE20K mIoU"]
    assert rows["60%"][1:3] == ["50.00", "60.00"]
    assert "compared with our finetune_top1 once runs have it (add finetune to evaluate.protocols)" in md
    from reports import figures
    table.to_latex(rep), table.to_html(rep), figures.to_png(rep)     # every format renders


def test_linear_views_and_seg_appear_with_their_floors_only_when_runs_have_them():
    spec = {"name": "sb", "title": "SemanticMIM Tab. 1", "report": {
        "row_title": "method", "compare": {"lin CLS": "linear_top1/l7/cls", "VOC": "seg_miou"},
        "reference": {"columns": ["lin CLS", "VOC"], "rows": {"60%": [52.0, 49.5]}}}}
    runs = pd.DataFrame([{"label": "60%", "knn_top1": 1.0, "linear_top1": 2.0, "linear_top1/l7/cls": 30.0,
                          "floor_linear_top1/l7/cls": 20.0, "linear_top1/l2/mean": 25.0, "seg_miou": 40.0}])
    head, rows = md_table(table.to_markdown(report_of(runs, spec)))
    assert {"linear top-1 (block 2, mean)", "linear floor (block 7, cls)"} <= set(head)
    assert "seg. floor" not in head                                # no floor run logged: no floor column
    i = head.index("linear top-1 (block 7, cls)")
    assert rows["60%"][i:i + 2] == ["30.00", "52.0"]            # other data: side by side, no Δ
    j = head.index("seg. mIoU")
    assert rows["60%"][j:j + 2] == ["40.00", "49.5"]
    pending = table.to_markdown(report_of(runs.drop(columns=["linear_top1/l7/cls"]), spec))
    assert "evaluate.linear.layers=[6] evaluate.linear.pools=[cls], on a model with at least 7 blocks" in pending


def test_a_single_linear_view_equal_to_linear_top1_is_not_a_second_column():
    spec = {"name": "m", "title": "t", "report": {"row_title": "γ"}}
    runs = pd.DataFrame([{"label": "60%", "knn_top1": 1.0, "linear_top1": 2.0, "linear_top1/l4/mean": 2.0,
                          "floor_linear_top1": 1.5, "floor_linear_top1/l4/mean": 1.5}])
    head, _ = md_table(table.to_markdown(report_of(runs, spec)))
    assert "linear top-1" in head and "linear floor" in head
    assert not any("block 4" in h for h in head)                   # the only view is linear_top1 itself
    other = runs.assign(**{"linear_top1/l4/mean": 3.0})            # a view that differs stays a column
    head, _ = md_table(table.to_markdown(report_of(other, spec)))
    assert "linear top-1 (block 4, mean)" in head


def test_device_hours_count_a_reused_pretraining_once():
    runs = pd.DataFrame([
        # 60%: a run that pre-trained and evaluated itself, two seeds
        {"label": "60%", "run_id": "a", "knn_top1": 1.0, "device_h": 0.5},
        {"label": "60%", "run_id": "b", "knn_top1": 1.0, "device_h": 0.25},
        # 75%: an evaluation-only run (its own evaluation) + the pre-training it reused, counted once
        {"label": "75%", "run_id": "c", "knn_top1": 1.0, "device_h": 0.1, "pretrained_by": "t",
         "pretrain_device_h": 2.0},
    ])
    agg = table.aggregate(runs, LABELS)
    assert agg.at["60%", table.COST] == pytest.approx(0.75) and agg.at["75%", table.COST] == pytest.approx(2.1)
    twice = pd.concat([runs, runs.iloc[[2]].assign(run_id="d")])  # two evaluations of one pre-training
    assert table.aggregate(twice, LABELS).at["75%", table.COST] == pytest.approx(2.2)
    unknown = runs.assign(device_h=[0.5, math.nan, 0.1])          # an old run without a wall time
    assert math.isnan(table.aggregate(unknown, LABELS).at["60%", table.COST])
    rep = table.build(agg, SPEC, cost_basis="1 per local run")
    head, rows = md_table(table.to_markdown(rep))
    assert rows["75% (default)"][head.index("device-h")] == "2.1"
    assert "× devices per task (1 per local run)" in table.to_markdown(rep)


def test_compare_must_name_a_paper_column():
    bad = {**SPEC, "report": {**SPEC["report"], "compare": {"IN-1k FT": "finetune_top1"}}}
    with pytest.raises(ValueError, match=r"report.compare\['IN-1k FT'\] is not a column of report.reference.columns"):
        table.check_compare(bad)


@pytest.mark.parametrize("path", sorted((REPO / "sweeps" / "conf" / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweeps_comparisons_name_its_paper_columns(path: Path):
    spec = yaml.safe_load(path.read_text())
    compare = table.check_compare(spec)
    cols = spec["report"]["reference"]["columns"]
    # only what measures the same thing: detection / UperNet segmentation columns are never ours
    assert not any(c.startswith(("COCO", "ADE20K")) for c in compare), compare
    if any(c.endswith("FT top-1") for c in cols) and path.stem.startswith(("mcm_", "maskalign_")) \
            and path.stem != "maskalign_speed":
        assert compare == {"IN-1k FT top-1": ("finetune_top1", False)}  # on ImageNet, ours on other data


# ------------------------------------------------------------------------------- "Done when", test size
def test_done_when_evaluation_only_relaunch_then_report_beside_the_paper(tmp_path):
    from mlflow.tracking import MlflowClient

    grid = "sweep.grid={method.mask_ratio:[0.6,0.75]}"
    args = ["sweeps/run.py", "sweep=mcm_mask_ratio", *TINY, grid, f"output_root={tmp_path}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("mcm_mask_ratio")
    before = {r.info.run_id for r in c.search_runs([exp.experiment_id], "tags.`mimsweep.kind` = 'point'")}
    assert len(before) == 2

    evaluation = ["evaluate.protocols=[finetune,linear,seg_linear]", "evaluate.finetune.epochs=1",
                  "evaluate.finetune.warmup_epochs=0", "evaluate.finetune.batch_size=64",
                  "evaluate.seg_linear.epochs=1", "evaluate.seg_linear.train_limit=256"]
    second = run_cli(*args, *evaluation)
    assert second.returncode == 0, second.stdout + second.stderr
    runs = c.search_runs([exp.experiment_id], "tags.`mimsweep.kind` = 'point'")
    new = [r for r in runs if r.info.run_id not in before]
    assert len(new) == 2 and {r.info.status for r in new} == {"FINISHED"}
    for r in new:                                                # pre-trained nothing: evaluation only
        assert r.data.tags["mimsweep.pretrained_by"] in before
        assert "train_loss" not in r.data.metrics and c.get_metric_history(r.info.run_id, "train_loss") == []
        assert {"finetune_top1", "seg_miou", "linear_top1"} <= set(r.data.metrics)
    summary = second.stdout.split("\nsummary")[1].splitlines()[1].split()   # its heading line
    assert {"finetune_top1", "seg_miou", "linear_top1"} <= set(summary), second.stdout

    rep = run_cli("reports/build.py", *args[1:], *evaluation)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    head, rows = md_table(rep.stdout)
    i = head.index("fine-tune top-1")
    assert head[i + 1] == "paper: IN-1k FT top-1" and not any(h.startswith("Δ") for h in head)
    assert "seg. mIoU" in head and head[-1] == "paper: ADE20K mIoU"
    assert "Verdict: IN-1k FT top-1 vs our fine-tune top-1: paper's best 75%" in rep.stdout
    out = tmp_path / "reports" / "mcm_mask_ratio"
    csv = pd.read_csv(out / "mcm_mask_ratio.csv", index_col="label")
    paper = {"60%": 83.94, "75%": 84.82}
    for r in new:
        label = r.data.tags["mimsweep.label"]
        ft = r.data.metrics["finetune_top1"]
        assert csv.at[label, "finetune_top1"] == round(ft, 2)      # as displayed
        row = rows[label + (" (default)" if label == "75%" else "")]
        shown = [cell.strip("*†") for cell in row[i:i + 2]]        # ** = best of its column, † = within noise
        assert shown == [f"{ft:.2f}", f"{paper[label]:.2f}"]
        trainer = c.get_run(r.data.tags["mimsweep.pretrained_by"])
        hours = (r.data.metrics["wall_s"] + trainer.data.metrics["wall_s"]) / 3600   # CPU: 1 device per task
        assert csv.at[label, "device_h"] == float(f"{hours:.3g}")  # 3 significant digits, as displayed
        assert trainer.data.metrics["pretrain_wall_s"] < trainer.data.metrics["wall_s"]
    assert "(1 per local run)" in rep.stdout
