"""reports/table.py on synthetic runs: aggregation, bolding, default/missing/reference rows, formats."""
import io
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from reports import table

MASK_SPEC = {
    "name": "mcm_mask_ratio",
    "title": "MCM Tab. 2: channel mask ratio",
    "report": {
        "row_title": "mask ratio γ",
        "default": "75%",
        "reference": {
            "source": "Chen et al., Table 2",
            "columns": ["IN-1k FT top-1", "COCO APb"],
            "rows": {"60%": [83.94, 44.42], "75%": [84.82, 45.26], "80%": [84.87, 45.07], "90%": [84.19, 44.66]},
        },
    },
}
EPOCH_SPEC = {
    "name": "mcm_epochs",
    "title": "MCM Fig. 3: pre-training epochs",
    "report": {
        "row_title": "epochs",
        "default": "8",
        "reference": {"source": "Chen et al., Table 1", "columns": ["IN-1k FT top-1", "COCO APb"],
                      "rows": {"300": [84.8, 45.3], "1600": [85.9, 49.8]}},
    },
}
LABELS = ["60%", "75%", "80%", "90%"]


def run(label, seed, knn, linear, floor_knn=10.0, floor_linear=12.0):
    return {"label": label, "seed": seed, "knn_top1": knn, "linear_top1": linear,
            "floor_knn_top1": floor_knn, "floor_linear_top1": floor_linear}


def mask_runs():
    """75% has two seeds; 90% has none (a missing point); 80% has the best k-NN, 60% the best linear."""
    return pd.DataFrame([
        run("60%", 0, 40.0, 30.0),
        run("75%", 0, 40.0, 20.0), run("75%", 1, 44.0, 22.0),
        run("80%", 0, 50.0, 25.0),
    ])


def mask_report(**kw):
    agg = table.aggregate(mask_runs(), LABELS)
    kw.setdefault("missing", 1)
    kw.setdefault("expected", 5)
    kw.setdefault("run_command", "python sweeps/run.py sweep=mcm_mask_ratio preset=smoke")
    return table.build(agg, MASK_SPEC, caption="vit_micro on Fashion-MNIST", **kw)


def md_rows(md: str) -> dict[str, list[str]]:
    """Markdown table body -> {label cell: [other cells]}."""
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    out = {}
    for line in rows[2:]:  # skip the header and the alignment row
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        out[cells[0]] = cells[1:]
    return out


def test_aggregate_two_seeds_mean_std_n():
    agg = table.aggregate(mask_runs(), LABELS)
    assert list(agg.index) == LABELS
    assert agg.at["75%", "knn_top1_mean"] == pytest.approx(42.0)
    assert agg.at["75%", "knn_top1_std"] == pytest.approx(math.sqrt(8.0))  # sample std of 40, 44
    assert agg.at["75%", "linear_top1_mean"] == pytest.approx(21.0)
    assert agg.at["75%", "n"] == 2
    assert agg.at["60%", "n"] == 1 and math.isnan(agg.at["60%", "knn_top1_std"])  # one seed: no spread
    assert agg.at["90%", "n"] == 0 and math.isnan(agg.at["90%", "knn_top1_mean"])


def test_aggregate_ignores_labels_outside_the_grid_and_missing_metrics():
    runs = pd.DataFrame([{"label": "60%", "knn_top1": 41.0}, {"label": "stale", "knn_top1": 99.0}])
    agg = table.aggregate(runs, ["60%"])
    assert list(agg.index) == ["60%"]
    assert agg.at["60%", "knn_top1_mean"] == 41.0 and math.isnan(agg.at["60%", "linear_top1_mean"])


def test_aggregate_of_no_runs_is_all_missing():
    agg = table.aggregate(pd.DataFrame(columns=["label"]), LABELS)
    assert agg["n"].tolist() == [0, 0, 0, 0]
    assert agg["knn_top1_mean"].isna().all()


def test_markdown_bolds_best_per_column_ours_and_paper():
    rows = md_rows(table.to_markdown(mask_report()))
    knn, linear, floor_knn, floor_linear, n, paper_ft, paper_apb = range(7)
    assert rows["80%"][knn] == "**50.00**"
    assert rows["75% (default)"][knn] == "42.00 ± 2.83"
    assert rows["60%"][linear] == "**30.00**"
    assert rows["80%"][paper_ft] == "**84.87**"
    assert rows["75% (default)"][paper_apb] == "**45.26**"
    assert rows["60%"][paper_ft] == "83.94"
    # floors are identical in every row: nothing stands out, so nothing is bold
    assert all("**" not in r[floor_knn] and "**" not in r[floor_linear] for r in rows.values())
    assert rows["75% (default)"][n] == "2" and rows["80%"][n] == "1"


