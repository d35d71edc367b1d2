"""A job that is stopped or crashes and restarts ends bit-for-bit where an uninterrupted one ends."""
import pytest
import torch

from core.training.data import load_split
from core.training.loop import NonFiniteLoss, Preempted, build_model, pretrain
from tests.conftest import TINY


class FlushedLog:
    """Stands in for tracking.MetricLog: keeps only what was flushed, like MLflow would. `store`: the
    list of another log (the same run resumed by a second job)."""

    def __init__(self, store: list | None = None):
        self.buffer, self.flushed = [], store if store is not None else []

    def __call__(self, key, value, step=0):
        self.buffer.append((key, step, value))

    def flush(self):
        self.flushed += self.buffer
        self.buffer = []

    def pending(self):
        return list(self.buffer)

    def replay(self, records):
        self.flushed += [r for r in records if r not in self.flushed]  # the store drops exact duplicates


def _stop_after(n, exc=None):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        if calls["n"] == n:
            if exc:
                raise exc
            return True
        return False
    return should_stop


@pytest.fixture
def cfg(compose):
    return compose(*TINY, "pretrain.max_steps=8", "pretrain.checkpoint_every=3", "pretrain.log_every=1",
                   "method.target=norm_pixel")


def _run(cfg, ckpt, should_stop=lambda: False, log=None):
    split = load_split(cfg.data, "train")
    model, log = build_model(cfg), log or FlushedLog()
    pretrain(cfg, model, None, split, ckpt, log, torch.device("cpu"), should_stop)
    return model, log


def _metrics(log):
    return sorted((k, s, v) for k, s, v in log.flushed if k != "throughput_img_s")


@pytest.mark.parametrize("how, raises, checkpoint_step", [
    # USR2-style stop: a checkpoint is written at the stop step, then Preempted
    ("stopped", Preempted, 5),
    # a crash at step 5: no checkpoint, the metric buffer is lost, restart from the step-3 checkpoint
    ("crashed", RuntimeError, 3),
])
def test_interrupted_job_resumes_bit_for_bit(cfg, tmp_path, how, raises, checkpoint_step):
    stop = _stop_after(5) if how == "stopped" else _stop_after(5, RuntimeError("node died"))
    _interrupt_resume_and_compare(cfg, tmp_path, stop, raises, checkpoint_step)


def _interrupt_resume_and_compare(cfg, tmp_path, stop, raises, checkpoint_step):
    ref, ref_log = _run(cfg, tmp_path / "ref.pt")
    log_a = FlushedLog()
    with pytest.raises(raises):
        pretrain(cfg, build_model(cfg), None, load_split(cfg.data, "train"), tmp_path / "job.pt", log_a,
                 torch.device("cpu"), stop)
    assert torch.load(tmp_path / "job.pt", weights_only=False)["step"] == checkpoint_step
    resumed, _ = _run(cfg, tmp_path / "job.pt", log=FlushedLog(store=log_a.flushed))
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # what reached the tracker before the interruption plus after the restart = the uninterrupted history
    assert _metrics(ref_log) == _metrics(log_a)


def test_an_imagefolder_job_resumes_bit_for_bit_through_loader_workers(compose, tmp_path):
    """JPEGs decoded and cropped in 2 DataLoader workers, handed over as uint8 and scaled on the device:
    a job stopped at step 5 and restarted (new workers, new iterator) ends with the uninterrupted weights."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in range(3):
        (tmp_path / "tree" / "train" / f"c{cls}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (36, 48, 3), np.uint8)).save(tmp_path / "tree" / "train" / f"c{cls}" / f"{i}.jpg")
    cfg = compose(*TINY, "data=imagenet", f"data.root={tmp_path / 'tree'}", "data.num_workers=2",
                  "data.num_classes=3", "data.train_limit=null", "pretrain.batch_size=8", "pretrain.epochs=3",
                  "pretrain.max_steps=8", "pretrain.checkpoint_every=3", "pretrain.log_every=1",
                  "method.target=norm_pixel")
    _interrupt_resume_and_compare(cfg, tmp_path, _stop_after(5), Preempted, checkpoint_step=5)


def test_checkpoint_is_replaced_atomically(cfg, tmp_path):
    _run(cfg, tmp_path / "job.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["job.pt"]  # no temp file left behind


def test_non_finite_loss_stops_the_run(compose, tmp_path):
    cfg = compose(*TINY, "data.std=[1e-38]", "method.target=norm_pixel")  # inputs overflow to inf
    with pytest.raises(NonFiniteLoss, match="step 1"):
        _run(cfg, tmp_path / "job.pt")
