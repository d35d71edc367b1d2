"""reports/table.py on synthetic runs: aggregation, bolding, default/missing/reference rows, formats."""
import io
import math

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
    assert '<tr class="default"><td>75% (default)</td>' in table.to_html(rep)
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
    assert "<td><b>50.00</b></td>" in page
    assert "<td>42.00 ± 2.83</td>" in page


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
