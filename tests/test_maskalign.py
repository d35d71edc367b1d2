"""MaskAlign (core/methods/maskalign.py): Dynamic Alignment, top-K targets, visible-only loss, attentive masking,
config errors and exact resume. Teachers are small random-init timm ViTs: fast, offline, real code paths."""
import functools

import pytest
import torch
import torch.nn.functional as F

from core.config import ConfigError
from core.job import validate
from core.methods.maskalign import MaskAlign, init_align_matrix
from core.targets.teachers import TeacherRequest
from core.targets.normalize import normalize_features
from core.targets.teachers import TimmTeacher, build_teacher
from core.training.loop import build_model, build_optimizer
from core.vit import ViTEncoder
from tests.conftest import TINY

IMG, PATCH = 16, 4                       # a 4x4 grid: 16 patches


@functools.lru_cache(maxsize=None)
def tiny_teacher(depth=4, width=32):
    """Frozen, so one instance per shape is shared by the tests."""
    torch.manual_seed(0)
    return TimmTeacher("vit_tiny_patch16_224", "random", input_size=IMG, dtype="float32",
                       model_kwargs=dict(img_size=IMG, patch_size=PATCH, embed_dim=width, depth=depth, num_heads=2))


def tiny_model(teacher, depth=4, **kw):
    torch.manual_seed(0)
    enc = ViTEncoder(IMG, PATCH, 1, 32, depth, num_heads=2)
    K = kw.setdefault("top_k", 3)
    kw.setdefault("teacher_request", TeacherRequest(layers=tuple(range(-K, 0)), cls=kw.get("align_cls", False),
                                                    cls_attention=kw.get("masking", "attentive") == "attentive"))
    return MaskAlign(enc, list(teacher.layer_widths[-K:]), teacher.depth, **kw)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(n, 1, IMG, IMG, generator=g)
    return imgs, (imgs - 0.5) / 0.25


# ---- Dynamic Alignment matrix W

def test_align_matrix_init_follows_the_reference():
    # student as deep as the teacher, all layers aligned: identity + 0.01
    assert torch.equal(init_align_matrix(4, 4, 4), torch.eye(4) + 0.01)
    # same depth, top K < S: the K columns of that matrix that the aligned layers use
    assert torch.equal(init_align_matrix(4, 2, 4), (torch.eye(4) + 0.01)[:, 2:])
    # other depths: uniform 1/S
    assert torch.equal(init_align_matrix(4, 5, 8), torch.full((4, 5), 0.25))
    m = tiny_model(tiny_teacher(depth=8), depth=4, top_k=5)
    assert m.align_matrix.shape == (4, 5) and torch.equal(m.align_matrix.data, torch.full((4, 5), 0.25))


def test_align_matrix_has_no_weight_decay_and_the_adaptors_do(compose):
    cfg = compose(*TINY, "method=maskalign", "teacher=vit_fmnist", "teacher.pretrained=random")
    model = build_model(cfg, build_teacher(cfg.teacher))
    opt = build_optimizer(model, cfg, 1e-3)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(model.align_matrix)] == 0.0
    assert decay_of[id(model.adaptors[0].weight)] == cfg.pretrain.weight_decay > 0


def test_alignment_module_is_not_part_of_the_encoder():
    m = tiny_model(tiny_teacher())
    assert not [k for k in m.encoder.state_dict() if "adaptor" in k or "align" in k]
    assert {k.split(".")[0] for k in m.state_dict()} == {"encoder", "adaptors", "align_matrix"}


# ---- top-K targets and the layer-wise map

@pytest.mark.parametrize("K", [1, 3, 5])
def test_teacher_request_asks_for_the_last_k_layers_only(compose, K):
    cfg = compose(*TINY, "method=maskalign", "teacher=vit_fmnist", "teacher.pretrained=random", f"method.top_k={K}",
                  "method.masking=random")
    req = MaskAlign.teacher_request(cfg)
    assert req == TeacherRequest(layers=tuple(range(-K, 0)))         # no patch, no [CLS], no attention
    cfg.method.masking, cfg.method.align_cls = "attentive", True
    assert MaskAlign.teacher_request(cfg) == TeacherRequest(layers=tuple(range(-K, 0)), cls=True, cls_attention=True)


def test_targets_are_the_teachers_last_k_block_outputs_layer_normed():
    teacher = tiny_teacher(depth=6)
    m = tiny_model(teacher, top_k=3)
    imgs, x = batch()
    layers = m.make_targets(imgs, x, teacher)["layers"]
    assert len(layers) == 3
    for j, t in enumerate(layers):                   # target j = teacher block 6-3+j (0-based 3, 4, 5)
        ref = teacher(imgs, m.encoder.grid, TeacherRequest(layers=(3 + j,))).layers[0]
        assert torch.allclose(t, normalize_features(ref, "layernorm"))


