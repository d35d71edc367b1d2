"""Shared fixtures: composing configs exactly as the launcher does, and running the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MIMSWEEP_PROGRESS", "0")


@pytest.fixture(scope="session")
def compose():
    """compose(*overrides) -> resolved point config, through Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from core.config import CONFIG_DIR, SEARCHPATH

    GlobalHydra.instance().clear()
    ctx = initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3")
    ctx.__enter__()

    def _compose(*overrides: str):
        cfg = hydra_compose(config_name="config", overrides=[SEARCHPATH, *overrides])
        OmegaConf.resolve(cfg)
        return cfg

    yield _compose
    ctx.__exit__(None, None, None)


def run_cli(*args: str, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run a repo script the way a user does: `python sweeps/run.py ...`."""
    full_env = {**os.environ, "MIMSWEEP_PROGRESS": "0", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if env is None or "MLFLOW_TRACKING_URI" not in env else None
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# The smallest real configuration: the embedded data, vit_micro, a handful of steps.
TINY = ["preset=smoke", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "evaluate.floor=false"]
