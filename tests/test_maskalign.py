"""MaskAlign (core/methods/maskalign.py): Dynamic Alignment (order, W's rows, which prediction meets which
teacher layer), top-K targets and their normalisation, visible-only loss, attentive masking at its exact
inclusion probabilities, Tab. 4's equal training, config errors and exact resume. Teachers are small
random-init timm ViTs: fast, offline, real code paths. tests/test_equivalence.py checks the whole forward
(loss and gradients) against the official code's."""
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from core.config import ConfigError
from core.job import validate
from core.methods.maskalign import MaskAlign, init_align_matrix
from core.targets.normalize import normalize_features
from core.targets.teachers import TeacherRequest, TimmTeacher, build_teacher
from core.training.loop import build_model, build_optimizer, schedule
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
    kw.setdefault("teacher_request", TeacherRequest(layers=tuple(range(-K, 0)), cls=kw.get("align_cls", True),
                                                    cls_attention=kw.get("masking", "attentive") == "attentive"))
    return MaskAlign(enc, list(teacher.layer_widths[-K:]), teacher.depth, **kw)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(n, 1, IMG, IMG, generator=g)
    return imgs, (imgs - 0.5) / 0.25


# ---- Dynamic Alignment matrix W

def test_align_matrix_init_follows_the_official_code():
    # W: [K, S], row j = teacher layer T-K+j, column i = student block i (the official [T, S], last K rows)
    # student as deep as the teacher, all layers aligned: identity + 0.01 everywhere
    assert torch.equal(init_align_matrix(4, 4, 4), torch.eye(4) + 0.01)
    # same depth, top K < S: the last K rows, so teacher layer T-K+j starts on student block S-K+j
    assert torch.equal(init_align_matrix(4, 2, 4), torch.tensor([[0.01, 0.01, 1.01, 0.01], [0.01, 0.01, 0.01, 1.01]]))
    # other depths: uniform 1/S (the official fusion 'sum')
    assert torch.equal(init_align_matrix(4, 5, 8), torch.full((5, 4), 0.25))
    m = tiny_model(tiny_teacher(depth=8), depth=4, top_k=5)
    assert m.align_matrix.shape == (5, 4) and torch.equal(m.align_matrix.data, torch.full((5, 4), 0.25))


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
    assert req == TeacherRequest(layers=tuple(range(-K, 0)), cls=True)   # the default aligns [CLS]; no attention
    cfg.method.masking, cfg.method.align_cls = "attentive", False
    assert MaskAlign.teacher_request(cfg) == TeacherRequest(layers=tuple(range(-K, 0)), cls_attention=True)


@pytest.mark.parametrize("align_cls", [True, False])
def test_targets_are_the_teachers_last_k_block_outputs_layer_normed(align_cls):
    teacher = tiny_teacher(depth=6)
    m = tiny_model(teacher, top_k=3, align_cls=align_cls)
    imgs, x = batch()
    layers = m.make_targets(imgs, x, teacher)["layers"]
    assert len(layers) == 3
    for j, t in enumerate(layers):                   # target j = teacher block 6-3+j (0-based 3, 4, 5)
        ref = teacher(imgs, m.encoder.grid, TeacherRequest(layers=(3 + j,), cls=True))
        tokens = torch.cat([ref.layers_cls[0].unsqueeze(1), ref.layers[0]], 1) if align_cls else ref.layers[0]
        assert torch.allclose(t, normalize_features(tokens, "layernorm"))   # [CLS] first when aligned