def test_bold_ties_at_displayed_precision():
    runs = pd.DataFrame([run("60%", 0, 50.001, 1.0), run("75%", 0, 49.999, 2.0), run("80%", 0, 10.0, 3.0)])
    rep = table.build(table.aggregate(runs, ["60%", "75%", "80%"]), MASK_SPEC)
    is_best = table.best(rep)
    assert is_best.loc[["60%", "75%", "80%"], "knn_top1_mean"].tolist() == [True, True, False]
    assert is_best.loc[["60%", "75%", "80%"], "linear_top1_mean"].tolist() == [False, False, True]


def test_default_row_is_marked_in_every_format():
    rep = mask_report()
    assert "75% (default)" in md_rows(table.to_markdown(rep))
    assert "60% (default)" not in md_rows(table.to_markdown(rep))
    assert "75\\% (default) &" in table.to_latex(rep)
    page = table.to_html(rep)
    assert '<th class="row_heading level0 row1" >75% (default)</th>' in page
    assert "#T_report .row1 {\n  background: #f3f3f3;\n}" in page  # the default row (heading and cells) shaded
    csv = pd.read_csv(io.StringIO(table.to_csv(rep)), index_col="label")
    assert csv["default"].tolist() == [False, True, False, False]


def test_default_footnote_says_what_the_default_row_is():
    assert "(default): the paper's default setting (75%)." in table.to_markdown(mask_report())
    spec = {**EPOCH_SPEC, "report": {**EPOCH_SPEC["report"], "default_note": "the embedded default's epochs"}}
    rep = table.build(table.aggregate(pd.DataFrame([run("8", 0, 40.0, 30.0)]), ["8"]), spec)
    md = table.to_markdown(rep)
    assert "(default): the embedded default's epochs (8)." in md and "paper's default setting" not in md


def test_missing_points_show_dash_and_footnote_with_command():
    md = table.to_markdown(mask_report())
    rows = md_rows(md)
    assert rows["90%"][:4] == [table.MISSING] * 4
    assert rows["90%"][4] == "0"
    assert rows["90%"][5] == "84.19"  # the paper's numbers are still shown
    assert "1 of 5 grid points (row × seed) have no finished run yet" in md
    assert "`python sweeps/run.py sweep=mcm_mask_ratio preset=smoke`" in md


def test_no_missing_footnote_when_complete():
    runs = pd.DataFrame([run(label, 0, 40.0 + i, 20.0) for i, label in enumerate(LABELS)])
    rep = table.build(table.aggregate(runs, LABELS), MASK_SPEC, missing=0, expected=4)
    md = table.to_markdown(rep)
    assert table.MISSING not in md and "no finished run" not in md


def test_reference_rows_outside_the_grid_are_appended_with_empty_ours_cells():
    labels = ["1", "2", "4", "8"]
    runs = pd.DataFrame([run(label, 0, 30.0 + int(label), 20.0) for label in labels])
    rep = table.build(table.aggregate(runs, labels), EPOCH_SPEC)
    assert list(rep.frame.index) == ["1", "2", "4", "8", "300", "1600"]
    rows = md_rows(table.to_markdown(rep))
    assert rows["300"] == ["", "", "", "", "", "84.8", "45.3"]  # 84.8 keeps the paper's precision
    assert rows["1600"] == ["", "", "", "", "", "**85.9**", "**49.8**"]
    assert rows["8 (default)"][:2] == ["**38.00**", "20.00"]
    assert rows["1"][5:] == ["", ""]  # no paper numbers for our 1-epoch point


def test_reference_row_of_wrong_length_is_an_error():
    spec = {**MASK_SPEC, "report": {**MASK_SPEC["report"], "reference": {
        "columns": ["a", "b"], "rows": {"60%": [1.0]}}}}
    with pytest.raises(ValueError, match=r"rows\['60%'\] has 1 values for 2"):
        table.build(table.aggregate(mask_runs(), LABELS), spec)


def test_latex_is_booktabs_and_escaped():
    tex = table.to_latex(mask_report())
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert tex.count(rule) == 1
    assert "\\usepackage" not in tex.replace("needs \\usepackage{booktabs}", "")
    assert "\\begin{tabular}{lrrrrrrr}" in tex  # label + 4 metrics + n + 2 paper columns
    assert "\\multicolumn{5}{c}{ours} & \\multicolumn{2}{c}{paper}" in tex
    assert "mask ratio $\\gamma$ &" in tex
    assert "80\\% & \\textbf{50.00} &" in tex
    assert "42.00 $\\pm$ 2.83" in tex
    assert "90\\% & -- & -- & -- & -- & 0 &" in tex
    assert "sweep=mcm\\_mask\\_ratio" in tex
    assert "±" not in tex and "γ" not in tex and "–" not in tex  # plain pdflatex needs none of these


