"""SemanticMIM: [IMG] never sees [MASK], the reconstruction reads each layer's own proxies, [MASK] queries carry
their positions, loss and gradients equal an independent computation of the official forward (both variants and
the baseline), the evaluation features, the weight-decay sets, the proxies' export, and the paper's cost model
(App. C) against FlopCounterMode."""
import math

import pytest
import torch

from core.methods.semanticmim import CrossBlock, SemanticMIM, block_cost
from core.vit import ViTEncoder


def model(num_proxies=4, target_dim=9, depth=2):
    torch.manual_seed(0)
    enc = ViTEncoder(16, 4, 1, 32, depth, 2, extra_tokens=max(num_proxies - 1, 0))
    return SemanticMIM(enc, target_dim, num_proxies=num_proxies, mask_ratio=0.5).eval()


def _record(m):
    """Outputs of every compression block ([IMG]+[PROXY]) and reconstruction block ([MASK])."""
    seen = {"enc": [], "rec": []}
    hooks = [b.register_forward_hook(lambda mod, a, o: seen["enc"].append(o.clone())) for b in m.encoder.blocks]
    hooks += [b.register_forward_hook(lambda mod, a, o: seen["rec"].append(o.clone())) for b in m.recon_blocks]
    return seen, hooks


def test_img_and_proxy_tokens_never_see_the_mask_tokens():
    m = model()
    x = torch.randn(2, 1, 16, 16)
    t = torch.randn(2, 16, 9)

    def run(images):
        seen, hooks = _record(m)
        m.seed(7)                                                   # the same masks every time
        with torch.no_grad():
            _, out = m(images, t)
        for h in hooks:
            h.remove()
        return seen, out

    base, out = run(x)
    assert len(base["enc"]) == len(base["rec"]) == 2                # the hooks saw every block of both stacks
    # 1. the content of masked patches never reaches any token: add 5 to every masked patch's pixels
    x2 = x.clone()
    for b in range(2):
        for i in out["ids_masked"][b].tolist():
            r, c = divmod(i, 4)
            x2[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5.0
    same, _ = run(x2)
    assert all(torch.equal(a, b) for a, b in zip(base["enc"] + base["rec"], same["enc"] + same["rec"]))
    # 2. a different [MASK] input changes the [MASK] outputs and no [IMG]/[PROXY] output
    with torch.no_grad():
        m.mask_token.add_(torch.randn_like(m.mask_token))
    moved, _ = run(x)
    assert all(torch.equal(a, b) for a, b in zip(base["enc"], moved["enc"]))
    assert not any(torch.equal(a, b) for a, b in zip(base["rec"], moved["rec"]))


def test_proxies_feed_the_reconstruction_and_get_gradients():
    m = model().train()
    x = torch.randn(2, 1, 16, 16)
    m.seed(1)
    loss, out = m(x, torch.randn(2, 16, 9))
    loss.backward()
    assert out["pred"].shape == (2, 8, 9)                                   # L2 = 8 of 16 patches
    assert m.encoder.reg_token.grad.abs().sum() > 0 and m.encoder.cls_token.grad.abs().sum() > 0
    assert m.encoder.norm.weight.grad is None and "encoder.norm.weight" in m.unused_parameters()


def test_cross_block_is_textbook_cross_attention():
    torch.manual_seed(0)
    blk = CrossBlock(16, 2).eval()
    q_in, ctx = torch.randn(3, 5, 16), torch.randn(3, 9, 16)
    out = blk(q_in, ctx)
    qn, kn = blk.norm1(q_in), blk.norm1(ctx)
    q = blk.q(qn).view(3, 5, 2, 8).transpose(1, 2)
    k, v = (t.view(3, 9, 2, 8).transpose(1, 2) for t in blk.kv(kn).chunk(2, -1))
    attn = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)
    y = q_in + blk.proj((attn @ v).transpose(1, 2).reshape(3, 5, 16))
    assert torch.allclose(out, y + blk.mlp(blk.norm2(y)), atol=1e-5)