def test_bn_targets_use_one_mean_and_variance_per_layer_as_the_official_code():
    """`batchnorm_global` (the official 'bn'): one scalar mean and unbiased variance over the whole
    [B, 1 + N, T] layer, [CLS] included, before the gather; `batchnorm` standardises each channel."""
    teacher = tiny_teacher()
    imgs, x = batch()
    raw = teacher(imgs, 4, TeacherRequest(layers=(-1,), cls=True))
    tokens = torch.cat([raw.layers_cls[0].unsqueeze(1), raw.layers[0]], 1)                # [B, 1 + N, T]
    t = tiny_model(teacher, top_k=1, target_norm="batchnorm_global").make_targets(imgs, x, teacher)["layers"][0]
    assert torch.allclose(t, (tokens - tokens.mean()) / (tokens.var() + 1e-6) ** 0.5, atol=1e-6)
    assert abs(t.mean().item()) < 1e-6 and abs(t.var().item() - 1) < 1e-4
    assert t.mean(dim=(0, 1)).abs().max() > 0.1      # not per channel: the channel means are left as they are
    c = tiny_model(teacher, top_k=1, target_norm="batchnorm").make_targets(imgs, x, teacher)["layers"][0]
    assert c.mean(dim=(0, 1)).abs().max() < 1e-5     # the option: every channel standardised


# ---- which prediction meets which teacher layer: order and W's rows pinned

def block_outputs(m):
    """Run m's forward with hooks on its blocks -> (loss, outputs, targets, the S raw block outputs)."""
    teacher = tiny_teacher()
    imgs, x = batch()
    targets = m.make_targets(imgs, x, teacher)
    outs = []
    hooks = [b.register_forward_hook(lambda mod, i, o: outs.append(o)) for b in m.encoder.blocks]
    m.seed(3)
    loss, out = m(x, targets)
    for h in hooks:
        h.remove()
    assert len(outs) == m.encoder.depth              # every block's hook fired, once
    return loss, out, targets, outs


def aligned_loss(preds, targets, ids_keep):
    """sum_j 1/K * 2 smooth-L1(pred_j, target_j at [CLS] + the kept patches)."""
    ids = torch.cat([torch.zeros_like(ids_keep[:, :1]), ids_keep + 1], 1)
    return sum(2 * F.smooth_l1_loss(p, torch.gather(t, 1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1])))
               for p, t in zip(preds, targets)) / len(preds)


def random_rows(m):
    with torch.no_grad():                            # every row (and column) of W different
        m.align_matrix.copy_(torch.rand(m.align_matrix.shape, generator=torch.Generator().manual_seed(5)))


def test_dynamic_alignment_mixes_raw_block_outputs_then_applies_the_head_of_each_teacher_layer():
    """The official order (default): y_hat_j = H_j(sum_i W[j, i] x_i), and y_hat_j meets teacher layer T-K+j."""
    m = tiny_model(tiny_teacher(), depth=4, top_k=3)
    assert m.align_order == "mix_then_adapt" and len(m.adaptors) == 3           # one head per teacher layer
    random_rows(m)
    loss, out, targets, x = block_outputs(m)
    expected = [m.adaptors[j](sum(m.align_matrix[j, i] * x[i] for i in range(4))) for j in range(3)]
    for j in range(3):
        assert torch.allclose(out["preds"][j], expected[j], atol=1e-6), j
    assert torch.allclose(loss, aligned_loss(expected, targets["layers"], out["ids_keep"]))


def test_papers_order_applies_one_adaptor_per_student_block_then_mixes():
    """align_order=adapt_then_mix (Eq. 1): y_hat_j = sum_i W[j, i] A_i(x_i)."""
    m = tiny_model(tiny_teacher(), depth=4, top_k=3, align_order="adapt_then_mix")
    assert len(m.adaptors) == 4                                                    # one adaptor per block
    random_rows(m)
    loss, out, targets, x = block_outputs(m)
    expected = [sum(m.align_matrix[j, i] * m.adaptors[i](x[i]) for i in range(4)) for j in range(3)]
    for j in range(3):
        assert torch.allclose(out["preds"][j], expected[j], atol=1e-6), j
    assert torch.allclose(loss, aligned_loss(expected, targets["layers"], out["ids_keep"]))


