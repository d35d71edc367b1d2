"""One rank of tests/test_ddp.py: runs a point through core.job.run_point under torch.distributed (gloo).

argv: uri run_id workdir out_dir. Saves this rank's final weights to out_dir/rank<R>.pt so the test can
check that every rank ends with the same model.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import core.train  # noqa: E402
from core.config import CONFIG_DIR, SEARCHPATH  # noqa: E402
from core.job import run_point  # noqa: E402
from tests.conftest import TINY  # noqa: E402

uri, run_id, workdir, out = sys.argv[1:5]
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose("config", overrides=[SEARCHPATH, *TINY, "pretrain.max_steps=4", "method.target=norm_pixel",
                                       "pretrain.batch_size=32"])
OmegaConf.resolve(cfg)

original = core.train.pretrain


def pretrain_and_keep(*args, **kwargs):
    stats = original(*args, **kwargs)
    rank = kwargs.get("rank", args[8] if len(args) > 8 else 0)
    torch.save(args[1].state_dict(), Path(out) / f"rank{rank}.pt")
    return stats


core.train.pretrain = pretrain_and_keep
run_point(cfg, run_id, uri, workdir)
