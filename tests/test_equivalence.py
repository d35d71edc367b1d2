"""Equivalence with the official forward passes: the loss and EVERY gradient of our MAE, MCM and MaskAlign
equal those of an independent computation of the official forward, to 1e-5.

Official definitions (read, not copied; docs/methods.md has the line references):
- MAE: facebookresearch/mae `models_mae.py` (random_masking, forward_encoder, forward_decoder, forward_loss
  with norm_pix_loss) and `util/pos_embed.py` (the 2-D sin-cos table);
- MaskAlign: OpenDriveLab/maskalign `models_pretrain.py` (attention_masking, forward_encoder, get_student
  with fusion 'linear' / 'simple', get_teacher with 'whiten' / 'bn', forward_loss 'smoothl1' with
  loss_weights 'topK'); the paper's Eq. 1 order and "w/o [CLS]", which the code lacks, from the paper;
- MCM: no code is public; the paper's Sec. 3 (encode channel, mask channel, decoder, MSE on all channels),
  with the choices it leaves open made as core/methods/mcm.py documents them (its frozen target map).

How: a small model with known weights (seeded init, then every parameter moved off its init so that no
bias is 0 and no LayerNorm weight is 1), one image batch, and the mask drawn from the same generator state
the official code draws it from (the test asserts both sides drew the same mask). The reference below
is straight-line code in plain torch ops over copies of the weights (leaf tensors): it calls neither
core/ nor timm. It is written from the official definitions: timm 0.3.2's Block (which MAE and MaskAlign
import) = x + attn(LN1(x)), x + fc2(GELU(fc1(LN2(x)))), LN eps 1e-6, softmax(q k^T / sqrt(d)).
Both run in float32; 1e-5 is ~100x the rounding of these sizes (the observed gaps are ~1e-7).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from core.methods.mae import MAE
from core.methods.maskalign import MaskAlign
from core.methods.mcm import MCM
from core.targets.teachers import TeacherRequest, TimmTeacher
from core.vit import ViTEncoder

TOL = 1e-5
IMG, PATCH, WIDTH, HEADS = 16, 4, 32, 2          # a 4x4 grid of 16 patches


# ---- the official building blocks, in plain torch ops

def layer_norm(x, P, name, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], P[name + ".weight"], P[name + ".bias"], eps)


def linear(x, P, name):
    return x @ P[name + ".weight"].T + P[name + ".bias"]


def block(x, P, pre, heads):
    """timm 0.3.2's Block -> (output, attention probabilities [B, heads, L, L])."""
    B, L, D = x.shape
    d = D // heads
    qkv = linear(layer_norm(x, P, pre + "norm1"), P, pre + "attn.qkv").reshape(B, L, 3, heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(dim=-1)
    x = x + linear((attn @ v).transpose(1, 2).reshape(B, L, D), P, pre + "attn.proj")
    h = F.gelu(linear(layer_norm(x, P, pre + "norm2"), P, pre + "mlp.fc1"))
    return x + linear(h, P, pre + "mlp.fc2"), attn


def sincos_table(grid, dim):
    """MAE's util/pos_embed.py: get_2d_sincos_pos_embed(dim, grid, cls_token=True): [1, 1 + grid^2, dim],
    first half from the column index (meshgrid(w, h)[0]), second from the row, each [sin, cos]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([one_d(dim // 2, w), one_d(dim // 2, h)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float().unsqueeze(0)


def patch_embed(x, P, name, p):
    return F.conv2d(x, P[name + ".weight"], P[name + ".bias"], stride=p).flatten(2).transpose(1, 2)


def gather_tokens(x, ids):
    return torch.gather(x, 1, ids.unsqueeze(-1).repeat(1, 1, x.shape[-1]))


def patchify(imgs, p):
    """MAE's patchify: [B, 3, H, W] -> [B, L, p*p*3], (row, col, channel) inside a patch."""
    B, C, H, _ = imgs.shape
    h = H // p
    x = imgs.reshape(B, C, h, p, h, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * h, p * p * C)


def smooth_l1(a, b):
    d = (a - b).abs()
    return torch.where(d < 1.0, 0.5 * d ** 2, d - 0.5).mean()


# ---- weights and comparison

def scramble(module, seed):
    """Known weights: every parameter moved off its init (biases off 0, LayerNorm weights off 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def leaves(module, grad=True):
    """Copies of the module's parameters as fresh leaves (the reference's weights) and of its buffers."""
    P = {n: p.detach().clone().requires_grad_(grad) for n, p in module.named_parameters()}
    P.update({n: b.detach().clone() for n, b in module.named_buffers()})
    return P


def assert_same_loss_and_grads(model, loss, ref_loss, P):
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= TOL, (loss.item(), ref_loss.item())
    checked = 0
    for name, p in model.named_parameters():
        ours, ref = p.grad, P[name].grad
        if ref is None or not ref.abs().sum():        # the official forward does not use it
            assert ours is None or not ours.abs().sum(), f"{name}: a gradient where the official has none"
            continue
        assert ours is not None, f"{name}: no gradient, the official forward has one"
        err = (ours - ref).abs().max().item()
        assert err <= TOL, f"{name}: gradient differs by {err:.2e}"
        checked += 1
    assert checked >= 20                               # the comparison covered the model, not a corner of it


# ---- MAE (facebookresearch/mae models_mae.py)

def official_mae(P, x, mask_ratio, seed, norm_pix, heads, dec_heads):
    """MaskedAutoencoderViT.forward(imgs, mask_ratio) with torch.rand drawn from `seed`."""
    D = P["encoder.cls_token"].shape[-1]
    pos = sincos_table(IMG // PATCH, D)
    t = patch_embed(x, P, "encoder.patch_embed.proj", PATCH) + pos[:, 1:]
    B, L, _ = t.shape
    keep = int(L * (1 - mask_ratio))
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(seed))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    t = gather_tokens(t, ids_shuffle[:, :keep])
    mask = torch.ones(B, L)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    h = torch.cat([(P["encoder.cls_token"] + pos[:, :1]).expand(B, -1, -1), t], dim=1)
    for i in range(sum(k.endswith("norm1.weight") and k.startswith("encoder.") for k in P)):
        h = block(h, P, f"encoder.blocks.{i}.", heads)[0]
    h = layer_norm(h, P, "encoder.norm")
    # decoder
    y = linear(h, P, "decoder_embed")
    mask_tokens = P["mask_token"].repeat(B, L + 1 - y.shape[1], 1)
    y_ = gather_tokens(torch.cat([y[:, 1:], mask_tokens], dim=1), ids_restore)
    y = torch.cat([y[:, :1], y_], dim=1) + sincos_table(IMG // PATCH, y.shape[-1])
    for i in range(sum(k.startswith("decoder_blocks.") and k.endswith("norm1.weight") for k in P)):
        y = block(y, P, f"decoder_blocks.{i}.", dec_heads)[0]
    pred = linear(layer_norm(y, P, "decoder_norm"), P, "decoder_pred")[:, 1:]
    target = patchify(x, PATCH)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), mask


@pytest.mark.parametrize("target", ["norm_pixel", "pixel"])
def test_mae_matches_the_official_forward(target):
    torch.manual_seed(0)
    model = MAE(ViTEncoder(IMG, PATCH, 3, WIDTH, 2, HEADS), PATCH * PATCH * 3, mask_ratio=0.75, decoder_dim=16,
                decoder_depth=2, decoder_heads=2, target=target)
    scramble(model, 1)
    P = leaves(model)
    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    model.seed(5)
    loss, out = model(x, model.make_targets(x, x))
    ref, mask = official_mae(P, x, 0.75, 5, target == "norm_pixel", HEADS, 2)
    assert torch.equal(out["mask"], mask)
    assert_same_loss_and_grads(model, loss, ref, P)


# ---- MaskAlign (OpenDriveLab/maskalign models_pretrain.py)

def tiny_vit_teacher(depth=4):
    torch.manual_seed(3)
    t = TimmTeacher("vit_tiny_patch16_224", "random", input_size=IMG, dtype="float32",
                    model_kwargs=dict(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=depth, num_heads=HEADS))
    scramble(t.net, 4)
    return t


def official_teacher(T, imgs):
    """The frozen ViT on the intact image -> (hidden_states[1:]: every block's raw output [B, 1 + N, C],
    attentions[-1]: the last block's probabilities [B, heads, 1 + N, 1 + N]), as HF's CLIPVisionModel
    returns them with output_hidden_states / output_attentions. The input: the image normalised with the
    teacher's own mean and std (the code's denormalize -> normalize)."""
    mean = torch.tensor(T["cfg_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(T["cfg_std"]).view(1, 3, 1, 1)
    x = (imgs.expand(-1, 3, -1, -1) - mean) / std
    t = patch_embed(x, T, "patch_embed.proj", PATCH)
    h = torch.cat([T["cls_token"].expand(t.shape[0], -1, -1), t], dim=1) + T["pos_embed"]
    hidden = []
    for i in range(T["depth"]):
        h, attn = block(h, T, f"blocks.{i}.", HEADS)
        hidden.append(h)
    return hidden, attn


def official_maskalign(P, T, imgs, x, seed, *, depth, top_k, mask_ratio, masking, fusion, head, target_norm,
                       align_cls, extra):
    """MaskedAutoencoderViT.forward of the official code. `fusion`: 'linear' (W mixes the raw block
    outputs, then head j of teacher layer j), 'simple' (layer-wise: head i on block i <-> teacher layer i),
    or 'paper' (Eq. 1: sum_i W_ji A_i(x_i); not in the code). The code holds W [T, S] and T heads; only
    the last K (loss weight 1/K, the rest 0) matter: `extra` supplies the others (random, unused)."""
    hidden, attn = official_teacher(T, imgs)
    # forward_encoder
    D = P["encoder.cls_token"].shape[-1]
    pos = sincos_table(IMG // PATCH, D)
    t = patch_embed(x, P, "encoder.patch_embed.proj", PATCH) + pos[:, 1:]
    B, N, _ = t.shape
    keep = int(N * (1 - mask_ratio))
    g = torch.Generator().manual_seed(seed)
    if masking == "attentive":
        importance = attn[:, :, 0, 1:].mean(1)                        # [CLS] query row, mean over heads
        ids_shuffle = torch.multinomial(importance, N, replacement=False, generator=g)
    else:
        ids_shuffle = torch.argsort(torch.rand(B, N, generator=g), dim=1)
    ids_keep = ids_shuffle[:, :keep]
    h = torch.cat([(P["encoder.cls_token"] + pos[:, :1]).expand(B, -1, -1), gather_tokens(t, ids_keep)], dim=1)
    feats = []
    for i in range(depth):
        h = block(h, P, f"encoder.blocks.{i}.", HEADS)[0]
        feats.append(h)
    # get_student
    S, Tn, K = len(feats), len(hidden), top_k

    def apply_head(z, j):                                             # head of teacher layer j (0-based of T)
        name = f"adaptors.{j - (Tn - K)}" if j >= Tn - K else f"unused_head.{j}"
        Q = P if j >= Tn - K else extra
        if head == "linear":
            return linear(z, Q, name)
        return linear(F.gelu(linear(z, Q, name + ".0")), Q, name + ".2")

    if fusion == "linear":
        W = torch.cat([extra["unused_rows"], P["align_matrix"]])     # [T, S]
        mixed = [sum(W[a, b] * feats[b] for b in range(S)) for a in range(Tn)]
        student = [apply_head(mixed[a], a) for a in range(Tn)]
    elif fusion == "simple":                                          # S = T here
        student = [apply_head(feats[i], i) for i in range(S)]
    else:                                                             # the paper's Eq. 1
        adapted = [linear(feats[i], P, f"adaptors.{i}") if head == "linear" else
                   linear(F.gelu(linear(feats[i], P, f"adaptors.{i}.0")), P, f"adaptors.{i}.2") for i in range(S)]
        student = [None] * (Tn - K) + [sum(P["align_matrix"][j, i] * adapted[i] for i in range(S)) for j in range(K)]
    # get_teacher
    teacher = []
    for y in hidden:
        if not align_cls:                                             # not in the code: w/o [CLS]
            y = y[:, 1:]
        if target_norm == "layernorm":                                # 'whiten'
            y = F.layer_norm(y, y.shape[-1:])
        elif target_norm == "batchnorm_global":                       # 'bn'
            y = (y - y.mean()) / (y.var() + 1e-6) ** 0.5
        patches = gather_tokens(y[:, 1:] if align_cls else y, ids_keep)
        teacher.append(torch.cat([y[:, :1], patches], dim=1) if align_cls else patches)
    # forward_loss, loss_weights 'topK'
    weights = [0.0] * (len(student) - K) + [1 / K] * K
    loss = torch.tensor(0.0)
    for i, s in enumerate(student):
        if weights[i] > 0:
            loss = loss + weights[i] * 2 * smooth_l1(teacher[i], s if align_cls else s[:, 1:])
    return loss, ids_keep


VARIANTS = {   # name: (our MaskAlign kwargs, the official code's settings)
    "official default": ({}, dict(fusion="linear")),
    "bn target": (dict(target_norm="batchnorm_global"), dict(fusion="linear")),
    "mlp heads": (dict(adaptor_kind="mlp"), dict(fusion="linear", head="mlp")),
    "random masking": (dict(masking="random"), dict(fusion="linear")),
    "layer-wise": (dict(alignment="layerwise"), dict(fusion="simple")),
    "paper's Eq. 1 order": (dict(align_order="adapt_then_mix"), dict(fusion="paper")),
    "w/o [CLS]": (dict(align_cls=False), dict(fusion="linear")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_maskalign_matches_the_official_forward(variant):
    ours, official = VARIANTS[variant]
    kw = dict(top_k=3, mask_ratio=0.5, masking="attentive", alignment="dynamic", align_order="mix_then_adapt",
              adaptor_kind="linear", target_norm="layernorm", align_cls=True)
    kw.update(ours)
    teacher = tiny_vit_teacher(depth=4)
    torch.manual_seed(0)
    model = MaskAlign(ViTEncoder(IMG, PATCH, 1, WIDTH, 4, HEADS), teacher.layer_widths[-3:], teacher.depth,
                      teacher_request=TeacherRequest(layers=(-3, -2, -1), cls=kw["align_cls"],
                                                     cls_attention=kw["masking"] == "attentive"), **kw)
    scramble(model, 1)
    if kw["alignment"] == "dynamic":                      # rows of W all different: a row swap shows
        with torch.no_grad():
            model.align_matrix.copy_(torch.rand(model.align_matrix.shape, generator=torch.Generator().manual_seed(6)))
    P = leaves(model)
    T = leaves(teacher.net, grad=False)
    T.update(depth=4, cfg_mean=teacher.net.pretrained_cfg["mean"], cfg_std=teacher.net.pretrained_cfg["std"])
    g = torch.Generator().manual_seed(7)
    extra = {"unused_rows": torch.rand(1, 4, generator=g),
             "unused_head.0.weight": torch.randn(WIDTH, WIDTH, generator=g), "unused_head.0.bias": torch.zeros(WIDTH),
             "unused_head.0.0.weight": torch.randn(WIDTH, WIDTH, generator=g), "unused_head.0.0.bias": torch.zeros(WIDTH),
             "unused_head.0.2.weight": torch.randn(WIDTH, WIDTH, generator=g), "unused_head.0.2.bias": torch.zeros(WIDTH)}
    imgs = torch.rand(3, 1, IMG, IMG, generator=torch.Generator().manual_seed(2))
    x = (imgs - 0.3) / 0.3
    model.seed(11)
    loss, out = model(x, model.make_targets(imgs, x, teacher))
    ref, ids_keep = official_maskalign(P, T, imgs, x, 11, depth=4, top_k=3, mask_ratio=0.5, masking=kw["masking"],
                                       head=official.get("head", "linear"), target_norm=kw["target_norm"],
                                       align_cls=kw["align_cls"], fusion=official["fusion"], extra=extra)
    assert torch.equal(out["ids_keep"], ids_keep)       # the same patches, in the same order
    assert_same_loss_and_grads(model, loss, ref, P)


# ---- MCM (the paper's Sec. 3; no official code)

def paper_mcm(P, x, target, seed, *, num_masked, masking, recon_range, heads, widen):
    """MCM's forward as the paper describes it, with core/methods/mcm.py's documented choices: masked
    channels of every patch embedding <- encode channel e (before the position embedding), ViT encoder
    (final norm), masked channels of its output <- mask channel m, MAE-style decoder -> z, MSE against
    the target through the frozen map, over all channels (or the masked ones)."""
    t = patch_embed(x, P, "encoder.patch_embed.proj", PATCH)
    B, N, D = t.shape
    g = torch.Generator().manual_seed(seed)
    if masking == "random":
        ids = torch.argsort(torch.rand(B, N, D, generator=g), dim=-1)[..., :num_masked]
    else:
        start = torch.randint(0, D, (B, N, 1), generator=g)
        ids = (start + torch.arange(num_masked)) % D
    mask = torch.zeros(B, N, D, dtype=torch.bool).scatter_(-1, ids, True)
    pos = sincos_table(IMG // PATCH, D)
    t = torch.where(mask, P["encode_channel"], t) + pos[:, 1:]
    h = torch.cat([(P["encoder.cls_token"] + pos[:, :1]).expand(B, -1, -1), t], dim=1)
    for i in range(sum(k.startswith("encoder.blocks.") and k.endswith("norm1.weight") for k in P)):
        h = block(h, P, f"encoder.blocks.{i}.", heads)[0]
    f = layer_norm(h, P, "encoder.norm")
    y = torch.cat([f[:, :1], torch.where(mask, P["mask_channel"], f[:, 1:])], dim=1)
    y = linear(y, P, "decoder_embed") + sincos_table(IMG // PATCH, P["decoder_embed.weight"].shape[0])
    for i in range(sum(k.startswith("decoder_blocks.") and k.endswith("norm1.weight") for k in P)):
        y = block(y, P, f"decoder_blocks.{i}.", heads)[0]
    z = linear(layer_norm(y, P, "decoder_norm"), P, "decoder_pred")[:, 1:]
    err = (z - target @ P["target_proj"]) ** 2
    if recon_range == "masked":
        m = mask.repeat(1, 1, widen)
        return (err * m).sum() / m.sum(), mask
    return err.mean(), mask


@pytest.mark.parametrize("masking, recon_range, target_width", [
    ("random", "all", WIDTH), ("block", "masked", WIDTH), ("random", "masked", 48)])
def test_mcm_matches_the_papers_forward(masking, recon_range, target_width):
    torch.manual_seed(0)
    model = MCM(ViTEncoder(IMG, PATCH, 3, WIDTH, 2, HEADS), target_width, mask_ratio=0.75, masking=masking,
                recon_range=recon_range, decoder_depth=2, target="teacher")
    scramble(model, 1)
    P = leaves(model)
    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    target = F.layer_norm(torch.randn(3, 16, target_width, generator=torch.Generator().manual_seed(3)),
                          (target_width,))
    model.seed(5)
    loss, out = model(x, target)
    ref, mask = paper_mcm(P, x, target, 5, num_masked=24, masking=masking, recon_range=recon_range, heads=HEADS,
                          widen=math.ceil(target_width / WIDTH))
    assert torch.equal(out["mask"], mask)
    assert_same_loss_and_grads(model, loss, ref, P)
