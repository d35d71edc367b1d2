"""MAE and MCM units: masking, the encode/mask channel swap, losses, and the collapse-free target."""
import pytest
import torch

from core.methods.mae import MAE, random_patch_masking
from core.methods.mcm import MCM
from core.vit import ViTEncoder, patchify


def encoder(dim=32, depth=1, img=16, patch=4, chans=1):
    torch.manual_seed(0)
    return ViTEncoder(img, patch, chans, dim, depth, num_heads=2)


@pytest.mark.parametrize("masking", ["random", "block"])
@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.75, 0.9])
def test_mcm_masks_the_same_number_of_channels_in_every_patch(masking, ratio):
    m = MCM(encoder(dim=40), target_dim=16, mask_ratio=ratio, masking=masking)
    mask = m.channel_masking(3, 16, 40, "cpu")
    assert mask.shape == (3, 16, 40)
    assert (mask.sum(-1) == round(40 * ratio)).all()
    # different patches get different channels (random draws per patch)
    assert not (mask[:, :1] == mask).all()


def test_mcm_block_masking_is_one_contiguous_cyclic_run():
    m = MCM(encoder(dim=40), target_dim=16, mask_ratio=0.25, masking="block")
    mask = m.channel_masking(2, 16, 40, "cpu")
    # a cyclic run has exactly one False->True transition around the ring
    starts = (mask & ~mask.roll(1, dims=-1)).sum(-1)
    assert (starts == 1).all()


def _capture_first_block_input(m):
    seen = {}
    h = m.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    return seen, h


def test_mcm_fills_masked_channels_with_the_encode_channel_and_swaps_in_the_mask_channel():
    m = MCM(encoder(), target_dim=16, mask_ratio=0.75)
    imgs = torch.rand(2, 1, 16, 16)
    seen, h = _capture_first_block_input(m)
    torch.manual_seed(1)
    f, mask = m.forward_encoder(imgs)
    h.remove()
    x = seen["x"][:, 1:] - m.encoder.pos_embed[:, 1:]           # encoder input minus positions
    enc = m.encode_channel.expand_as(x)
    assert torch.allclose(x[mask], enc[mask], atol=1e-6)
    raw = m.encoder.embed(imgs)
    assert torch.allclose(x[~mask], raw[~mask], atol=1e-6)

    got = {}
    h = m.decoder_embed.register_forward_pre_hook(lambda mod, args: got.setdefault("x", args[0]))
    m.forward_decoder(f, mask)
    h.remove()
    dec_in = got["x"][:, 1:]
    assert torch.allclose(dec_in[mask], m.mask_channel.expand_as(dec_in)[mask])
    assert torch.allclose(dec_in[~mask], f[:, 1:][~mask])      # visible channels pass through
    assert not torch.allclose(m.mask_channel, m.encode_channel)  # independent parameters


def test_mcm_without_forward_zero_fills_and_never_trains_the_encode_channel():
    m = MCM(encoder(), target_dim=16, encode_channel_forward=False)
    imgs = torch.rand(2, 1, 16, 16)
    seen, h = _capture_first_block_input(m)
    loss, out = m(imgs, torch.randn(2, 16, 16))
    h.remove()
    x = seen["x"][:, 1:] - m.encoder.pos_embed[:, 1:]
    assert torch.all(x[out["mask"]] == 0)
    loss.backward()
    assert m.encode_channel.grad is None
    assert m.mask_channel.grad is not None and m.mask_channel.grad.abs().sum() > 0


def test_mcm_reconstruction_range():
    m = MCM(encoder(), target_dim=32, recon_range="masked")
    z, t = torch.zeros(1, 16, 32), torch.zeros(1, 16, 32)
    mask = m.channel_masking(1, 16, 32, "cpu")
    t_vis_off = t.clone()
    t_vis_off[~mask] = 5.0                      # error only on visible channels
    assert m.forward_loss(z, t_vis_off, mask) == 0
    t_mask_off = t.clone()
    t_mask_off[mask] = 2.0
    assert m.forward_loss(z, t_mask_off, mask) == pytest.approx(4.0)
    m.recon_range = "all"
    assert m.forward_loss(z, t_vis_off, mask) == pytest.approx(25.0 * (~mask).float().mean().item())