def test_the_heads_follow_each_teacher_layers_width_and_the_papers_order_needs_one_width():
    enc = lambda: ViTEncoder(IMG, PATCH, 1, 32, 2, num_heads=2)  # noqa: E731
    m = MaskAlign(enc(), [16, 24, 40], teacher_depth=6, top_k=3, masking="random", align_cls=False)
    assert [a.out_features for a in m.adaptors] == [16, 24, 40]
    with pytest.raises(ConfigError) as e:
        MaskAlign(enc(), [16, 24, 40], teacher_depth=6, top_k=3, align_order="adapt_then_mix")
    assert e.value.key == "method.align_order"


def test_layerwise_aligns_student_block_s_minus_k_plus_j_with_teacher_layer_j():
    m = tiny_model(tiny_teacher(), depth=4, top_k=3, alignment="layerwise")
    assert not hasattr(m, "align_matrix") and len(m.adaptors) == 3
    loss, out, targets, x = block_outputs(m)
    expected = [m.adaptors[j](x[1 + j]) for j in range(3)]   # block 1 + j <-> teacher layer j of the top 3
    assert torch.allclose(loss, aligned_loss(expected, targets["layers"], out["ids_keep"]))


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


def inclusion_probabilities(p: list[float], k: int) -> torch.Tensor:
    """Exact P(patch i is kept) when k patches are drawn one by one without replacement, each draw with
    probability proportional to p among those left: the sum over every ordered k-sequence of
    prod_t p_{s_t} / (1 - p_{s_1} - ... - p_{s_{t-1}})."""
    total = sum(p)
    p = [v / total for v in p]
    pi = [0.0] * len(p)
    for seq in itertools.permutations(range(len(p)), k):
        prob, used = 1.0, 0.0
        for s in seq:
            prob, used = prob * p[s] / (1 - used), used + p[s]
        for s in seq:
            pi[s] += prob
    return torch.tensor(pi)


def test_attentive_masking_keeps_each_patch_at_its_exact_inclusion_probability():
    """10,000 draws of 3 kept patches of 8, attention 1..8: every patch's keep frequency is within 5 binomial
    standard errors (sqrt(pi (1 - pi) / n) <= 0.005) of the exact probability of a successive sample
    without replacement, p ~ attention. Sampling ~ attention^2 or ~ sqrt(attention) misses by ~35 SE,
    top-k by ~100 SE, keeping the complement of a draw ~ attention by ~230 SE (computed with the same
    function), so each of those fails."""
    m = tiny_model(tiny_teacher(), mask_ratio=0.625, masking="attentive")          # int(8 * 0.375) = 3 kept
    attn = torch.linspace(1, 8, 8)
    n = 10_000
    f = keep_frequency(m, attn / attn.sum(), draws=n)
    pi = inclusion_probabilities(attn.tolist(), 3)
    se = (pi * (1 - pi) / n).sqrt()
    assert ((f - pi).abs() <= 5 * se).all(), (f, pi)
    assert torch.allclose(pi.sum(), torch.tensor(3.0))


def test_random_masking_ignores_attention():
    m = tiny_model(tiny_teacher(), mask_ratio=0.75, masking="random")
    attn = torch.linspace(1, 10, 16)
    f = keep_frequency(m, attn / attn.sum())
    # uniform: every patch kept 1/4 of the time (binomial sd ~0.0097 at n=2000; 0.05 is > 5 sd)
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
                                {"align_order": "adapt_then_mix"}, {"align_cls": False}, {"adaptor_kind": "mlp"},
                                {"target_norm": "batchnorm", "masking": "random"},
                                {"target_norm": "batchnorm_global"}, {"target_norm": "none"}])
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


# ---- defaults and sweeps

def test_defaults_are_the_official_codes(compose):
    """README of OpenDriveLab/maskalign: --mask_ratio 0.7 --mask_type attention --loss_weights top5
    --fusion_type linear --head_type linear --target_norm whiten --loss_type smoothl1; [CLS] always aligned."""
    m = compose(*TINY, "method=maskalign").method
    assert (m.mask_ratio, m.masking, m.top_k, m.alignment, m.align_order, m.adaptor, m.target_norm, m.align_cls) \
        == (0.7, "attentive", 5, "dynamic", "mix_then_adapt", "linear", "layernorm", True)


