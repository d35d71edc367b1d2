"""Teachers: one interface over open_clip, timm and the packaged EfficientNet-Lite0, all offline here
(random init or local files stand in for hub weights, which need a network)."""
import pytest
import torch

from core.teachers import EfficientNetLite0Teacher, OpenClipTeacher, TimmTeacher


def _frozen(t):
    return not t.training and all(not p.requires_grad for p in t.parameters())


def test_open_clip_teacher_gives_final_and_per_layer_features_on_the_student_grid(tmp_path):
    t = OpenClipTeacher("ViT-S-32", "random")
    out = t(torch.rand(2, 1, 28, 28), grid=7, all_layers=True)
    assert out.patch.shape == (2, 49, t.width)
    assert len(out.layers) == len(t.visual.transformer.resblocks)
    assert all(x.shape == (2, 49, t.width) for x in out.layers)
    assert _frozen(t) and t.input_size == 224
    t.train()
    assert not t.training                                    # a teacher never leaves eval mode

    # a local checkpoint file loads its weights (how pretrained CLIP arrives on an offline cluster)
    import open_clip
    clip = open_clip.create_model("ViT-S-32")
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": clip.state_dict()}, path)
    t2 = OpenClipTeacher("ViT-S-32", str(path))
    assert torch.equal(t2.visual.conv1.weight, clip.visual.conv1.weight)
    assert not torch.equal(t.visual.conv1.weight, clip.visual.conv1.weight)


def test_timm_teacher_loads_a_local_checkpoint(tmp_path):
    import timm
    net = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "vit_tiny.pth"
    torch.save(net.state_dict(), path)
    t = TimmTeacher("vit_tiny_patch16_224", str(path), input_size=224)
    assert torch.equal(t.net.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)
    out = t(torch.rand(2, 3, 32, 32), grid=4, all_layers=True)
    assert out.patch.shape == (2, 16, 192) and len(out.layers) == 12 and _frozen(t)


def _knn_accuracy(feats, labels):
    f = torch.nn.functional.normalize(feats, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-1)
    return (labels[sim.argmax(1)] == labels).float().mean().item()


def test_packaged_efficientnet_teacher_is_really_pretrained():
    from core.data import load_split
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


def test_teacher_runs_in_bfloat16_when_asked():
    t = EfficientNetLite0Teacher(input_size=56, feature_stage=4, dtype="bfloat16")
    out = t(torch.rand(2, 1, 28, 28), grid=7)
    assert out.patch.dtype == torch.float32 and torch.isfinite(out.patch).all()


@pytest.mark.parametrize("pretrained", ["openai", "laion2b_s34b_b88k"])
def test_hub_tags_are_recognised_without_downloading(compose, pretrained):
    from core.config import validate
    validate(compose("teacher=clip_vit_b16", f"teacher.pretrained={pretrained}"))
