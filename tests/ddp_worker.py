"""One rank of tests/test_ddp.py: runs a point through core.job.run_point under torch.distributed (gloo).

argv: uri run_id workdir out_dir [extra Hydra overrides...]. Saves this rank's final weights to
out_dir/rank<R>.pt and the channel mask its first step drew to out_dir/mask<R>.pt, so the test can
check that every rank ends with the same model but masked its own way. With NAN_AT_STEP=s in the
environment, rank 1's loss is NaN from step s on (a fault on one rank only).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import core.training.loop  # noqa: E402
from core.config import CONFIG_DIR, SEARCHPATH  # noqa: E402
from core.job import run_point  # noqa: E402
from core.methods.mcm import MCM  # noqa: E402
from tests.conftest import TINY  # noqa: E402

uri, run_id, workdir, out = sys.argv[1:5]
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose("config", overrides=[SEARCHPATH, *TINY, "pretrain.max_steps=4", "method.target=norm_pixel",
                                       "pretrain.batch_size=32", *sys.argv[5:]])
OmegaConf.resolve(cfg)
rank = int(os.environ["RANK"])
nan_at = int(os.environ.get("NAN_AT_STEP", "0"))
original, forward, calls = core.training.loop.pretrain, MCM.forward, {"n": 0}


def pretrain_and_keep(*args, **kwargs):
    stats = original(*args, **kwargs)
    torch.save(args[1].state_dict(), Path(out) / f"rank{rank}.pt")
    return stats


def forward_and_record(self, x, targets):
    loss, outputs = forward(self, x, targets)
    calls["n"] += 1
    if calls["n"] == 1:
        torch.save(outputs["mask"].cpu(), Path(out) / f"mask{rank}.pt")
    if nan_at and rank == 1 and calls["n"] >= nan_at:
        loss = loss * float("nan")
    return loss, outputs


core.training.loop.pretrain = pretrain_and_keep
MCM.forward = forward_and_record
run_point(cfg, run_id, uri, workdir)
