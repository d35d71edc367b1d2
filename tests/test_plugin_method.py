"""A method from outside the tree: an installed package declares it as an entry point of the group
`mimsweep.methods` and ships its config as `<package>/conf/method/<name>.yaml`; `python sweeps/run.py
method=<name>` then validates, trains, evaluates and tracks it with no edit to mimsweep.

The package is written here and installed for real with pip (offline: no index, the venv's setuptools) into
a folder that the launch's PYTHONPATH names, so its entry point is seen through importlib.metadata exactly
as for a package installed into the environment."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY, run_cli

METHOD = '''
"""Toy: predict every patch's pixels from the intact image through one linear head."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import check_number
from core.methods.base import Method
from core.targets.normalize import pixel_targets
from core.vit import build_encoder


class Toy(Method):
    name = "toy"
    targets = ("pixel",)

    def __init__(self, encoder, scale):
        super().__init__()
        self.encoder, self.scale = encoder, scale
        self.head = nn.Linear(encoder.embed_dim, encoder.patch_size ** 2 * encoder.in_chans)

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        check_number(cfg, "method.loss_scale", 0, lo_open=True)

    @classmethod
    def build(cls, cfg, teacher=None):
        return cls(build_encoder(cfg), cfg.method.loss_scale)

    @torch.no_grad()
    def make_targets(self, imgs, x, teacher=None):
        return pixel_targets(x, self.encoder.patch_size, normalize=False)

    def forward(self, x, targets):
        pred = self.head(self.encoder(x)[:, self.encoder.num_prefix:])
        return self.scale * F.mse_loss(pred, targets), {"pred": pred}
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "toy-mim"
version = "0.1"

[project.entry-points."mimsweep.methods"]
toy = "toy_mim.method:Toy"

[tool.setuptools]
packages = ["toy_mim"]

[tool.setuptools.package-data]
toy_mim = ["conf/method/*.yaml"]
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The toy package, installed with pip into its own folder -> that folder (for PYTHONPATH)."""
    src = tmp_path_factory.mktemp("toy_src")
    (src / "toy_mim" / "conf" / "method").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "toy_mim" / "__init__.py").write_text("")
    (src / "toy_mim" / "method.py").write_text(textwrap.dedent(METHOD))
    (src / "toy_mim" / "conf" / "method" / "toy.yaml").write_text("name: toy\ntarget: pixel\nloss_scale: 1.0\n")
    site = tmp_path_factory.mktemp("toy_site")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert list(site.glob("toy_mim-0.1.dist-info/entry_points.txt"))
    return site


def test_an_installed_entry_point_method_is_found_listed_and_trained(plugin, tmp_path):
    env = {"PYTHONPATH": f"{plugin}:{REPO}"}
    help_ = run_cli("-c", "from core import methods; print(methods.names())", env=env)
    assert "'toy'" in help_.stdout, help_.stderr
    helped = run_cli("sweeps/run.py", "--help", env=env)                    # --help lists it in its group
    assert "toy" in next(ln for ln in helped.stdout.splitlines() if ln.startswith("method: ")).split(", ")
    bad = run_cli("sweeps/run.py", "method=toy", "method.loss_scale=-1", *TINY, f"output_root={tmp_path}", env=env)
    assert bad.returncode == 2 and "method.loss_scale=-1" in bad.stderr       # its own check runs before anything
    res = run_cli("sweeps/run.py", "method=toy", *TINY, f"output_root={tmp_path}", "tracking.experiment=plugin",
                  env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for r in c.search_runs([c.get_experiment_by_name("plugin").experiment_id])
            if r.data.tags.get("mimsweep.kind") == "point"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["method.name"] == "toy" and "knn_top1" in runs[0].data.metrics
    assert c.get_metric_history(runs[0].info.run_id, "train_loss")


def test_without_the_package_the_method_is_unknown_and_the_error_lists_the_built_ins(tmp_path):
    res = run_cli("sweeps/run.py", "method=mae", "method.name=toy", *TINY, f"output_root={tmp_path}")
    assert res.returncode == 2 and "method.name='toy' is invalid" in res.stderr
    assert "mae, maskalign, mcm, semanticmim" in res.stderr and "mimsweep.methods" in res.stderr