def test_vanilla_baseline_runs_the_encoder_over_mask_tokens():
    m = model(num_proxies=0)
    assert not hasattr(m, "recon_blocks") and m.encoder.num_prefix == 1
    seen = {}
    h = m.encoder.blocks[0].register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0]))
    m.seed(3)
    loss, out = m(torch.randn(2, 1, 16, 16), torch.randn(2, 16, 9))
    h.remove()
    assert seen["x"].shape == (2, 17, 32)                                   # [CLS] + every patch
    ids = out["ids_masked"][0]
    x_in = seen["x"][0, 1:] - m.encoder.pos_embed[0, 1:]
    assert torch.allclose(x_in[ids], m.mask_token[0].expand(len(ids), -1), atol=1e-6)


def test_proxies_export_to_timm_as_register_tokens(tmp_path):
    import timm
    m = model(num_proxies=4)
    enc = m.encoder
    path = tmp_path / "enc.pth"
    torch.save(enc.timm_state_dict(), path)
    net = timm.create_model("vit_base_patch16_224", pretrained=False, checkpoint_path=str(path), **enc.timm_kwargs()).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net.forward_features(x), enc(x), atol=1e-5)
        assert torch.allclose(net(x), enc.features(x, pool="mean"), atol=1e-5)   # the proxies stay out of the pool


def test_paper_cost_model_claims_and_what_the_counter_measures():
    D, N = 768, 196
    vanilla = block_cost(1 + N, 0, 0, D)
    train8, train11 = block_cost(78, 8, 118, D), block_cost(78, 11, 118, D)
    assert 100 * (train8 / vanilla - 1) == pytest.approx(-2.8, abs=0.05)        # the paper's -2.8 %
    assert 100 * (block_cost(N + 8, 0, 0, D) / vanilla - 1) == pytest.approx(3.7, abs=0.05)  # inference +3.7 %
    # the printed formula does not break even at 11 proxies (the paper says it does): -1.1 %
    assert 100 * (train11 / vanilla - 1) == pytest.approx(-1.13, abs=0.05)

    from core.evaluation.flops import block_flops
    torch.manual_seed(0)
    for L1 in (0, 3):
        enc = ViTEncoder(32, 4, 1, 64, 2, 4, extra_tokens=max(L1 - 1, 0))
        m = SemanticMIM(enc, 9, num_proxies=L1, mask_ratio=0.5).eval()
        x, t = torch.randn(1, 1, 32, 32), torch.randn(1, 64, 9)
        measured = block_flops(lambda: m(x, t))
        L0 = L2 = 32
        if L1 == 0:   # a plain block: the counter and the formula agree exactly
            assert measured == 2 * 2 * block_cost(1 + 64, 0, 0, 64)
        else:         # cross-attention as built (q on L2, k/v on L1 + L2, out proj): (L2 + L1) D^2 more
            assert measured == 2 * 2 * (block_cost(L0, L1, L2, 64) + (L2 + L1) * 64 ** 2)


# ---- the official forward, written independently from its definition (yyk-wew/SemanticMIM, mmpretrain-based;
# docs/methods.md): per layer i, [PROXY]+[IMG] <- self-attention block i; [MASK] <- cross block i over
# ([PROXY] just computed by block i, [MASK]); one LayerNorm serves a block's queries and keys/values; the final
# norm and a linear head on [MASK]; MSE (HOG) or cross-entropy (tokens) averaged over the masked patches.
# The baseline: one sequence [CLS, visible, MASK] (raster order each) through the encoder, its final norm, head.
# Every operation by hand (no torch.nn.functional), reading the model's parameters by name.