def test_csv_round_trips_numbers():
    rep = mask_report()
    back = pd.read_csv(io.StringIO(table.to_csv(rep)), index_col="label")
    assert list(back.index) == ["60%", "75%", "80%", "90%"]
    assert back.at["75%", "knn_top1_mean"] == 42.0
    assert back.at["75%", "knn_top1_std"] == math.sqrt(8.0)  # full precision, not the displayed 2.83
    assert back.at["80%", "paper: IN-1k FT top-1"] == 84.87
    assert back["n"].tolist() == [1, 2, 1, 0]
    assert math.isnan(back.at["90%", "knn_top1_mean"])
    for col in rep.frame.columns:
        pd.testing.assert_series_equal(back[col].astype(float), rep.frame[col].astype(float), check_names=False)


def test_csv_paper_only_rows_have_empty_n():
    labels = ["1", "2"]
    rep = table.build(table.aggregate(pd.DataFrame([run("1", 0, 30.0, 20.0)]), labels), EPOCH_SPEC)
    back = pd.read_csv(io.StringIO(table.to_csv(rep)), index_col="label", dtype={"label": str})
    assert back["ours"].tolist() == [True, True, False, False]
    assert back.at["2", "n"] == 0 and math.isnan(back.at["1600", "n"])


def test_html_is_self_contained_with_plot():
    rep = mask_report()
    png = table.plot(rep)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    page = table.to_html(rep, png)
    assert page.startswith("<!doctype html>") and '<meta charset="utf-8">' in page
    assert 'src="data:image/png;base64,iVBORw0KGgo' in page
    assert '<td class="data row2 col0" ><b>50.00</b></td>' in page
    assert '<td class="data row1 col0" >42.00 ± 2.83</td>' in page


def test_plot_handles_paper_only_rows_and_no_reference():
    spec = {"name": "x", "title": "x", "report": {"row_title": "r"}}
    rep = table.build(table.aggregate(pd.DataFrame([run("a", 0, 1.0, 2.0)]), ["a", "b"]), spec)
    assert rep.paper_columns == []
    assert table.plot(rep).startswith(b"\x89PNG")
    md = table.to_markdown(rep)
    assert md.splitlines()[0] == "### x"
    assert "(default)" not in md


def test_paper_numbers_keep_their_printed_precision():
    spec = {**EPOCH_SPEC, "report": {**EPOCH_SPEC["report"], "reference": {
        "columns": ["ADE20K mIoU"], "rows": {"300": [43.0], "1600": [50.5]}}}}
    rep = table.build(table.aggregate(pd.DataFrame(columns=["label"]), ["8"]), spec)
    rows = md_rows(table.to_markdown(rep))
    assert rows["300"][-1] == "43.0" and rows["1600"][-1] == "**50.5**"


# ------------------------------------------------------------------------------- golden outputs
# Every format of a few representative reports, compared byte for byte with tests/data/report_golden/.
# After a deliberate change of the output: UPDATE_GOLDEN=1 pytest tests/test_reports.py -k golden
GOLDEN = Path(__file__).parent / "data" / "report_golden"


