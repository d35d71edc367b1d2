"""Local backend: run the points one after another in this process (no scheduler needed).

A failing point is recorded as FAILED in MLflow with its reason and the sweep goes on with the next;
the next launch resumes it from its last checkpoint.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

from cluster.backend import Backend
from core.job import run_point
from core.tracking import TrackingUnavailable
from core.train import DiskFull, NonFiniteLoss

# Failures whose message says all (what happened, what to do): no traceback for them.
EXPLAINED = (DiskFull, NonFiniteLoss, TrackingUnavailable)


def run_all(todo, uri: str, root: Path) -> list[dict]:
    """Runs the points; returns one row per point: label, seed, status, metrics, wall time."""
    rows = []
    for i, pl in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {pl.point.label} seed={pl.point.seed} sig={pl.signature} run={pl.run_id}"
              + (" (evaluation only)" if pl.phase == "evaluate" else ""), flush=True)
        t0 = time.perf_counter()
        row = {"point": pl.point.label, "seed": pl.point.seed, "run": pl.run_id}
        rows.append(row)
        try:
            res = run_point(pl.cfg, pl.run_id, uri, str(root / pl.workdir_name), phase=pl.phase,
                            checkpoint=pl.checkpoint)
        except KeyboardInterrupt:
            raise
        except EXPLAINED as e:
            print(f"    FAILED: {e}", flush=True)
            row.update(status="FAILED", metrics={}, wall_s=time.perf_counter() - t0)
            continue
        except Exception as e:  # noqa: BLE001 - reported, tracked as FAILED, and the sweep continues
            traceback.print_exc()
            print(f"    FAILED: {type(e).__name__}: {e}", flush=True)
            row.update(status="FAILED", metrics={}, wall_s=time.perf_counter() - t0)
            continue
        row.update(status="FINISHED", metrics={k: v for k, v in res.items() if k.endswith(("top1", "miou"))},
                   wall_s=time.perf_counter() - t0)
        shown = ", ".join(f"{k}={v:.2f}" for k, v in row["metrics"].items())
        print(f"    done in {row['wall_s']:.0f}s: {shown}", flush=True)
    return rows


def print_summary(rows: list[dict], skipped: int, report_cmd: str | None) -> None:
    """The table a local sweep ends with, and the command to run next."""
    keys = sorted({k for r in rows for k in r["metrics"]})
    head = ["point", "seed", "status", *keys, "wall"]
    body = [[r["point"], str(r["seed"]), r["status"], *(f"{r['metrics'][k]:.2f}" if k in r["metrics"] else "-"
                                                        for k in keys), f"{r['wall_s']:.0f} s"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    print("\nsummary" + (f" ({skipped} point(s) skipped: already finished)" if skipped else ""))
    for line in [head, *body]:
        print("  " + "  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    if report_cmd:
        print(f"next: {report_cmd}")



class Local(Backend):
    """The points one after another in this process; ends with the summary and the report command."""

    def describe(self, todo) -> str:
        return f"dry run: nothing was started ({len(todo)} point(s) would run here, one after another)."

    def start(self, c, parent, todo, handed_over, skipped) -> int:
        import json
        import shlex

        from core import tracking
        rows = run_all(todo, self.uri, self.root)
        handed_over.update(pl.run_id for pl in todo)   # run_point ended each of them, one way or another
        failed = sum(r["status"] != "FINISHED" for r in rows)
        report = None
        if self.sweep != "single":  # the report composes the same grid: it takes the launch's overrides
            report = "python reports/build.py " + " ".join(
                shlex.quote(tracking.redact_text(o, self.raw_uri)) for o in self.task_overrides
                if not o.startswith("hydra"))
        print_summary(rows, skipped, report)
        c.set_tag(parent, tracking.TAG + "summary", json.dumps({"ran": len(todo), "failed": failed, "skipped": skipped}))
        tracking.set_status(c, parent, "FAILED" if failed else "FINISHED")
        return 1 if failed else 0