def _ln(P, name, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * P[f"{name}.weight"] + P[f"{name}.bias"]


def _linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def _qkv(P, name, cross):
    """(Wq, Wk, Wv, bq, bk, bv) of block `name`: timm's fused qkv (self) or q / kv linears (cross); BEiT's
    q_bias / v_bias with no k bias; a missing bias is 0."""
    D = P[f"{name}.norm1.weight"].shape[0]
    zero = torch.zeros(D, dtype=P[f"{name}.norm1.weight"].dtype)
    if cross:
        wq, (wk, wv) = P[f"{name}.q.weight"], P[f"{name}.kv.weight"].chunk(2)
        bq = P.get(f"{name}.q.bias", zero)
        bk, bv = P[f"{name}.kv.bias"].chunk(2) if f"{name}.kv.bias" in P else (zero, P.get(f"{name}.v_bias", zero))
        return wq, wk, wv, bq, bk, bv
    wq, wk, wv = P[f"{name}.attn.qkv.weight"].chunk(3)
    if f"{name}.attn.qkv.bias" in P:
        return (wq, wk, wv, *P[f"{name}.attn.qkv.bias"].chunk(3))
    return wq, wk, wv, P.get(f"{name}.attn.qkv.q_bias", zero), zero, P.get(f"{name}.attn.qkv.v_bias", zero)


def _block(P, name, q_in, kv_in, heads, cross):
    """q = q + g1 * attn(LN1(q), LN1(kv)); q = q + g2 * FFN(LN2(q))."""
    wq, wk, wv, bq, bk, bv = _qkv(P, name, cross)
    proj = f"{name}.proj" if cross else f"{name}.attn.proj"
    B, Lq, D = q_in.shape
    d = D // heads
    hq, hkv = _ln(P, f"{name}.norm1", q_in), _ln(P, f"{name}.norm1", kv_in)
    split = lambda t: t.reshape(B, t.shape[1], heads, d).permute(0, 2, 1, 3)           # noqa: E731
    q, k, v = split(_linear(hq, wq, bq)), split(_linear(hkv, wk, bk)), split(_linear(hkv, wv, bv))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    a = torch.exp(logits - logits.amax(-1, keepdim=True))
    a = a / a.sum(-1, keepdim=True)
    o = _linear((a @ v).permute(0, 2, 1, 3).reshape(B, Lq, D), P[f"{proj}.weight"], P[f"{proj}.bias"])
    x = q_in + P.get(f"{name}.ls1.gamma", 1.0) * o
    h = _linear(_ln(P, f"{name}.norm2", x), P[f"{name}.mlp.fc1.weight"], P[f"{name}.mlp.fc1.bias"])
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))                                   # GELU (exact)
    h = _linear(h, P[f"{name}.mlp.fc2.weight"], P[f"{name}.mlp.fc2.bias"])
    return x + P.get(f"{name}.ls2.gamma", 1.0) * h


def official_loss(P, imgs, targets, masked, K, depth, heads, p, tokens):
    """The official pre-training loss. masked: [B, N] bool; K proxies (0 = the baseline);
    -> (loss, predictions of the masked patches in raster order [B, L2, T])."""
    B, C, H, W = imgs.shape
    g = H // p
    w = P["encoder.patch_embed.proj.weight"]
    D = w.shape[0]
    patches = imgs.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    x = _linear(patches, w.reshape(D, -1), P["encoder.patch_embed.proj.bias"])        # [B, N, D]
    cls = P["encoder.cls_token"] + P["encoder.pos_embed"][:, :1]
    if K > 1:
        cls = torch.cat([cls, P["encoder.reg_token"] + P["encoder.reg_pos"]], dim=1)  # the K proxies
    pos = P["encoder.pos_embed"][0, 1:]
    preds, loss_terms = [], []
    for b in range(B):                                          # one image at a time: raster order, no gathers
        vis, msk = (~masked[b]).nonzero()[:, 0], masked[b].nonzero()[:, 0]
        img_tok = (x[b] + pos)[vis][None]
        mask_tok = (P["mask_token"][0] + pos[msk])[None]
        if K:
            s = torch.cat([cls, img_tok], dim=1)
            m = mask_tok
            for i in range(depth):
                s = _block(P, f"encoder.blocks.{i}", s, s, heads, cross=False)
                ctx = torch.cat([s[:, :K], m], dim=1)
                m = _block(P, f"recon_blocks.{i}", m, ctx, heads, cross=True)
            out = _ln(P, "recon_norm", m)
        else:
            s = torch.cat([P["encoder.cls_token"] + P["encoder.pos_embed"][:, :1], img_tok, mask_tok], dim=1)
            for i in range(depth):
                s = _block(P, f"encoder.blocks.{i}", s, s, heads, cross=False)
            out = _ln(P, "encoder.norm", s[:, 1 + len(vis):])
        pred = _linear(out, P["head.weight"], P["head.bias"])[0]                       # [L2, T]
        preds.append(pred)
        if tokens:
            logp = pred - torch.log(torch.exp(pred - pred.amax(-1, keepdim=True)).sum(-1, keepdim=True)) \
                - pred.amax(-1, keepdim=True)
            loss_terms.append(-logp[torch.arange(len(msk)), targets[b, msk]])
        else:
            loss_terms.append(((pred - targets[b, msk]) ** 2).mean(-1))
    return torch.cat(loss_terms).mean(), torch.stack(preds)