def test_mae_keeps_the_right_patches_and_restores_their_order():
    x = torch.arange(2 * 16 * 3, dtype=torch.float).view(2, 16, 3)
    x_vis, mask, ids_restore = random_patch_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert x_vis.shape == (2, 4, 3)
    assert (mask.sum(1) == 12).all()
    for b in range(2):
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept[:, 0]).values, torch.sort(x_vis[b][:, 0]).values)
    # unshuffle: visible first then masked, gathered by ids_restore, is the original order
    filler = torch.full((2, 12, 3), -1.0)
    restored = torch.gather(torch.cat([x_vis, filler], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(restored[mask == 0], x[mask == 0])


def test_mae_loss_counts_only_masked_patches():
    pred, target = torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    target[0, 1] = 10.0                         # visible patch: ignored
    assert MAE.forward_loss(pred, target, mask) == 0
    target[0, 0] = 2.0
    assert MAE.forward_loss(pred, target, mask) == pytest.approx(2.0)  # (4 + 0) / 2 masked patches


def test_patchify_matches_the_patch_embedding_order():
    imgs = torch.rand(1, 1, 8, 8)
    p = patchify(imgs, 4)
    assert p.shape == (1, 4, 16)
    assert torch.equal(p[0, 1], imgs[0, 0, :4, 4:8].reshape(-1))  # second patch = top-right block


def _train(model, params, target_fn, steps=60):
    opt = torch.optim.Adam(params, lr=1e-2)
    imgs = torch.rand(4, 1, 16, 16)
    for _ in range(steps):
        loss, _ = model(imgs, target_fn())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_a_learnable_target_projection_collapses_but_mcm_s_frozen_one_cannot():
    torch.manual_seed(0)
    teacher_feats = torch.randn(4, 16, 24)

    # What the paper's wording invites: a target-side Linear trained with the model. The loss can be
    # driven down by shrinking the targets -- the collapse this project avoids.
    m = MCM(encoder(), target_dim=24)
    learnable = torch.nn.Linear(24, 32, bias=False)
    m.project_target = lambda t: learnable(t)
    before = learnable(teacher_feats).norm().item()
    _train(m, list(m.parameters()) + list(learnable.parameters()), lambda: teacher_feats)
    assert learnable(teacher_feats).norm().item() < 0.5 * before

    # MCM as built: the projection is a buffer, no optimiser sees it, the target keeps its scale.
    m = MCM(encoder(), target_dim=24)
    assert "target_proj" not in dict(m.named_parameters())
    proj_before = m.target_proj.clone()
    target_before = m.project_target(teacher_feats)
    _train(m, m.parameters(), lambda: teacher_feats)
    assert torch.equal(m.target_proj, proj_before)
    assert torch.equal(m.project_target(teacher_feats), target_before)


def test_target_projection_is_identity_when_widths_match_and_isometric_when_widening():
    m = MCM(encoder(dim=32), target_dim=32)
    assert torch.equal(m.target_proj, torch.eye(32))
    m = MCM(encoder(dim=32), target_dim=16)     # 16 -> 32 channels: norms preserved
    t = torch.randn(2, 16, 16)
    assert torch.allclose(m.project_target(t).norm(dim=-1), t.norm(dim=-1), atol=1e-4)


def test_mae_decoder_puts_mask_tokens_at_the_dropped_positions_and_learns_only_from_them():
    m = MAE(encoder(), target_dim=16, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.rand(2, 1, 16, 16)
    m.seed(3)
    latent, mask, ids_restore = m.forward_encoder(x)
    assert latent.shape == (2, 1 + 4, 32) and mask.shape == (2, 16)
    seen = {}
    h = m.decoder_blocks[0].register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0]))
    pred = m.forward_decoder(latent, ids_restore)
    h.remove()
    assert pred.shape == (2, 16, 16)
    dec_in = seen["x"][:, 1:] - m.decoder_pos_embed[:, 1:]               # decoder input minus positions
    masked, visible = mask.bool(), ~mask.bool()
    assert torch.allclose(dec_in[masked], m.mask_token[0].expand(int(masked.sum()), -1), atol=1e-6)
    # the visible positions carry the encoder's tokens, each put back where its patch came from
    emb = m.decoder_embed(latent)[:, 1:]                                  # [B, K, d] in keep order
    kept_at = torch.argsort(ids_restore, dim=1)[:, :4]                    # ids_shuffle[:, :K]
    for b in range(2):
        assert torch.allclose(dec_in[b][kept_at[b]], emb[b], atol=1e-6)
        assert visible[b][kept_at[b]].all()
    # the loss reads only masked predictions: visible ones get no gradient
    pred = pred.detach().requires_grad_(True)
    MAE.forward_loss(pred, torch.randn(2, 16, 16), mask).backward()
    assert pred.grad[visible].abs().sum() == 0 and pred.grad[masked].abs().sum() > 0


def test_mae_draws_masks_from_its_own_generator_reproducibly():
    m = MAE(encoder(), target_dim=16, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.rand(2, 1, 16, 16)
    m.seed(5)
    _, a, _ = m.forward_encoder(x)
    torch.manual_seed(123)                           # the global RNG does not move the masks
    m.seed(5)
    _, b, _ = m.forward_encoder(x)
    m.seed(6)
    _, c, _ = m.forward_encoder(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mcm_predicts_in_the_teacher_width_when_the_teacher_is_wider():
    # ViT-S (384) with a CLIP-B (768) teacher, scaled down: D = 32, T = 64 (k = 2). Nothing of the target is lost.
    m = MCM(encoder(dim=32), target_dim=64)
    t = torch.randn(2, 16, 64)
    projected = m.project_target(t)
    assert projected.shape == (2, 16, 64) and torch.equal(projected, t)
    loss, out = m(torch.rand(2, 1, 16, 16), t)
    assert out["pred"].shape == (2, 16, 64) and torch.isfinite(loss)
    # T = 80 > D = 32: P = 96, an isometric map (norms kept), and "masked channels" = each masked encoder
    # channel's 3 prediction channels
    m = MCM(encoder(dim=32), target_dim=80, recon_range="masked")
    t = torch.randn(2, 16, 80)
    assert torch.allclose(m.project_target(t).norm(dim=-1), t.norm(dim=-1), atol=1e-4)
    z, target = torch.zeros(1, 16, 96), torch.zeros(1, 16, 96)
    mask = m.channel_masking(1, 16, 32, "cpu")
    target[mask.repeat(1, 1, 3)] = 2.0                     # error only on the channels masked channels own
    assert m.forward_loss(z, target, mask) == pytest.approx(4.0)
    assert m.forward_loss(z, torch.where(mask.repeat(1, 1, 3), 0.0, 5.0), mask) == 0
