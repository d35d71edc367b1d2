"""How many pre-trainings the MCM sweeps need, old identity against new (core/tracking/identity.py). Plans, runs nothing.

    python bench/count_pretrainings.py [--json] [--sweeps mcm_*]

Every sweep file `sweeps/conf/sweep/mcm_*.yaml` is composed point by point as a launch composes it
(sweeps/plan.py compose_point; not validated, so `preset=paper` counts offline too) and signed:
- old, per sweep: the code before core/tracking/identity.py looked runs up inside one sweep only, so it pre-trained
  the distinct whole-config signatures of each sweep: the sum over sweeps;
- old, distinct: the distinct whole-config signatures over all the sweeps;
- new: the distinct pre-training signatures over all the sweeps (a finished one is found store-wide).
And the sweeps' default point (each sweep's `report.default` row): in how many sweeps it appears and how
many pre-trainings it needs now.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {"default": [], "paper": ["preset=paper"]}


def count(sweeps: list[str], extra: list[str]) -> dict:
    from hydra import compose

    from core.config import SEARCHPATH, signature
    from core.methods import uses_teacher
    from core.tracking.identity import pretrain_signature
    from sweeps.plan import compose_point, sweep_points, user_overrides

    per_sweep_old, old_all, new_all, points = 0, set(), set(), 0
    default_sigs = {}
    for name in sweeps:
        overrides = [f"sweep={name}", *extra]
        top = compose(config_name="config", overrides=[SEARCHPATH, *overrides])
        _, pts = sweep_points(top)
        cache, old_here = {}, set()
        for p in pts:
            cfg = compose_point(user_overrides(overrides), p, cache)
            old, new = signature(cfg), pretrain_signature(cfg, uses_teacher(cfg))
            old_here.add(old)
            old_all.add(old)
            new_all.add(new)
            points += 1
            if p.label == (top.sweep.get("report") or {}).get("default"):
                default_sigs[name] = (old, new)
        per_sweep_old += len(old_here)
    main = default_sigs.get("mcm_mask_ratio")
    shared = [s for s, sig in default_sigs.items() if main and sig[1] == main[1]]
    return {"points": points, "old": per_sweep_old, "old_distinct": len(old_all), "new": len(new_all),
            "default_point_sweeps": len(shared), "default_point_sweep_names": shared,
            "default_point_pretrainings": len({default_sigs[s][1] for s in shared}),
            "default_point_old_pretrainings": len(shared)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--sweeps", default="mcm_*", help="glob of sweep files (default mcm_*)")
    args = ap.parse_args(argv)
    from hydra import initialize_config_dir

    from core.config import CONFIG_DIR
    sweeps = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob(args.sweeps + ".yaml"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        out = {"sweeps": sweeps, "presets": {k: count(sweeps, v) for k, v in PRESETS.items()}}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{len(sweeps)} sweeps: {', '.join(sweeps)}")
    for preset, n in out["presets"].items():
        print(f"preset {preset}: {n['points']} points; pre-trainings: old {n['old']} (per-sweep lookup; "
              f"{n['old_distinct']} distinct whole-config signatures), new {n['new']}; the default point is in "
              f"{n['default_point_sweeps']} sweeps: {n['default_point_old_pretrainings']} pre-trainings before, "
              f"{n['default_point_pretrainings']} now")
    return 0


if __name__ == "__main__":
    sys.exit(main())