VARIANTS = {  # the encoder options of each official variant (sweeps/conf/method/*.yaml)
    "maskfeat": dict(pos_embed="learnable", qkv_bias="all", layer_scale=None, init="trunc_normal"),
    "beit": dict(pos_embed="learnable", qkv_bias="qv", layer_scale=0.1, init="beit", init_rescale=True),
}


def official_model(variant, K, depth=3, mask_ratio=0.6):
    """A small model of the variant with every parameter set to known non-trivial values (biases, q/v biases,
    layer scales, norms: none left at an init value that could hide a term)."""
    torch.manual_seed(0)
    enc = ViTEncoder(32, 8, 3, 32, depth, 4, extra_tokens=max(K - 1, 0), **VARIANTS[variant])
    tokens = variant == "beit"
    m = SemanticMIM(enc, 11 if tokens else 108, num_proxies=K, mask_ratio=mask_ratio,
                    target="tokens" if tokens else "hog", hog_cell_size=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
            prm.copy_(base + 0.3 * torch.randn(prm.shape, generator=g))
    return m.double().train()   # float64: what is left of a difference is the computation, not the rounding


@pytest.mark.parametrize("variant,K", [("maskfeat", 4), ("beit", 3), ("maskfeat", 1), ("maskfeat", 0), ("beit", 0)])
def test_loss_and_gradients_equal_the_official_forward(variant, K):
    from core.targets.hog import hog_patch_targets
    m = official_model(variant, K)
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(2, 3, 32, 32, generator=g)
    x = ((imgs - 0.45) / 0.25).double()
    targets = (torch.randint(0, 11, (2, 16), generator=g) if variant == "beit"
               else hog_patch_targets(imgs, 8, 4).double())                                 # [B, 16, 108]: the real target
    m.seed(5)
    loss, out = m(x, targets)
    loss.backward()
    ids = out["ids_masked"]                                                           # [B, L2], the model's order
    assert ids.shape == (2, math.ceil(16 * 0.6))                                     # ceil(N r) masked, as the official
    masked = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, ids, True)
    P = {n: prm.detach().clone().requires_grad_() for n, prm in m.named_parameters()}
    ref_loss, ref_pred = official_loss(P, x, targets, masked, K, 3, 4, 8, tokens=variant == "beit")
    ref_loss.backward()
    order = ids.argsort(dim=1)                                                        # the model's rows in raster order
    pred = torch.gather(out["pred"], 1, order.unsqueeze(-1).expand(-1, -1, out["pred"].shape[-1]))
    assert (pred - ref_pred).abs().max() <= 1e-5
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    checked = 0
    for name, prm in m.named_parameters():
        ours = prm.grad if prm.grad is not None else torch.zeros_like(prm)
        ref = P[name].grad if P[name].grad is not None else torch.zeros_like(prm)
        assert (ours - ref).abs().max() <= 1e-5, name
        checked += bool(ref.abs().sum() > 0)
    # not vacuous: every parameter the official forward uses has a gradient (only the unused final norm has none)
    unused = {"encoder.norm.weight", "encoder.norm.bias"} if K else set()
    assert checked == len(P) - len(unused)


def _proxy_run(m, x, t, seed=7):
    """-> (outputs of the compression blocks, (queries, context) and outputs of each reconstruction block,
    the reconstruction norm's input and the predictions), with hooks that must fire once a block."""
    seen = {"enc": [], "rec_in": [], "rec": [], "norm_in": []}
    hooks = [b.register_forward_hook(lambda mod, a, o: seen["enc"].append(o.clone())) for b in m.encoder.blocks]

    def rec_hook(mod, args, output):                          # returns None: the block's output stays as it is
        seen["rec_in"].append(tuple(a.clone() for a in args))
        seen["rec"].append(output.clone())
    hooks += [b.register_forward_hook(rec_hook) for b in m.recon_blocks]
    hooks.append(m.recon_norm.register_forward_pre_hook(lambda mod, a: seen["norm_in"].append(a[0].clone())))
    m.seed(seed)
    try:
        with torch.no_grad():
            _, out = m(x, t)
    finally:
        for h in hooks:
            h.remove()
    depth = len(m.encoder.blocks)
    assert len(seen["enc"]) == len(seen["rec"]) == len(seen["rec_in"]) == depth and len(seen["norm_in"]) == 1
    return seen, out


