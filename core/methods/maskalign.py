"""MaskAlign (Xue et al., CVPR 2023): align visible student features with a frozen teacher, no reconstruction.

The student ViT sees only the kept L = N(1-r) patches + [CLS] (no decoder, no mask tokens); the frozen
teacher sees the intact image. Per step, as the official code (OpenDriveLab/maskalign, models_pretrain.py)
runs it by default:

    keep ids          attentive: L patches drawn WITHOUT replacement, p ~ teacher [CLS] attention
                      random:    MAE's per-sample shuffle                                  ids_keep: [B, L]
    student           x_i = output of block i (before the final norm), i = 1..S            [B, 1 + L, D]
    Dynamic Alignment mix_then_adapt (default, the official code): y_hat_j = H_j(sum_i W_ji x_i)
                      adapt_then_mix (the paper's Eq. 1):          y_hat_j = sum_i W_ji A_i(x_i)
                      W: [K, S] learnable; H_j / A_i: Linear (or Linear-GELU-Linear = `mlp`) K x [B, 1 + L, T]
    targets           y_j = Normalize(teacher block T-K+j output), j = 1..K, [CLS] first, patches at ids_keep
    loss              sum_j 1/K * 2 smooth_l1(y_hat_j, y_j), mean over [CLS] + visible tokens and channels

`alignment: layerwise` (Tab. 3; the official fusion 'simple') has no W: student block S-K+j, through its
own adaptor, is aligned with teacher layer T-K+j, one to one (K > S: see below). The adaptors and W are
not part of `encoder`: evaluation and export use only `model.encoder`, so the Dynamic Alignment module is
dropped after pre-training, as in the paper.

Where the paper's text and the official code differ, the code is the default and the text an option
(docs/methods.md; tests/test_equivalence.py checks loss and gradients against the official forward):
- Order (`align_order`). The code mixes the raw block outputs first and applies one head per *teacher*
  layer (`get_student`: einsum with W, then `distill_heads[j]`): `mix_then_adapt`, the default. The
  paper's Eq. 1 applies one adaptor per *student* block, then mixes: `adapt_then_mix` (needs teacher
  layers of one width). Even with linear adaptors they differ: K heads D -> T against S adaptors.
- [CLS] (`align_cls`). The code always aligns the student's [CLS] with the teacher layer's [CLS], as one
  more token in the same mean (`get_teacher` puts it in front of the visible tokens): true by default.
  The paper's Tab. 3/4/5 are "w/o [CLS]" (their sweeps set it false), Tab. 6 shows "w/" at +0.1.
- BN targets (`target_norm: batchnorm_global`, Tab. 6 "BN"): the code's 'bn' standardises each teacher
  layer with ONE mean and (unbiased) variance over the whole batch of tokens, eps 1e-6 inside the root,
  computed before the gather; per channel (`batchnorm`) is the option. Either way the statistics cover
  the tokens the target is built from: [CLS] + all N patches (only the patches with align_cls false).
- Loss: 2 x smooth-L1 (beta 1) per layer as in the code (the paper's Eq. 3 has no 2), each aligned
  layer weighted 1/K (the code's `loss_weights=topK`).
Details of the code kept as they are:
- W's rows are teacher layers and its columns student blocks, as the code's `distill_weights` [T, S];
  only the last K rows (the aligned layers) ever get a gradient there, so W holds exactly those. Its
  init: eye(S) + 0.01 (every entry + 0.01) when the student is as deep as the teacher (the code's
  fusion 'linear'), else 1/S everywhere (its fusion 'sum', the one that works for S != T): rows
  T-K..T-1 of that matrix. W is excluded from weight decay (no_weight_decay), the heads are not.
- Attentive masking: the code draws a full random order with `multinomial(importance, N, replacement=
  False)` and keeps its first L; drawing only L gives the same first L (torch draws both from one set of
  exponential variates), so the kept set is a successive sample without replacement, p ~ attention.
  The attention is the last block's [CLS]->patch attention, mean over heads (core/targets/teachers.py
  renormalises it over the patches: the same distribution). A floor of 1e-12 keeps `multinomial`
  defined when a patch has zero attention.
Choices the official code leaves open, written down here:
- Layer-wise with more aligned layers than student blocks (K > S; the code then pairs student block i
  with teacher layer i): teacher layer T-K+j is aligned with student block floor(j*S/K) (TinyBERT's
  uniform layer map), so the last block still meets the last layer and every block is supervised; for
  K <= S it is the one-to-one map.
- Teacher grids: core/targets/teachers.py resamples every teacher output to the student's grid, so the
  teacher's token j is the student's patch j.
- `mask_ratio: 0` keeps every patch (Tab. 4's 0% = feature distillation).
- The student's final norm is unused in pre-training (features are taken before it, as in the code):
  declared in `unused_parameters`, so the trainer freezes it and DDP does not wait for its gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import ConfigError, check, check_in, check_number
from core.methods.mae import random_patch_masking
from core.methods import register
from core.methods.base import Method
from core.targets.teachers import TeacherRequest
from core.targets.normalize import FEATURE_NORMS, normalize_features
from core.vit import ViTEncoder, build_encoder, init_weights

KEYS = ("name", "target", "mask_ratio", "masking", "top_k", "alignment", "align_order", "adaptor", "target_norm",
        "align_cls")
ALIGN_ORDERS = ("mix_then_adapt", "adapt_then_mix")


def attentive_keep_ids(attention: torch.Tensor, keep: int, generator: torch.Generator) -> torch.Tensor:
    """attention: [B, N] (>= 0) -> ids_keep: [B, keep], drawn without replacement with p ~ attention."""
    return torch.multinomial(attention.float().clamp_min(1e-12), keep, replacement=False, generator=generator)


def random_keep_ids(B: int, N: int, mask_ratio: float, device, generator: torch.Generator) -> torch.Tensor:
    """-> ids_keep: [B, N(1-r)], MAE's uniform per-sample masking (core/methods/mae.py)."""
    _, _, ids_restore = random_patch_masking(torch.zeros(B, N, 1, device=device), mask_ratio, generator)
    keep = int(N * (1 - mask_ratio))
    return torch.argsort(ids_restore, dim=1)[:, :keep]   # = ids_shuffle[:, :keep]