def golden_reports() -> dict[str, table.Report]:
    """Reports that together show every feature of the table: each built by the module's own functions."""
    reports = {"mask_ratio": mask_report()}  # default row, bold highest, a missing point, two seeds ± std
    # paper-only rows after ours (300 / 1600 epochs), a column where our values tie
    labels = ["1", "2", "4", "8"]
    runs = pd.DataFrame([run(label, 0, 30.0 + int(label), 20.0 if label in ("2", "4") else 15.0) for label in labels])
    reports["paper_rows"] = table.build(table.aggregate(runs, labels), EPOCH_SPEC)
    # ties at displayed precision, no reference, no default
    runs = pd.DataFrame([run("60%", 0, 50.001, 1.0), run("75%", 0, 49.999, 2.0), run("80%", 0, 10.0, 3.0)])
    reports["ties"] = table.build(table.aggregate(runs, ["60%", "75%", "80%"]),
                                  {"name": "ties", "title": "ties", "report": {"row_title": "r"}})
    # our fine-tuning beside the paper's column with Δ (one paper number missing), device-hours
    spec = {"name": "mcm_mask_ratio", "title": "MCM Tab. 2", "report": {
        "row_title": "γ", "default": "75%", "compare": {"IN-1k FT top-1": "finetune_top1"},
        "reference": {"columns": ["IN-1k FT top-1", "ADE20K mIoU"],
                      "rows": {"60%": [83.94, 42.87], "75%": [84.82, 43.03], "80%": [None, 43.1]}}}}
    runs = pd.DataFrame([
        {"label": "60%", "knn_top1": 50.0, "linear_top1": 60.0, "finetune_top1": 70.0, "device_h": 0.0123},
        {"label": "75%", "knn_top1": 51.0, "linear_top1": 61.0, "finetune_top1": 72.0, "device_h": 1.5},
        {"label": "75%", "knn_top1": 53.0, "linear_top1": 61.0, "finetune_top1": 74.0, "device_h": 2.25},
        {"label": "80%", "knn_top1": 52.0, "linear_top1": 59.0, "finetune_top1": 71.0, "device_h": 1234.5},
    ])
    have = ["knn_top1", "linear_top1", "finetune_top1"]
    agg = table.aggregate(runs, ["60%", "75%", "80%"], metrics=list(table.metrics_of(spec, have)))
    reports["compare"] = table.build(agg, spec, cost_basis="1 per local run", caption="vit_micro, 1 epoch")
    # the same comparison before any run has fine-tuned: the paper column alone and a pending note
    agg = table.aggregate(runs.drop(columns=["finetune_top1", "device_h"]), ["60%", "75%", "80%"])
    reports["pending"] = table.build(agg, spec)
    # lower is better, relative to one row: as a ratio and as a change in percent
    speed = {"name": "speed", "title": "MaskAlign Tab. 7", "report": {
        "row_title": "paradigm", "default": "MaskAlign", "metrics": {"epoch_s": "s / epoch"}, "best": "lowest",
        "relative_to": "MaskAlign", "reference": {
            "source": "Xue et al., Table 7", "columns": ["epochs", "time (x MaskAlign)"],
            "rows": {"MaskAlign": [200, 1.0], "MILAN": [400, 3.2], "MVP": [300, 2.8]}}}}
    runs = pd.DataFrame([{"label": "MaskAlign", "epoch_s": 10.0}, {"label": "MaskAlign", "epoch_s": 12.0},
                         {"label": "MILAN", "epoch_s": 25.0}, {"label": "FD", "epoch_s": 11.0}])
    agg = table.aggregate(runs, ["MaskAlign", "MILAN", "FD"], metrics=["epoch_s"])
    reports["relative_ratio"] = table.build(agg, speed)
    percent = {**speed, "report": {**speed["report"], "relative_to": {"label": "MaskAlign", "as": "percent"}}}
    reports["relative_percent"] = table.build(agg, percent)
    # characters each format must escape, in labels, headings, caption, source, notes and the command
    odd = {"name": "odd_chars", "title": "A & B: 50% of <x> | y_z", "report": {
        "row_title": "γ_mask | <ratio> & 100%", "default": "a_b & c", "default_note": "the 50% <default> | here",
        "metrics": {"knn_top1": "k-NN_top1 <%>", "acc|x": "acc & more"},
        "reference": {"source": "Paper_1 & <2> | 3%", "columns": ["FT_top1 %", "A&B <c>"],
                      "rows": {"a_b & c": [84.5, 1.0], "<tag> | 5%": [83.25, None], "γ=0.75 # $x$": [None, 2.0]}}}}
    runs = pd.DataFrame([{"label": "a_b & c", "knn_top1": 40.0, "acc|x": 1.0},
                         {"label": "<tag> | 5%", "knn_top1": 41.0, "acc|x": 2.0},
                         {"label": "<tag> | 5%", "knn_top1": 43.5, "acc|x": 2.0}])
    agg = table.aggregate(runs, ["a_b & c", "<tag> | 5%", "x~y^z\\w {q}"], metrics=["knn_top1", "acc|x"])
    reports["odd_chars"] = table.build(agg, odd, caption="vit_micro & 10% <data> | γ", missing=1, expected=4,
                                       run_command="python sweeps/run.py sweep=odd_chars 'a=[1,2]' && echo <done> | cat")
    return reports


def render(report: table.Report) -> dict[str, str]:
    return {"md": table.to_markdown(report), "tex": table.to_latex(report), "html": table.to_html(report)}


@pytest.mark.parametrize("name", sorted(golden_reports()))
def test_golden_outputs(name):
    rendered = render(golden_reports()[name])
    for fmt, text in rendered.items():
        path = GOLDEN / f"{name}.{fmt}"
        if os.environ.get("UPDATE_GOLDEN"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        assert text == path.read_text(encoding="utf-8"), f"{path.name} differs from the golden file"


@pytest.mark.parametrize("name", sorted(golden_reports()))
def test_markdown_rows_have_as_many_cells_as_the_header(name):
    """A "|" in a label or a heading is escaped: it must not split a cell (GitHub would shift the row)."""
    md = table.to_markdown(golden_reports()[name])
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    counts = {len(line.replace("\\|", "").split("|")) for line in lines}
    assert len(lines) >= 3 and len(counts) == 1, lines