def test_reconstruction_reads_exactly_this_layers_proxies_and_the_mask_tokens():
    m = model(num_proxies=4, depth=3)
    x, t = torch.randn(2, 1, 16, 16), torch.randn(2, 16, 9)
    seen, out = _proxy_run(m, x, t)
    P = m.encoder.num_prefix
    for i in range(3):
        queries, context = seen["rec_in"][i]
        assert torch.equal(context[:, :P], seen["enc"][i][:, :P])                    # block i's new proxies
        assert not torch.equal(context[:, :P], (seen["enc"][i - 1] if i else seen["enc"][1])[:, :P])
        assert torch.equal(context[:, P:], queries)                                  # and the [MASK] tokens, nothing else
        assert context.shape[1] == P + 8
        if i:
            assert torch.equal(queries, seen["rec"][i - 1])                          # the previous [MASK] outputs
    # the head reads the last [MASK] outputs through the reconstruction norm
    assert torch.equal(seen["norm_in"][0], seen["rec"][-1])
    assert torch.allclose(out["pred"], m.head(m.recon_norm(seen["rec"][-1])), atol=1e-6)
    assert not torch.allclose(out["pred"], m.head(seen["rec"][-1]), atol=1e-3)


def test_visible_pixels_reach_the_mask_predictions_through_the_proxies():
    m = model(num_proxies=4)
    x, t = torch.randn(2, 1, 16, 16), torch.randn(2, 16, 9)
    base, out = _proxy_run(m, x, t)
    x2 = x.clone()
    b, i = 0, int(torch.tensor([j for j in range(16) if j not in out["ids_masked"][0].tolist()])[0])
    r, c = divmod(i, 4)
    x2[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += torch.randn(4, 4)                              # one visible patch of image 0
    moved, out2 = _proxy_run(m, x2, t)
    assert not torch.allclose(out["pred"][0], out2["pred"][0], atol=1e-4)           # its [MASK] predictions move
    assert torch.equal(out["pred"][1], out2["pred"][1])                              # the other image's do not


def test_mask_queries_carry_the_positions_of_their_patches():
    m = model(num_proxies=4)
    x, t = torch.randn(2, 1, 16, 16), torch.randn(2, 16, 9)
    base, out = _proxy_run(m, x, t)
    ids = out["ids_masked"]
    # the first query of each image is mask_token + the position of its patch
    first = base["rec_in"][0][0][:, 0]
    expect = m.mask_token[0, 0] + m.encoder.pos_embed[0, 1 + ids[:, 0]]
    assert torch.allclose(first, expect, atol=1e-6)
    # moving the position of a patch masked in every image moves its [MASK] outputs, and no [IMG]/[PROXY] output
    both = sorted(set(ids[0].tolist()) & set(ids[1].tolist()))
    assert both
    with torch.no_grad():
        m.encoder.pos_embed[0, 1 + both[0]] += torch.randn(32)    # (a constant shift would vanish in the norms)
    moved, out2 = _proxy_run(m, x, t)
    assert all(torch.equal(a, b) for a, b in zip(base["enc"], moved["enc"]))
    for b in range(2):
        row = ids[b].tolist().index(both[0])
        assert not torch.allclose(out["pred"][b, row], out2["pred"][b, row], atol=1e-4)


def test_masking_counts_are_the_official_ceil_of_n_r():
    enc = ViTEncoder(224, 16, 3, 16, 1, 2)
    for ratio, count in ((0.4, 79), (0.6, 118), (0.8, 157)):       # the official generator's counts at 196 patches
        m = SemanticMIM(enc, 4, num_proxies=0, mask_ratio=ratio, target="pixel")
        with torch.no_grad():
            _, out = m(torch.zeros(1, 3, 224, 224), torch.zeros(1, 196, 4))
        assert out["ids_masked"].shape[1] == count == math.ceil(196 * ratio)
        assert len(set(out["ids_masked"][0].tolist())) == count


@pytest.mark.parametrize("K", [1, 4])
def test_evaluation_features_are_layer_normed_means_of_proxies_and_patches(K):
    """SemanticMIM's 'CLS' = LN(mean of the proxies), 'Patch' = LN(mean of the patch tokens), LN without
    affine (the official ln2, frozen at identity), read from the raw block output: no final norm."""
    torch.manual_seed(0)
    enc = ViTEncoder(16, 4, 1, 32, 3, 2, extra_tokens=K - 1, pos_embed="learnable", init="trunc_normal",
                     cls_pool="proxy_mean", pool_norm="layernorm").eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        enc.norm.weight.mul_(3.0).add_(0.5)                    # a final norm that would change the features
        tokens = enc.add_cls(enc.embed(x) + enc.pos_embed[:, 1:])
        outs = []
        for blk in enc.blocks:
            tokens = blk(tokens)
            outs.append(tokens)

    def ln(f):
        return (f - f.mean(-1, keepdim=True)) / torch.sqrt(f.var(-1, unbiased=False, keepdim=True) + 1e-6)
    for layer in (1, -1):
        raw = outs[layer]
        assert torch.allclose(enc.features(x, "cls", layer), ln(raw[:, :K].mean(1)), atol=1e-5)
        assert torch.allclose(enc.features(x, "mean", layer), ln(raw[:, K:].mean(1)), atol=1e-5)


@pytest.mark.parametrize("variant,decayed,not_decayed", [
    # MaskFeat variant: [MASK] and 1-D parameters out; the proxies and the position table decayed
    ("maskfeat", {"encoder.cls_token", "encoder.reg_token", "encoder.reg_pos", "encoder.pos_embed",
                  "encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "head.weight"},
     {"mask_token", "encoder.blocks.0.attn.qkv.bias", "encoder.blocks.0.norm1.weight", "recon_blocks.0.kv.bias"}),
    # BEiT variant: the proxies, positions, q/v biases, layer scales, norms and biases out; [MASK] decayed
    ("beit", {"mask_token", "encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight",
              "recon_blocks.0.kv.weight", "head.weight"},
     {"encoder.cls_token", "encoder.reg_token", "encoder.reg_pos", "encoder.pos_embed", "encoder.blocks.0.attn.qkv.q_bias",
      "encoder.blocks.0.attn.qkv.v_bias", "encoder.blocks.0.ls1.gamma", "recon_blocks.0.v_bias", "recon_blocks.0.ls2.gamma",
      "encoder.blocks.0.norm2.bias", "recon_blocks.0.proj.bias"}),
])
def test_weight_decay_sets_are_the_official_configs(compose, variant, decayed, not_decayed):
    from core.training.loop import build_optimizer
    cfg = compose(f"method={variant}", "method.num_proxies=4", "method.mask_ratio=0.6")
    m = SemanticMIM.build(cfg)
    opt = build_optimizer(m, cfg, 1e-3)
    names = {id(p): n for n, p in m.named_parameters()}
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in (names[id(p)] for p in g["params"])}
    assert len(wd) == len(names)
    assert all(wd[n] == cfg.pretrain.weight_decay > 0 for n in decayed), {n: wd[n] for n in decayed}
    assert all(wd[n] == 0 for n in not_decayed), {n: wd[n] for n in not_decayed}


@pytest.mark.parametrize("overrides,message", [
    (["method.num_proxies=2.5"], "method.num_proxies=2.5 is invalid: must be an integer"),
    (["method.pos_embed=bogus"], "method.pos_embed='bogus' is invalid: must be one of"),
    (["method.no_weight_decay=[bogus]"], "method.no_weight_decay=.* is invalid: must be a list of mask_token, "),
    (["method.target=tokens", "method.tokenizer.kind=bogus"], "method.tokenizer.kind='bogus' is invalid"),
    (["method.hog_window=5"], "method.hog_window=5 is invalid: must divide model.input_size"),
    (["method.target=tokens", "method.tokenizer.kind=dalle", "method.tokenizer.path=null"],
     "method.tokenizer.path=None is invalid: must be a local copy of the DALL-E dVAE encoder"),
])
def test_bad_config_is_refused_naming_the_key(compose, overrides, message):
    from core.config import ConfigError
    from core.job import validate
    with pytest.raises(ConfigError, match=message):
        validate(compose("method=semanticmim", *overrides))


@pytest.mark.parametrize("overrides", [["method.target=norm_pixel"], ["method.target=pixel"],
                                       ["method.no_weight_decay=[]"], ["method.hog_window=null"],
                                       ["method.target=tokens", "method.tokenizer.kind=kmeans"]])
def test_the_documented_options_are_accepted(compose, overrides):
    from core.job import validate
    validate(compose("method=semanticmim", *overrides))


def test_the_constructor_defaults_are_the_papers():
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(SemanticMIM).parameters.items()}
    assert (defaults["target"], defaults["num_proxies"], defaults["mask_ratio"], defaults["hog_cell_size"]) == \
        ("hog", 8, 0.6, 8)


