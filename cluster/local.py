"""Local backend: run the points one after another in this process (no scheduler needed).

A failing point is recorded as FAILED in MLflow with its reason and the sweep goes on with the next;
the next launch resumes it from its last checkpoint.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

from core.job import run_point
from core.tracking import TrackingUnavailable
from core.train import DiskFull, NonFiniteLoss

# Failures whose message says all (what happened, what to do): no traceback for them.
EXPLAINED = (DiskFull, NonFiniteLoss, TrackingUnavailable)


def run_all(todo, uri: str, root: Path) -> int:
    failed = 0
    for i, pl in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {pl.point.label} seed={pl.point.seed} sig={pl.signature} run={pl.run_id}",
              flush=True)
        t0 = time.perf_counter()
        try:
            res = run_point(pl.cfg, pl.run_id, uri, str(root / pl.workdir_name))
        except KeyboardInterrupt:
            raise
        except EXPLAINED as e:
            failed += 1
            print(f"    FAILED: {e}", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - reported, tracked as FAILED, and the sweep continues
            failed += 1
            traceback.print_exc()
            print(f"    FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        shown = ", ".join(f"{k}={v:.2f}" for k, v in res.items() if k.endswith("top1"))
        print(f"    done in {time.perf_counter() - t0:.0f}s: {shown}", flush=True)
    return failed
