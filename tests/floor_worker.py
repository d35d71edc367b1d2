"""One point's floor step, in its own process, for tests/test_tracking_layout.py: the concurrency of floors.

argv: uri experiment go_file out_json [extra Hydra overrides...]. Creates a point run of the experiment, waits
until `go_file` exists (so that all the processes reach the floor together), then asks for its floors
(core.evaluation.floors.floor_metrics, the call core/job.py makes after evaluating) with the random-init
encoder of the config, and writes {"run": id, "floor": {...}, "floor_runs": {...}} to out_json
(`out_json.ready` says it is waiting for the go).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from core import tracking  # noqa: E402
from core.config import CONFIG_DIR, SEARCHPATH, signature  # noqa: E402
from core.evaluation.floors import floor_metrics  # noqa: E402
from core.training.data import describe, load_split  # noqa: E402
from core.vit import ViTEncoder  # noqa: E402
from tests.conftest import TINY  # noqa: E402

uri, experiment, go, out = sys.argv[1:5]
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose("config", overrides=[SEARCHPATH, *TINY, "evaluate.floor=true", "data.train_limit=256",
                                       "data.test_limit=128", "evaluate.linear.epochs=2", *sys.argv[5:]])
OmegaConf.resolve(cfg)
torch.set_num_threads(1)
c = tracking.client(uri)
exp_id = tracking.experiment_id(c, experiment, uri)
rid = tracking.create_point_run(c, exp_id, None, "floors", "p", [], signature(cfg), cfg)
m = cfg.model
encoder = ViTEncoder(m.input_size, m.patch_size, cfg.data.channels, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio)
train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
datasets = [describe(cfg.data, "train", train), describe(cfg.data, "test", test)]
Path(out + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.05)
floor, runs = floor_metrics(c, rid, uri, encoder, cfg, train, test, torch.device("cpu"), datasets)
Path(out).write_text(json.dumps({"run": rid, "floor": floor, "floor_runs": runs}))
