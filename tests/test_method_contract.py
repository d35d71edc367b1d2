"""The method contract (core/methods/base.py): every shipped method passes one gate, and a method defined in a
test file -- one class, nothing edited anywhere else -- validates, builds and trains."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from core import methods
from core.methods.base import Method
from core.config import CONFIG_DIR, ConfigError
from core.job import validate
from core.targets.normalize import pixel_targets
from core.training.loop import build_model, build_optimizer, train_step
from core.vit import build_encoder
from tests.conftest import TINY

METHOD_FILES = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
# A tiny ViT teacher with [CLS] and attention, random weights (offline), for methods that need them.
VIT_TEACHER = ["teacher=timm", "teacher.model=vit_tiny_patch16_224", "teacher.pretrained=random",
               "teacher.input_size=32", "teacher.dtype=float32", "+teacher.model_kwargs={depth: 6, img_size: 32}"]


def _method_name(config_file: str) -> str:
    """`name` of a method config, following its `defaults` (beit.yaml extends semanticmim.yaml)."""
    node = OmegaConf.load(CONFIG_DIR / "method" / f"{config_file}.yaml")
    if "name" in node:
        return node.name
    parents = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return _method_name(parents[0])


def _cases():
    for f in METHOD_FILES:
        for target in methods.get(_method_name(f)).targets or (None,):
            yield f, target


def _compose(compose, method_file, target, *extra):
    ovr = [*TINY, f"method={method_file}", *extra] + ([f"method.target={target}"] if target else [])
    cfg = compose(*ovr)
    request = methods.get(cfg.method.name).teacher_request(cfg)
    if request is not None and (request.cls or request.cls_attention) and cfg.teacher.kind == "efficientnet_lite0":
        cfg = compose(*ovr, *VIT_TEACHER)
    return cfg


@pytest.mark.parametrize("method_file, target", list(_cases()))
def test_every_method_and_target_trains_one_step_with_a_gradient_everywhere(compose, method_file, target):
    from core.targets.teachers import build_teacher
    cfg = _compose(compose, method_file, target)
    validate(cfg)
    cls = methods.get(cfg.method.name)
    teacher = build_teacher(cfg.teacher) if cls.teacher_request(cfg) is not None else None
    model = build_model(cfg, teacher)
    opt = build_optimizer(model, cfg, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    imgs = torch.rand(8, cfg.data.channels, cfg.model.input_size, cfg.model.input_size)
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    model.seed(0)
    loss, finite = train_step(model, model, opt, scaler, imgs, mean, std, teacher)
    assert finite and torch.isfinite(loss)
    unused = model.unused_parameters()
    missing = [n for n, p in model.named_parameters()
               if n not in unused and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reached {missing}"
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in unused)
    # what pre-training trains is the encoder evaluation and export use
    assert isinstance(model.encoder, nn.Module) and model.encoder.features(imgs).shape[0] == 8


# ---- a method from outside core/ -------------------------------------------------------------------

@methods.register
class ToyReconstruction(Method):
    """Predict every patch's pixels from the intact image: no masking at all, one linear head."""
    name = "toy_reconstruction"
    targets = ("pixel",)

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, encoder.patch_size ** 2 * encoder.in_chans)

    @classmethod
    def build(cls, cfg, teacher=None):
        return cls(build_encoder(cfg))

    @torch.no_grad()
    def make_targets(self, imgs, x, teacher=None):
        return pixel_targets(x, self.encoder.patch_size, normalize=False)

    def forward(self, x, targets):
        pred = self.head(self.encoder(x)[:, self.encoder.num_prefix:])
        return F.mse_loss(pred, targets), {"pred": pred}


def test_a_method_registered_from_a_test_file_validates_builds_and_trains(compose, tmp_path):
    from core.training.data import load_split
    from core.training.loop import pretrain
    from tests.test_resume import FlushedLog
    cfg = compose(*TINY, "method=mae", "pretrain.max_steps=2", "pretrain.log_every=1")
    cfg.method = OmegaConf.create({"name": "toy_reconstruction", "target": "pixel"})
    validate(cfg)
    model = build_model(cfg)
    assert isinstance(model, ToyReconstruction)
    before = model.head.weight.clone()
    log = FlushedLog()
    stats = pretrain(cfg, model, None, load_split(cfg.data, "train"), tmp_path / "ckpt.pt", log, torch.device("cpu"))
    assert stats["steps"] == 2 and not torch.equal(before, model.head.weight)
    assert [s for k, s, _ in log.flushed if k == "train_loss"] == [1, 2]
    cfg.method.target = "hog"
    with pytest.raises(ConfigError, match="method.target"):
        validate(cfg)


def test_an_unknown_method_is_a_config_error_naming_the_key(compose):
    cfg = compose(*TINY)
    cfg.method.name = "no_such_method"
    with pytest.raises(ConfigError, match="method.name") as e:
        validate(cfg)
    assert "mae" in str(e.value) and "semanticmim" in str(e.value)


def test_no_shared_module_dispatches_on_a_method_name():
    """Training, optimiser, evaluation, job and bench reach methods only through the registry: no
    comparison with a method's name, no import of a method module."""
    import re
    repo = Path(__file__).resolve().parents[1]
    names = "|".join(sorted({_method_name(f) for f in METHOD_FILES} | set(METHOD_FILES)))
    dispatch = re.compile(rf"""(==|!=|\bin)\s*[\(\[{{]?\s*["']({names})["']|["']({names})["']\s*(==|!=|:)"""
                          rf"|from core\.methods\.({names}) import|import core\.methods\.({names})\b|\b(MAE|MCM|SemanticMIM|MaskAlign)\(")
    for rel in ("core/training/loop.py", "core/evaluation/evaluate.py", "core/job.py", "core/evaluation/flops.py", "bench/throughput.py"):
        for i, line in enumerate((repo / rel).read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert not dispatch.search(code), f"{rel}:{i} dispatches on a method: {line.strip()}"
