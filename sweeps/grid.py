"""Sweep spec -> grid points.

A spec (sweeps/conf/sweep/NAME.yaml) declares its points either as a `grid` (the cartesian product of
`key: [values]`) or as explicit `points` (each a row label and a list of Hydra overrides), plus
`fixed` overrides for every point and `seeds`. Each point becomes the list of overrides that Hydra
composes on top of the user's own command line; the row label is what the report prints.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from omegaconf import OmegaConf


def override_key(o: str) -> str:
    """The config key a Hydra override sets: `+a.b=1` -> `a.b`."""
    return o.split("=", 1)[0].lstrip("+~")


@dataclass
class Point:
    label: str                      # the report's row, e.g. "75%" or "teacher via channel"
    seed: int
    overrides: list[str]            # Hydra overrides of this point (fixed + swept + seed)
    name: str = ""                  # what the point is, for its MLflow run name ("mask_ratio=75%"); "" = label

    @property
    def run_name(self) -> str:
        return f"{self.name or self.label} seed={self.seed}"


def point_name(label: str, own: list[str]) -> str:
    """A label that is only a value ("2", "75%") says nothing on its own outside the report's table: it is
    named by the key the point sets (`num_proxies=2`); a label with words in it says the point already."""
    bare = label.rstrip("%").replace(".", "", 1).lstrip("-").isdigit()
    keys = [o.split("=", 1)[0].lstrip("+~").split(".")[-1] for o in own if "=" in o]
    return f"{keys[0]}={label}" if bare and len(keys) == 1 else label


def format_value(value, fmt: str | None) -> str:
    if fmt == "percent" and isinstance(value, (int, float)):
        return f"{value * 100:g}%"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _override_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    return str(v)


def expand(spec) -> list[Point]:
    """spec: the composed `sweep` node. Seeds vary fastest, so a row's repeats stay together."""
    spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else spec
    fixed = list(spec.get("fixed") or [])
    seeds = [0] if spec.get("seeds") is None else list(spec["seeds"])
    fmt = (spec.get("report") or {}).get("row_format")
    rows: list[tuple[str, list[str]]] = []
    if spec.get("grid") and spec.get("points"):
        raise ValueError(f"sweep {spec.get('name')}: give `grid` or `points`, not both")
    if spec.get("grid"):
        keys = list(spec["grid"])
        for combo in itertools.product(*(spec["grid"][k] for k in keys)):
            values = dict(zip(keys, combo))
            label = (format_value(combo[0], fmt) if len(keys) == 1
                     else ", ".join(f"{k.split('.')[-1]}={format_value(v, fmt)}" for k, v in values.items()))
            rows.append((label, [f"{k}={_override_value(v)}" for k, v in values.items()]))
    elif spec.get("points"):
        for p in spec["points"]:
            rows.append((str(p["label"]), list(p.get("overrides") or [])))
    else:
        raise ValueError(f"sweep {spec.get('name')}: declares neither `grid` nor `points`")
    return [Point(label, seed, fixed + ovr + [f"seed={seed}"], point_name(label, ovr)) for label, ovr in rows
            for seed in seeds]