def adaptor(kind: str, dim: int, out_dim: int) -> nn.Module:
    """A head / adaptor: student width -> teacher width. `mlp` keeps the student width as hidden size
    (Sec. 4.2; the official head_type 'mlp')."""
    if kind == "linear":
        return nn.Linear(dim, out_dim)
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out_dim))


def init_align_matrix(student_depth: int, top_k: int, teacher_depth: int) -> torch.Tensor:
    """W: [K, S], rows = the aligned teacher layers T-K..T-1, columns = student blocks: the last K rows of
    the official matrix (eye + 0.01 when S = T, else 1/S; see the module docstring)."""
    S = student_depth
    if S == teacher_depth:
        return (torch.eye(S) + 0.01)[S - top_k:]
    return torch.full((top_k, S), 1.0 / S)


@register
class MaskAlign(Method):
    name = "maskalign"
    targets = ("teacher",)

    def __init__(self, encoder: ViTEncoder, teacher_widths: list[int], teacher_depth: int, top_k: int = 5,
                 mask_ratio: float = 0.7, masking: str = "attentive", alignment: str = "dynamic",
                 align_order: str = "mix_then_adapt", adaptor_kind: str = "linear", target_norm: str = "layernorm",
                 align_cls: bool = True, teacher_request: TeacherRequest | None = None):
        super().__init__()
        self.encoder = encoder
        S, D = encoder.depth, encoder.embed_dim
        self.top_k, self.mask_ratio, self.masking, self.alignment = top_k, mask_ratio, masking, alignment
        self.align_order = align_order if alignment == "dynamic" else None
        self.target_norm, self.align_cls, self.request = target_norm, align_cls, teacher_request
        if alignment == "layerwise":
            # teacher layer j of the top K <- student block S-K+j (one to one), or floor(j*S/K) when K > S
            self.student_layers = tuple(S - top_k + j if top_k <= S else j * S // top_k for j in range(top_k))
            self.adaptors = nn.ModuleList(adaptor(adaptor_kind, D, w) for w in teacher_widths)
        elif align_order == "mix_then_adapt":
            self.student_layers = tuple(range(S))                 # every block is mixed, one head per layer
            self.adaptors = nn.ModuleList(adaptor(adaptor_kind, D, w) for w in teacher_widths)
        else:
            if len(set(teacher_widths)) != 1:  # one A_i(x_i) feeds every teacher layer j
                raise ConfigError("method.align_order", align_order, "needs teacher layers of one width, got "
                                  f"{teacher_widths}", "Use method.align_order=mix_then_adapt.")
            self.student_layers = tuple(range(S))                 # A_i for every student block
            self.adaptors = nn.ModuleList(adaptor(adaptor_kind, D, teacher_widths[0]) for _ in range(S))
        if alignment == "dynamic":
            self.align_matrix = nn.Parameter(init_align_matrix(S, top_k, teacher_depth))   # W: [K, S]
        init_weights(self.adaptors)

    # ---- from the config
    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        m = cfg.method
        for key in m:
            check(key in KEYS, f"method.{key}", m[key], f"is not a maskalign key (known: {', '.join(KEYS)})")
        check_number(cfg, "method.mask_ratio", 0, 1, hi_open=True)
        n = (cfg.model.input_size // cfg.model.patch_size) ** 2
        check(int(n * (1 - m.mask_ratio)) >= 1, "method.mask_ratio", m.mask_ratio,
              f"must leave at least one visible patch of the {n}")
        check_in(cfg, "method.masking", ("attentive", "random"))
        check_number(cfg, "method.top_k", 1, integer=True)
        check_in(cfg, "method.alignment", ("dynamic", "layerwise"))
        check_in(cfg, "method.align_order", ALIGN_ORDERS)
        check_in(cfg, "method.adaptor", ("linear", "mlp"))
        check_in(cfg, "method.target_norm", FEATURE_NORMS)
        check(isinstance(m.align_cls, bool), "method.align_cls", m.align_cls, "must be true or false")
        # The teacher's depth is only known once it is built (build() checks it); a config that states it
        # (the packaged ViT's teacher.model_kwargs.depth) is checked here, before anything runs.
        kw = cfg.get("teacher", {}).get("model_kwargs") or {}
        if cfg.get("teacher", {}).get("kind") == "timm" and isinstance(kw.get("depth"), int):
            cls.check_top_k(m.top_k, kw["depth"], cfg.teacher.model)

    @staticmethod
    def check_top_k(top_k: int, teacher_depth: int, teacher_name: str) -> None:
        check(top_k <= teacher_depth, "method.top_k", top_k,
              f"must not exceed the teacher's depth ({teacher_name}: {teacher_depth} blocks)")

    @classmethod
    def teacher_request(cls, cfg) -> TeacherRequest:
        m = cfg.method
        return TeacherRequest(layers=tuple(range(-m.top_k, 0)), cls=bool(m.align_cls),
                              cls_attention=m.masking == "attentive")

    @classmethod
    def build(cls, cfg, teacher=None) -> "MaskAlign":
        m = cfg.method
        if teacher is None:
            raise ValueError("MaskAlign needs its teacher: build_model(cfg, teacher)")
        name = cfg.teacher.get("model", cfg.teacher.get("kind"))
        cls.check_top_k(m.top_k, teacher.depth, name)
        needs = [what for what, ok in (("[CLS] (method.align_cls)", m.align_cls),
                                       ("attention (method.masking=attentive)", m.masking == "attentive")) if ok]
        check(teacher.has_cls or not needs, "teacher.model", name,
              f"has no [CLS] token or attention, which MaskAlign needs here: {', '.join(needs)}",
              "Use a ViT teacher (e.g. teacher=vit_fmnist), or method.masking=random method.align_cls=false.")
        return cls(build_encoder(cfg), list(teacher.layer_widths[-m.top_k:]), teacher.depth, top_k=m.top_k,
                   mask_ratio=m.mask_ratio, masking=m.masking, alignment=m.alignment, align_order=m.align_order,
                   adaptor_kind=m.adaptor, target_norm=m.target_norm, align_cls=m.align_cls,
                   teacher_request=cls.teacher_request(cfg))

    def no_weight_decay(self) -> set[str]:
        # W mixes layers: decaying it would pull the mixing weights towards 0 (the official code exempts it)
        return super().no_weight_decay() | ({"align_matrix"} if self.alignment == "dynamic" else set())

    def unused_parameters(self) -> set[str]:
        return {"encoder.norm.weight", "encoder.norm.bias"}   # features are taken before the final norm

    # ---- per step
    @torch.no_grad()
    def make_targets(self, imgs, x, teacher=None) -> dict:
        """The teacher on the intact image -> {'layers': K x [B, P + N, T] normalised targets (P = 1 with
        [CLS] first when align_cls, else 0), 'attention': [B, N] [CLS]->patch attention or None}."""
        out = teacher(imgs, self.encoder.grid, self.request)
        layers = []
        for j, t in enumerate(out.layers):                                   # t: [B, N, T]
            if self.align_cls:
                t = torch.cat([out.layers_cls[j].unsqueeze(1), t], dim=1)   # [B, 1 + N, T]
            layers.append(normalize_features(t, self.target_norm))          # before the gather, as the code
        return {"layers": layers, "attention": out.cls_attention}

    def keep_ids(self, B: int, N: int, attention: torch.Tensor | None, device) -> torch.Tensor:
        """-> ids_keep: [B, L], L = N(1-r), of the patches the student sees."""
        gen = self.rng(device)
        if self.masking == "attentive":
            return attentive_keep_ids(attention, int(N * (1 - self.mask_ratio)), gen)
        return random_keep_ids(B, N, self.mask_ratio, device, gen)

    def forward_student(self, x: torch.Tensor, ids_keep: torch.Tensor) -> list[torch.Tensor]:
        """x: [B, C, H, W], ids_keep: [B, L] -> S raw block outputs x_i: [B, 1 + L, D]."""
        enc = self.encoder
        tokens = enc.embed(x) + enc.pos_embed[:, 1:]                                      # [B, N, D]
        vis = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        h = enc.add_cls(vis)                                                              # [B, 1 + L, D]
        feats = []
        for blk in enc.blocks:  # the final norm is skipped: MaskAlign aligns raw block outputs
            h = blk(h)
            feats.append(h)
        return feats

    def align(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """S x [B, 1 + L, D] -> K predictions y_hat_j: [B, 1 + L, T_j], j = teacher layers T-K..T-1."""
        if self.alignment == "layerwise":
            return [a(feats[i]) for a, i in zip(self.adaptors, self.student_layers)]      # A_j(x_{S-K+j})
        W = self.align_matrix                                                             # [K, S]
        if self.align_order == "mix_then_adapt":
            stacked = torch.stack(feats)                                                  # [S, B, 1 + L, D]
            mixed = torch.einsum("ks,sbld->kbld", W.to(stacked.dtype), stacked)           # [K, B, 1 + L, D]
            return [head(m) for head, m in zip(self.adaptors, mixed.unbind(0))]          # H_j(sum_i W_ji x_i)
        projected = torch.stack([a(f) for a, f in zip(self.adaptors, feats)])            # [S, B, 1 + L, T]
        mixed = torch.einsum("ks,sblt->kblt", W.to(projected.dtype), projected)          # sum_i W_ji A_i(x_i)
        return list(mixed.unbind(0))

    def forward_loss(self, preds: list[torch.Tensor], targets: list[torch.Tensor], ids_keep: torch.Tensor):
        """preds: K x [B, 1 + L, T]; targets: K x [B, P + N, T]; the visible tokens (+ [CLS]) only."""
        ids = ids_keep
        if self.align_cls:  # the target's [CLS] sits at 0, its patches at 1..N
            ids = torch.cat([torch.zeros_like(ids[:, :1]), ids + 1], dim=1)
        loss = 0.0
        for pred, target in zip(preds, targets):
            t = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
            p = pred if self.align_cls else pred[:, 1:]
            loss = loss + 2 * F.smooth_l1_loss(p.float(), t.float(), beta=1.0) / len(preds)
        return loss

    def forward(self, x: torch.Tensor, targets: dict):
        B, N = x.shape[0], self.encoder.num_patches
        ids_keep = self.keep_ids(B, N, targets["attention"], x.device)
        preds = self.align(self.forward_student(x, ids_keep))
        loss = self.forward_loss(preds, targets["layers"], ids_keep)
        mask = torch.ones(B, N, device=x.device).scatter_(1, ids_keep, 0.0)   # [B, N], 1 = dropped
        return loss, {"preds": preds, "ids_keep": ids_keep, "mask": mask}
