"""Points reaching their floor step together, for tests/test_tracking_layout.py: the concurrency of floors.

argv: uri experiment go_file out_dir n [extra Hydra overrides...]. Imports and composes once, then forks `n`
processes, each a point: it creates a point run of the experiment, loads the data, builds the random-init
encoder, writes `out_dir/out{i}.json.ready` and waits until `go_file` exists (so that all of them reach the
floor together), then asks for its floors (core.evaluation.floors.floor_metrics, the call core/job.py makes
after evaluating) and writes {"run": id, "floor": {...}, "floor_runs": {...}} to `out_dir/out{i}.json`; its
output goes to `out_dir/out{i}.log`. Forked after the imports, not started one by one: the imports are ~5
CPU-seconds a process. Exits 0 if every point did; a point killed by a signal (MIMSWEEP_FAULT) kills this
process with the same signal.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow.store.tracking.sqlalchemy_store  # noqa: E402,F401 - before the fork: each point needs them, and
import timm  # noqa: E402,F401 - imported in each of n points they were ~3.5 CPU-seconds a point
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from core import tracking  # noqa: E402
from core.config import CONFIG_DIR, SEARCHPATH, signature  # noqa: E402
from core.evaluation.floors import floor_metrics  # noqa: E402
from core.training.data import describe, load_split  # noqa: E402
from core.vit import ViTEncoder  # noqa: E402
from tests.conftest import TINY  # noqa: E402

uri, experiment, go, out_dir, n = sys.argv[1:6]
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose("config", overrides=[SEARCHPATH, *TINY, "evaluate.floor=true", "data.train_limit=256",
                                       "data.test_limit=128", "evaluate.linear.epochs=2", *sys.argv[6:]])
OmegaConf.resolve(cfg)


def point(i: int) -> None:
    """One point, in a forked process of its own (its own store connection)."""
    out = Path(out_dir) / f"out{i}.json"
    log = os.open(out.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, experiment, uri)
    rid = tracking.create_point_run(c, exp_id, None, "floors", "p", [], signature(cfg), cfg)
    m = cfg.model
    encoder = ViTEncoder(m.input_size, m.patch_size, cfg.data.channels, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio)
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    datasets = [describe(cfg.data, "train", train), describe(cfg.data, "test", test)]
    Path(f"{out}.ready").touch()
    while not Path(go).exists():
        time.sleep(0.05)
    floor, runs = floor_metrics(c, rid, uri, encoder, cfg, train, test, torch.device("cpu"), datasets)
    out.write_text(json.dumps({"run": rid, "floor": floor, "floor_runs": runs}))
    sys.stdout.flush()
    sys.stderr.flush()


children = []
for i in range(int(n)):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            point(i)
        except BaseException:  # noqa: BLE001 - its traceback is its log
            import traceback
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    children.append(pid)
status = [os.waitpid(pid, 0)[1] for pid in children]
killed = [os.WTERMSIG(s) for s in status if os.WIFSIGNALED(s)]
if killed:
    os.kill(os.getpid(), killed[0])
    sys.exit(128 + killed[0])  # a signal Python handles or ignores: still not a success
sys.exit(max((os.WEXITSTATUS(s) for s in status), default=0))