def test_dalle_tokens_validate_exactly_when_the_dall_e_package_is_there(compose, tmp_path):
    import importlib.util

    from core.config import ConfigError
    from core.job import validate
    (tmp_path / "encoder.pkl").write_bytes(b"not read by validate")
    cfg = compose("method=semanticmim", "method.target=tokens", "method.tokenizer.kind=dalle",
                  f"method.tokenizer.path={tmp_path / 'encoder.pkl'}")
    if importlib.util.find_spec("dall_e") is not None:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match="needs the `dall_e` package"):
            validate(cfg)


@pytest.mark.parametrize("num_proxies", [0, 8])
def test_cost_model_of_the_baseline_and_of_ours(compose, num_proxies):
    cfg = compose("method=semanticmim", f"method.num_proxies={num_proxies}", "method.mask_ratio=0.6")
    N, D, depth = (cfg.model.input_size // cfg.model.patch_size) ** 2, cfg.model.embed_dim, cfg.model.depth
    keep = int(N * 0.4)
    train, infer = SemanticMIM.cost_model(cfg)
    assert isinstance(train, int) and isinstance(infer, int)
    if num_proxies:    # ours: L0 visible, L1 proxies, L2 masked queries; inference over every patch + proxies
        assert (train, infer) == (depth * block_cost(keep, 8, N - keep, D), depth * block_cost(N + 8, 0, 0, D))
    else:              # the vanilla baseline: [CLS] + every patch, the same at inference
        assert train == infer == depth * block_cost(1 + N, 0, 0, D)


def test_artifacts_draw_each_proxys_attention_as_a_png():
    m = model(num_proxies=4)
    x = torch.randn(2, 1, 16, 16)
    files = m.artifacts(x, x)
    assert files["proxy_attention.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "proxy_attention.png" not in model(num_proxies=0).artifacts(x, x)


def test_the_proxy_attention_picture_shows_each_map_on_its_patches_and_the_mean_below():
    """figures.attention_mosaic, what proxy_attention.png draws: image b's row holds the image, then each
    query's map (one block of pixels per patch, scaled to its own range); the last row the mean over images."""
    import numpy as np
    from matplotlib import colormaps

    from core.figures import attention_mosaic
    B, Q, g, side, gap = 2, 2, 7, 28, 2
    imgs = torch.rand(B, 1, side, side)
    maps = torch.zeros(B, Q, g, g)
    for q in range(Q):                 # query q: image 0 attends to patches a and b, image 1 to a only
        a, b = (q, 2 * q), (q + 3, 2 * q)
        maps[0, q][a] = maps[0, q][b] = maps[1, q][a] = 0.5
    out = attention_mosaic(imgs, maps, gap=gap)
    assert out.shape == ((B + 1) * (side + gap) - gap, (Q + 1) * (side + gap) - gap, 3)
    p = side // g                                                          # pixels per patch

    def tile(r, c):
        y, x = r * (side + gap), c * (side + gap)
        return out[y:y + side, x:x + side]

    def expect(levels: dict):          # {patch: level in [0, 1]}, the rest at the bottom of the colour map
        want = np.tile(np.array(colormaps["viridis"](0.0)[:3]), (side, side, 1))
        for (i, j), level in levels.items():
            want[i * p:(i + 1) * p, j * p:(j + 1) * p] = colormaps["viridis"](level)[:3]
        return want

    for q in range(Q):
        a, b = (q, 2 * q), (q + 3, 2 * q)
        np.testing.assert_allclose(tile(0, q + 1), expect({a: 1.0, b: 1.0}), atol=1e-6)
        np.testing.assert_allclose(tile(1, q + 1), expect({a: 1.0}), atol=1e-6)
        np.testing.assert_allclose(tile(B, q + 1), expect({a: 1.0, b: 0.5}), atol=1e-6)   # the mean, rescaled
    for i in range(B):
        np.testing.assert_allclose(tile(i, 0), imgs[i, 0, :, :, None].expand(-1, -1, 3).numpy(), atol=1e-6)
    assert (tile(B, 0) == 1).all() and (out[side:side + gap] == 1).all()   # blank corner, white gaps