def test_layerwise_aligns_student_block_s_minus_k_plus_j_with_teacher_layer_j():
    teacher = tiny_teacher()
    m = tiny_model(teacher, depth=4, top_k=3, alignment="layerwise")
    assert not hasattr(m, "align_matrix") and len(m.adaptors) == 3
    imgs, x = batch()
    targets = m.make_targets(imgs, x, teacher)
    outs = []
    hooks = [b.register_forward_hook(lambda mod, i, o: outs.append(o)) for b in m.encoder.blocks]
    m.seed(3)
    loss, out = m(x, targets)
    for h in hooks:
        h.remove()
    ids = out["ids_keep"]
    expected = 0.0
    for j in range(3):                               # student block 1 + j <-> teacher layer j of the top 3
        pred = m.adaptors[j](outs[1 + j])[:, 1:]
        t = torch.gather(targets["layers"][j], 1, ids.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
        expected = expected + F.smooth_l1_loss(pred, t) / 3
    assert torch.allclose(loss, expected)


def test_layerwise_with_more_layers_than_student_blocks_spreads_them_uniformly():
    # K = 5 teacher layers, S = 2 blocks: teacher layer j <- block floor(2j/5): 0, 0, 0, 1, 1
    m = tiny_model(tiny_teacher(depth=6), depth=2, top_k=5, alignment="layerwise")
    assert m.student_layers == (0, 0, 0, 1, 1) and len(m.adaptors) == 5
    assert tiny_model(tiny_teacher(depth=6), depth=4, top_k=4, alignment="layerwise").student_layers == (0, 1, 2, 3)


# ---- the loss covers visible tokens (and [CLS] when asked) only

@pytest.mark.parametrize("masking", ["attentive", "random"])
@pytest.mark.parametrize("align_cls", [False, True])
def test_loss_ignores_teacher_targets_at_masked_patches(masking, align_cls):
    teacher = tiny_teacher()
    m = tiny_model(teacher, mask_ratio=0.5, masking=masking, align_cls=align_cls)
    imgs, x = batch()
    targets = m.make_targets(imgs, x, teacher)
    m.seed(7)
    loss, out = m(x, targets)
    mask = out["mask"].bool()                        # [B, N], True = dropped
    assert mask.sum() == 4 * 8

    def loss_with(where, cls=False):
        perturbed = []
        for t in targets["layers"]:
            t = t.clone()
            P = 1 if align_cls else 0
            t[:, P:][where] += 5.0
            if cls:
                t[:, 0] += 5.0
            perturbed.append(t)
        m.seed(7)
        return m(x, {**targets, "layers": perturbed})[0]

    assert torch.equal(loss_with(mask), loss)        # masked positions: no effect at all
    assert not torch.allclose(loss_with(~mask), loss)  # visible positions: the loss moves
    if align_cls:
        assert not torch.allclose(loss_with(torch.zeros_like(mask), cls=True), loss)


# ---- masking

def keep_frequency(m, attention, draws=2000):
    """How often each patch is kept over `draws` samples (one batch of identical attention rows)."""
    m.seed(0)
    ids = m.keep_ids(draws, attention.numel(), attention.expand(draws, -1), "cpu")
    kept = torch.zeros(draws, attention.numel()).scatter_(1, ids, 1.0)
    assert (kept.sum(1) == ids.shape[1]).all()       # without replacement: K distinct patches per draw
    return kept.mean(0)


def spearman(a, b):
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def test_attentive_masking_keeps_high_attention_patches_more_often():
    """2,000 draws of 4 kept patches out of 16, attention rising linearly 1..10 (normalised).
    (a) Spearman correlation of keep frequency with attention > 0.9;
    (b) the 10x-attention patch vs the 1x patch: one-sided two-proportion z-test, z > 5 (p < 3e-7)."""
    m = tiny_model(tiny_teacher(), mask_ratio=0.75, masking="attentive")
    attn = torch.linspace(1, 10, 16)
    attn = attn / attn.sum()
    f = keep_frequency(m, attn)
    assert spearman(attn, f) > 0.9
    n, p_hi, p_lo = 2000, f[-1].item(), f[0].item()
    pooled = (p_hi + p_lo) / 2
    z = (p_hi - p_lo) / (pooled * (1 - pooled) * 2 / n) ** 0.5
    assert z > 5, (p_hi, p_lo, z)


def test_random_masking_ignores_attention():
    m = tiny_model(tiny_teacher(), mask_ratio=0.75, masking="random")
    attn = torch.linspace(1, 10, 16)
    f = keep_frequency(m, attn / attn.sum())
    # uniform: every patch kept ~1/4 of the time (binomial sd ~0.0097 at n=2000; 0.05 is > 5 sd)
    assert (f - 0.25).abs().max() < 0.05
    m.seed(0)
    a = m.keep_ids(8, 16, torch.rand(8, 16), "cpu")
    m.seed(0)
    assert torch.equal(a, m.keep_ids(8, 16, None, "cpu"))   # the attention plays no part


@pytest.mark.parametrize("masking", ["attentive", "random"])
def test_mask_ratio_zero_keeps_every_patch(masking):
    teacher = tiny_teacher()
    m = tiny_model(teacher, mask_ratio=0.0, masking=masking)
    imgs, x = batch()
    m.seed(0)
    loss, out = m(x, m.make_targets(imgs, x, teacher))
    assert out["mask"].sum() == 0 and torch.isfinite(loss)
    assert (out["ids_keep"].sort(1).values == torch.arange(16)).all()


# ---- one step of every variant: finite, every trainable parameter gets a gradient

@pytest.mark.parametrize("kw", [{}, {"alignment": "layerwise"}, {"alignment": "layerwise", "top_k": 6},
                                {"align_cls": True}, {"adaptor_kind": "mlp"},
                                {"target_norm": "batchnorm", "masking": "random"}, {"target_norm": "none"}])
def test_every_trainable_parameter_learns(kw):
    teacher = tiny_teacher(depth=8)
    m = tiny_model(teacher, **dict(kw))
    for name, p in m.named_parameters():
        p.requires_grad_(name not in m.unused_parameters())
    imgs, x = batch()
    m.seed(0)
    loss, _ = m(x, m.make_targets(imgs, x, teacher))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing
    assert m.unused_parameters() == {"encoder.norm.weight", "encoder.norm.bias"}


# ---- config errors name the key

@pytest.mark.parametrize("override, key", [
    ("method.top_k=9", "method.top_k"),                       # the packaged teacher has 8 blocks
    ("method.top_k=0", "method.top_k"),
    ("method.mask_ratio=1.0", "method.mask_ratio"),
    ("method.mask_ratio=0.99", "method.mask_ratio"),          # 49 patches: none would stay visible
    ("method.masking=block", "method.masking"),
    ("method.alignment=sparse", "method.alignment"),
    ("method.adaptor=conv", "method.adaptor"),
    ("method.target_norm=l2", "method.target_norm"),
    ("method.align_cls=maybe", "method.align_cls"),
    ("+method.topk=3", "method.topk"),                        # a typo is not silently ignored
])
def test_bad_config_names_the_key(compose, override, key):
    cfg = compose(*TINY, "method=maskalign", "teacher=vit_fmnist", "teacher.pretrained=random", override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == key


def test_top_k_beyond_the_built_teacher_depth_is_refused_at_build(compose):
    cfg = compose(*TINY, "method=maskalign", "teacher=timm", "teacher.pretrained=random", "method.top_k=5")
    validate(cfg)                                    # nothing in the config says how deep the teacher is
    with pytest.raises(ConfigError, match="4 blocks") as e:
        MaskAlign.build(cfg, tiny_teacher(depth=4))
    assert e.value.key == "method.top_k"


# ---- exact resume (tests/test_resume.py's protocol, with a teacher)

def test_resumed_run_is_bit_identical(compose, tmp_path):
    from core.training.data import load_split
    from core.training.loop import Preempted, pretrain
    from tests.test_resume import FlushedLog, _metrics, _stop_after

    cfg = compose(*TINY, "method=maskalign", "teacher=vit_fmnist", "teacher.pretrained=random",
                  "pretrain.max_steps=5", "pretrain.checkpoint_every=2", "pretrain.log_every=1",
                  "pretrain.batch_size=16")
    torch.manual_seed(0)
    teacher = build_teacher(cfg.teacher)
    split = load_split(cfg.data, "train")

    def run(ckpt, stop=lambda: False, log=None):
        model, log = build_model(cfg, teacher), log or FlushedLog()
        pretrain(cfg, model, teacher, split, ckpt, log, torch.device("cpu"), stop)
        return model, log

    ref, ref_log = run(tmp_path / "ref.pt")
    log_a = FlushedLog()
    with pytest.raises(Preempted):
        pretrain(cfg, build_model(cfg, teacher), teacher, split, tmp_path / "job.pt", log_a, torch.device("cpu"),
                 _stop_after(3))
    resumed, _ = run(tmp_path / "job.pt", log=FlushedLog(store=log_a.flushed))
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert _metrics(ref_log) == _metrics(log_a)
