"""The training plumbing against the official code's facts: the lr schedule, weight-decay groups, the
sin-cos position table, loading an official MAE checkpoint, and exporting the encoder to timm."""
import math

import numpy as np
import pytest
import torch

from core.methods.mae import MAE, from_official_state_dict
from core.training.loop import build_model, build_optimizer, lr_at, schedule
from core.vit import ViTEncoder, patchify, sincos_pos_embed, upgrade_state_dict
from tests.conftest import TINY


# ---- learning rate -------------------------------------------------------------------------------

@pytest.mark.parametrize("total, warmup", [(300 * 1251, 40 * 1251), (234, 78), (10, 0), (5, 5)])
def test_cosine_reaches_min_lr_exactly_at_the_last_step(total, warmup):
    peak, min_lr = 1.5e-4, 1e-6
    lrs = [lr_at(s, total, warmup, peak, min_lr) for s in (0, warmup, total - 1)]
    if warmup:
        assert lrs[0] == 0.0                                  # MAE: linear warm-up from 0
    if warmup < total:
        assert lrs[1] == pytest.approx(peak)                  # the peak right after warm-up
    assert lrs[2] == pytest.approx(min_lr if warmup < total - 1 else lrs[2])
    # monotone: up during warm-up, down after
    seq = [lr_at(s, total, warmup, peak, min_lr) for s in range(0, total, max(total // 500, 1))]
    peak_at = int(np.argmax(seq))
    assert all(a <= b for a, b in zip(seq[:peak_at], seq[1:peak_at + 1]))
    assert all(a >= b for a, b in zip(seq[peak_at:], seq[peak_at + 1:]))


def test_the_default_schedule_ends_at_min_lr_not_a_quarter_of_the_peak(compose):
    cfg = compose()                                           # the embedded default: 3 epochs, 1 warm-up
    total, warmup, peak = schedule(cfg, 10_000)
    last = lr_at(total - 1, total, warmup, peak, cfg.pretrain.min_lr)
    assert last == pytest.approx(cfg.pretrain.min_lr) and last < 0.01 * peak
    # halfway through the cosine the lr is halfway between peak and min (MAE's lr_sched)
    mid = warmup + (total - 1 - warmup) / 2
    assert lr_at(int(mid), total, warmup, peak, 0.0) == pytest.approx(peak / 2, rel=0.05)


# ---- weight decay --------------------------------------------------------------------------------

def test_optimizer_groups_follow_each_modules_no_weight_decay(compose):
    cfg = compose(*TINY, "method=mcm", "method.target=norm_pixel")
    model = build_model(cfg)
    opt = build_optimizer(model, cfg, lr=1e-3)
    by_param = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    wd = cfg.pretrain.weight_decay
    assert by_param[id(names["encode_channel"])] == 0 and by_param[id(names["mask_channel"])] == 0
    assert by_param[id(names["encoder.blocks.0.attn.qkv.bias"])] == 0
    assert by_param[id(names["encoder.norm.weight"])] == 0
    assert by_param[id(names["encoder.blocks.0.attn.qkv.weight"])] == wd
    assert by_param[id(names["encoder.cls_token"])] == wd         # decayed, as in the official MAE
    assert "encoder.pos_embed" not in names                        # a frozen buffer, never optimised
    # layer-decay ready: timm groups our encoder exactly as it groups its own VisionTransformer
    import timm
    from timm.optim import create_optimizer_v2

    def scales(net):
        opt = create_optimizer_v2(net, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        pname = {id(p): n for n, p in net.named_parameters()}
        return {pname[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    twin = timm.create_model("vit_base_patch16_224", pretrained=False, **model.encoder.timm_kwargs())
    ours, theirs = scales(model.encoder), scales(twin)
    theirs.pop("pos_embed")                                        # learnable in timm, a fixed buffer here
    assert ours == theirs and len(set(ours.values())) >= model.encoder.depth


# ---- position embeddings -------------------------------------------------------------------------

def _mae_table(grid, dim):
    """The official table, from the paper code's definition, in numpy: [sin w, cos w, sin h, cos h]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # w first
    table = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0)


@pytest.mark.parametrize("grid, dim", [(7, 128), (14, 768), (4, 32)])
def test_position_table_is_maes_and_timms_values_in_maes_channel_order(grid, dim):
    ours = sincos_pos_embed(grid, dim)[0]
    assert torch.allclose(ours.double(), torch.from_numpy(_mae_table(grid, dim)), atol=1e-6)
    from timm.layers import build_sincos2d_pos_embed
    q = dim // 4
    timm_t = build_sincos2d_pos_embed([grid, grid], dim=dim)                   # [sin h, sin w, cos h, cos w]
    reordered = torch.cat([timm_t[:, q:2 * q], timm_t[:, 3 * q:], timm_t[:, :q], timm_t[:, 2 * q:3 * q]], 1)
    assert torch.allclose(ours[1:], reordered, atol=1e-5)


def test_position_tables_are_saved_and_old_checkpoints_still_resume(compose):
    cfg = compose(*TINY, "method=mae", "method.target=norm_pixel")
    model = build_model(cfg)
    sd = model.state_dict()
    assert "encoder.pos_embed" in sd and "decoder_pos_embed" in sd
    # a checkpoint of the previous layout: conv named patch_embed, no tables (they were timm-ordered)
    old = {k.replace("patch_embed.proj.", "patch_embed."): v for k, v in sd.items() if not k.endswith("pos_embed")}
    restored = build_model(cfg)
    restored.load_state_dict(upgrade_state_dict(restored, old))
    assert torch.equal(restored.encoder.patch_embed.proj.weight, model.encoder.patch_embed.proj.weight)
    q = cfg.model.embed_dim // 4
    new, legacy = model.encoder.pos_embed[0, 1:], restored.encoder.pos_embed[0, 1:]
    assert torch.equal(legacy[:, :q], new[:, 2 * q:3 * q])                   # sin(h) first, as timm had it


# ---- an official MAE checkpoint ------------------------------------------------------------------

def _official_loss(sd, imgs, noise, p, mask_ratio, depth, dec_depth, heads, dec_heads):
    """MAE's pre-training loss computed independently of core/, from an official-format state dict:
    timm's VisionTransformer for the encoder and timm Blocks for the decoder."""
    import timm
    from timm.models.vision_transformer import Block
    D, C = sd["cls_token"].shape[-1], imgs.shape[1]
    enc = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=imgs.shape[-1], patch_size=p,
                            in_chans=C, embed_dim=D, depth=depth, num_heads=heads, num_classes=0)
    enc.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))})
    d = sd["decoder_embed.weight"].shape[0]
    from functools import partial
    dec = torch.nn.ModuleList(Block(d, dec_heads, 4.0, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
                              for _ in range(dec_depth))
    dec.load_state_dict({k[len("decoder_blocks."):]: v for k, v in sd.items() if k.startswith("decoder_blocks.")})
    lin = lambda name, x: x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]  # noqa: E731
    ln = lambda name, x: torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)  # noqa: E731
    with torch.no_grad():
        x = enc.patch_embed(imgs) + sd["pos_embed"][:, 1:]
        B, N, _ = x.shape
        keep = int(N * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(B, N)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(B, -1, -1), x], 1)
        x = enc.norm(enc.blocks(x))
        y = lin("decoder_embed", x)
        y_ = torch.cat([y[:, 1:], sd["mask_token"].expand(B, N + 1 - y.shape[1], -1)], 1)
        y_ = torch.gather(y_, 1, ids_restore[..., None].expand(-1, -1, d))
        y = torch.cat([y[:, :1], y_], 1) + sd["decoder_pos_embed"]
        for blk in dec:
            y = blk(y)
        pred = lin("decoder_pred", ln("decoder_norm", y))[:, 1:]
        target = patchify(imgs, p)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return ((((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()).item()


def test_an_official_mae_checkpoint_loads_and_gives_the_same_loss():
    torch.manual_seed(0)
    p, img, D, depth, heads, d, dec_depth, dec_heads = 4, 16, 32, 2, 2, 16, 2, 2
    grid = img // p
    ref = MAE(ViTEncoder(img, p, 1, D, depth, heads), p * p, 0.75, d, dec_depth, dec_heads)
    # an official-format checkpoint: the official names, random weights, the official tables
    official = {(k[len("encoder."):] if k.startswith("encoder.") else k): torch.randn_like(v) * 0.2
                for k, v in ref.state_dict().items()}
    official["pos_embed"] = torch.from_numpy(_mae_table(grid, D)).float()[None]
    official["decoder_pos_embed"] = torch.from_numpy(_mae_table(grid, d)).float()[None]
    for k in [k for k in official if k.endswith(("norm1.weight", "norm2.weight", "norm.weight"))]:
        official[k] = 1 + official[k]
    ours = MAE(ViTEncoder(img, p, 1, D, depth, heads), p * p, 0.75, d, dec_depth, dec_heads)
    ours.load_state_dict(from_official_state_dict(official))
    imgs = torch.rand(3, 1, img, img)
    ours.seed(11)
    noise = torch.rand(3, grid * grid, generator=torch.Generator().manual_seed(11))  # the same draw
    with torch.no_grad():
        loss, _ = ours(imgs, ours.make_targets(imgs, imgs))
    expected = _official_loss(official, imgs, noise, p, 0.75, depth, dec_depth, heads, dec_heads)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---- export to timm ------------------------------------------------------------------------------

def test_the_encoder_exports_to_a_timm_vit_that_gives_the_same_features(tmp_path):
    import timm
    torch.manual_seed(0)
    enc = ViTEncoder(28, 4, 1, 64, 3, 4)
    path = tmp_path / "encoder.pth"
    torch.save(enc.timm_state_dict(), path)
    enc.eval()
    x = torch.randn(2, 1, 28, 28)
    for pool in ("mean", "cls"):  # the exported model's pooled output is the evaluation's feature (evaluate.pool)
        net = timm.create_model("vit_base_patch16_224", pretrained=False, checkpoint_path=str(path),
                                **enc.timm_kwargs(pool)).eval()
        with torch.no_grad():
            tokens = net.forward_features(x)
            assert torch.allclose(net(x), enc.features(x, pool=pool), atol=1e-5), pool
            other = "cls" if pool == "mean" else "mean"
            assert not torch.allclose(net(x), enc.features(x, pool=other), atol=1e-3), pool
            assert torch.allclose(tokens[:, 1:].mean(1), enc.features(x, pool="mean"), atol=1e-5)
    assert math.isclose(float((tokens - tokens).abs().sum()), 0.0)


# ---- speed: no host-device sync per step, foreach AdamW, torch.compile switch ----------------------

def test_a_bad_loss_between_checks_stops_the_run_before_a_checkpoint_holds_it(compose, tmp_path, monkeypatch):
    """The finite check reads back only at log / checkpoint steps; a NaN at step 3 (not one of them) is
    still caught at step 4, before step 4's checkpoint: the file on disk stays the finite step-2 one."""
    import core.training.loop
    from core.training.data import load_split
    from core.methods.mcm import MCM
    from core.training.loop import NonFiniteLoss, pretrain
    from tests.test_resume import FlushedLog
    cfg = compose(*TINY, "method=mcm", "method.target=norm_pixel", "pretrain.max_steps=6",
                  "pretrain.checkpoint_every=2", "pretrain.log_every=4")
    forward, calls, checks = MCM.forward, {"n": 0}, []
    check = core.training.loop.all_finite

    def nan_at_step_3(self, x, targets):  # a fault no real input produces at a chosen step
        loss, out = forward(self, x, targets)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), out

    def counted(*a, **kw):
        checks.append(calls["n"])
        return check(*a, **kw)
    monkeypatch.setattr(MCM, "forward", nan_at_step_3)
    monkeypatch.setattr(core.training.loop, "all_finite", counted)
    with pytest.raises(NonFiniteLoss, match="first not finite at step 3"):
        pretrain(cfg, build_model(cfg), None, load_split(cfg.data, "train"), tmp_path / "c.pt", FlushedLog(),
                 torch.device("cpu"))
    assert checks == [2, 4]                                     # read back at steps 2 and 4 only, not per step
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_paced_training_sleeps_at_each_step_and_trains_the_same(compose, tmp_path, monkeypatch):
    """MIMSWEEP_PACE=train.step=S (core/faults.py; the stop tests of tests/test_local_workers.py): each step also
    sleeps S seconds, and the weights are the unpaced run's, bit for bit; a pace of another point does nothing."""
    from core.training.data import load_split
    from core.training.loop import pretrain
    from tests.test_resume import FlushedLog
    cfg = compose(*TINY, "method=mcm", "method.target=norm_pixel", "pretrain.max_steps=4")
    split = load_split(cfg.data, "train")
    runs = {}
    for name, pace in (("plain", None), ("other", "checkpoint.renamed=5"), ("paced", "train.step=0.25")):
        if pace:
            monkeypatch.setenv("MIMSWEEP_PACE", pace)
        torch.manual_seed(0)
        model = build_model(cfg)
        stats = pretrain(cfg, model, None, split, tmp_path / f"{name}.pt", FlushedLog(), torch.device("cpu"))
        runs[name] = stats["wall_s"], model.state_dict()
    assert runs["paced"][0] >= 4 * 0.25 and runs["other"][0] < 4 * 0.25 + runs["plain"][0], runs
    for name in ("other", "paced"):
        assert all(torch.equal(runs[name][1][k], v) for k, v in runs["plain"][1].items()), name


def test_adamw_is_multi_tensor_on_cpu_and_updates_as_the_loop_does(compose):
    cfg = compose(*TINY, "method=mcm", "method.target=norm_pixel")
    model = build_model(cfg)
    opt = build_optimizer(model, cfg, lr=1e-3)
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
    ref = build_model(cfg)
    loop = build_optimizer(ref, cfg, lr=1e-3)
    for g in loop.param_groups:
        g["foreach"] = False
    x = torch.rand(4, 1, 28, 28)
    for m, o in ((model, opt), (ref, loop)):
        for _ in range(2):
            m.seed(0)
            o.zero_grad()
            m(x, m.make_targets(x, x, None))[0].backward()
            o.step()
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_compile_is_on_for_cuda_and_off_for_cpu_by_default(compose):
    from core.training.loop import compile_enabled
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled(compose(), cpu) and compile_enabled(compose(), cuda)
    assert compile_enabled(compose("pretrain.compile=true"), cpu)
    assert not compile_enabled(compose("pretrain.compile=false"), cuda)
    paper = compose("preset=paper")                             # the papers' recipe: compiled bf16 on a GPU
    assert paper.pretrain.precision == "bf16" and compile_enabled(paper, cuda)