@pytest.mark.parametrize("sweep", ["maskalign_topk", "maskalign_mask_ratio", "maskalign_teacher"])
def test_the_papers_tables_3_to_5_do_not_align_cls(compose, sweep):
    from sweeps.grid import expand
    from sweeps.plan import compose_point
    cfg = compose(f"sweep={sweep}")
    for point in expand(cfg.sweep):
        assert compose_point([], point).method.align_cls is False, point.label


def test_tab4_every_mask_ratio_aligns_as_many_teacher_features_as_70_percent(compose):
    """Optimiser steps x visible share (1 - r) is the same for every point (to one step's worth), so
    points train 0.3 / (1 - r) as long as the 70% point; warm-up scales with them."""
    from sweeps.grid import expand
    from sweeps.plan import compose_point
    cfg = compose("sweep=maskalign_mask_ratio")
    budget = {}
    for point in expand(cfg.sweep):
        c = compose_point([], point)
        total, warmup, _ = schedule(c, num_train=60_000)
        assert abs(warmup - total * c.pretrain.warmup_epochs / c.pretrain.epochs) <= 1, point.label
        budget[point.label] = (total, total * (1 - c.method.mask_ratio))
    ref_steps, ref = budget["attentive 70%"]
    assert ref_steps == cfg.pretrain.epochs * (60_000 // cfg.pretrain.batch_size)   # the recipe's own length
    for label, (total, features) in budget.items():
        assert abs(features - ref) <= 1, (label, total, features, ref)
    assert budget["attentive 0%"][0] < ref_steps < budget["attentive 90%"][0]


# ---- config errors name the key

@pytest.mark.parametrize("override, key", [
    ("method.top_k=9", "method.top_k"),                       # the packaged teacher has 8 blocks
    ("method.top_k=0", "method.top_k"),
    ("method.mask_ratio=1.0", "method.mask_ratio"),
    ("method.mask_ratio=0.99", "method.mask_ratio"),          # 49 patches: none would stay visible
    ("method.masking=block", "method.masking"),
    ("method.alignment=sparse", "method.alignment"),
    ("method.align_order=eq1", "method.align_order"),
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


def test_the_papers_order_with_one_aligned_layer_builds_one_adaptor_per_student_block():
    m = tiny_model(tiny_teacher(), top_k=1, align_order="adapt_then_mix")
    assert len(m.adaptors) == 4 and all(a.out_features == 32 for a in m.adaptors)


def test_the_constructor_defaults_are_the_official_codes():
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(MaskAlign).parameters.items() if k not in
                ("encoder", "teacher_widths", "teacher_depth", "teacher_request")}
    assert defaults == dict(top_k=5, mask_ratio=0.7, masking="attentive", alignment="dynamic",
                            align_order="mix_then_adapt", adaptor_kind="linear", target_norm="layernorm",
                            align_cls=True)


def test_a_teacher_without_cls_is_refused_naming_what_needs_it(compose):
    torch.manual_seed(0)
    no_cls = TimmTeacher("vit_tiny_patch16_224", "random", input_size=IMG, dtype="float32",
                         model_kwargs=dict(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=4, num_heads=2,
                                           class_token=False, global_pool="avg"))
    cfg = compose(*TINY, "method=maskalign", "teacher=timm", "teacher.pretrained=random", "method.top_k=3")
    with pytest.raises(ConfigError, match=r"has no \[CLS\] token or attention, which MaskAlign needs here: "
                                          r"\[CLS\] \(method.align_cls\), attention \(method.masking=attentive\)") as e:
        MaskAlign.build(cfg, no_cls)
    assert e.value.key == "teacher.model"
    cfg.method.align_cls, cfg.method.masking = False, "random"     # nothing needs [CLS]: it builds
    assert isinstance(MaskAlign.build(cfg, no_cls), MaskAlign)
