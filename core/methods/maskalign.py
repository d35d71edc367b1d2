"""MaskAlign (Xue et al., CVPR 2023): align visible student features with a frozen teacher, no reconstruction.

The student ViT sees only the kept N(1-r) patches + [CLS] (no decoder, no mask tokens); the frozen
teacher sees the intact image. Per step:

    keep ids          attentive: L = N(1-r) patches drawn WITHOUT replacement, p ~ teacher [CLS] attention
                      random:    MAE's per-sample shuffle                                  ids_keep: [B, L]
    student           x_i = output of block i (before the final norm), i = 1..S            [B, 1 + L, D]
    adaptors          A_i: D -> T (Linear, or Linear-GELU-Linear = `mlp`)                   [B, 1 + L, T]
    Dynamic Alignment y_hat_j = sum_i W_ij A_i(x_i), W: [S, K] learnable                    K x [B, 1 + L, T]
    targets           y_j = Normalize(teacher block T-K+j output), j = 1..K, gathered at ids_keep
    loss              sum_j 1/K * smooth_l1(y_hat_j, y_j) over the visible patches (+ [CLS] if align_cls)

`alignment: layerwise` (Tab. 3) has no W: student block S-K+j (through its own adaptor) is aligned with
teacher layer T-K+j, one to one (K > S: see below). The adaptors and W are not part of `encoder`:
evaluation and export use only `model.encoder`, so the Dynamic Alignment module is dropped after
pre-training, as in the paper.

Choices the paper leaves open (or the reference code makes differently), written down here:
- Order of adaptor and mixing: the paper's Eq. 1, A_i per *student* block then W mixes (S adaptors).
  The reference code mixes the raw student features first and applies one head per *teacher* layer;
  for linear adaptors both are linear in x_i, for `mlp` they differ. We follow the paper.
- W's shape and initialisation: [S, K], only the K aligned teacher layers (the reference keeps a [T, S]
  matrix over all teacher layers but only the top K receive gradient). The reference initialises
  eye + 0.01 when the student and the teacher have the same depth and 1/S everywhere otherwise; we keep
  exactly the K columns of that matrix that matter: (eye(S) + 0.01)[:, S-K:] when S = teacher depth
  (= eye + 0.01 when also K = S), else 1/S. W is excluded from weight decay (no_weight_decay).
- Layer-wise with more aligned layers than student blocks (K > S; the paper only has S = T): teacher
  layer T-K+j is aligned with student block floor(j*S/K) (TinyBERT's uniform layer map), so the last
  block still meets the last layer and every block is supervised; for K <= S it is the one-to-one map.
- Smooth-L1 with beta = 1 (Eq. 3; the reference multiplies it by 2, a constant AdamW ignores up to eps),
  mean over visible tokens and channels, each aligned layer weighted 1/K.
- [CLS] (`align_cls`): the student's [CLS] output is aligned with the teacher's per-layer [CLS] as one
  more token of the same layer (the reference concatenates it in front of the visible tokens). The
  paper's Tab. 3/4/5 are "w/o [CLS]", hence the default false; Tab. 6 shows "w/" at +0.1.
- Target normalisation per teacher layer, with [CLS] (when aligned) normalised together with the patch
  tokens: `layernorm` is per token anyway; `batchnorm` is per channel over batch and tokens
  (core/targets/normalize.py). The reference's "bn" uses one global mean/var per layer instead.
- Teacher grids: core/targets/teachers.py resamples every teacher output to the student's grid, so the teacher's
  token j is the student's patch j; the [CLS] attention is renormalised over patches (sums to 1).
- Attentive masking with `mask_ratio: 0` keeps every patch (Tab. 4's 0% = feature distillation).
  A tiny floor (1e-12) on the attention keeps `multinomial` defined when a patch has zero attention.
- The student's final norm is unused in pre-training (features are taken before it): declared in
  `unused_parameters`, so the trainer freezes it and DDP does not wait for its gradients.
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

KEYS = ("name", "target", "mask_ratio", "masking", "top_k", "alignment", "adaptor", "target_norm", "align_cls")


def attentive_keep_ids(attention: torch.Tensor, keep: int, generator: torch.Generator) -> torch.Tensor:
    """attention: [B, N] (>= 0) -> ids_keep: [B, keep], drawn without replacement with p ~ attention."""
    return torch.multinomial(attention.float().clamp_min(1e-12), keep, replacement=False, generator=generator)


def random_keep_ids(B: int, N: int, mask_ratio: float, device, generator: torch.Generator) -> torch.Tensor:
    """-> ids_keep: [B, N(1-r)], MAE's uniform per-sample masking (core/methods/mae.py)."""
    _, _, ids_restore = random_patch_masking(torch.zeros(B, N, 1, device=device), mask_ratio, generator)
    keep = int(N * (1 - mask_ratio))
    return torch.argsort(ids_restore, dim=1)[:, :keep]   # = ids_shuffle[:, :keep]


def adaptor(kind: str, dim: int, out_dim: int) -> nn.Module:
    """A_i: student width -> teacher width. `mlp` keeps the student width as hidden size (Sec. 4.2)."""
    if kind == "linear":
        return nn.Linear(dim, out_dim)
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out_dim))


def init_align_matrix(student_depth: int, top_k: int, teacher_depth: int) -> torch.Tensor:
    """W: [S, K]; see the module docstring (the reference's rule, restricted to the K aligned columns)."""
    S = student_depth
    if S == teacher_depth:
        return (torch.eye(S) + 0.01)[:, S - top_k:]
    return torch.full((S, top_k), 1.0 / S)


@register
class MaskAlign(Method):
    name = "maskalign"
    targets = ("teacher",)

    def __init__(self, encoder: ViTEncoder, teacher_widths: list[int], teacher_depth: int, top_k: int = 5,
                 mask_ratio: float = 0.7, masking: str = "attentive", alignment: str = "dynamic",
                 adaptor_kind: str = "linear", target_norm: str = "layernorm", align_cls: bool = False,
                 teacher_request: TeacherRequest | None = None):
        super().__init__()
        self.encoder = encoder
        S, D = encoder.depth, encoder.embed_dim
        self.top_k, self.mask_ratio, self.masking, self.alignment = top_k, mask_ratio, masking, alignment
        self.target_norm, self.align_cls, self.request = target_norm, align_cls, teacher_request
        if alignment == "dynamic":
            if len(set(teacher_widths)) != 1:  # one A_i(x_i) feeds every teacher layer j
                raise ConfigError("method.alignment", alignment, "needs teacher layers of one width, got "
                                  f"{teacher_widths}", "Use a ViT teacher, or method.alignment=layerwise.")
            self.student_layers = tuple(range(S))                     # A_i for every student block
            self.adaptors = nn.ModuleList(adaptor(adaptor_kind, D, teacher_widths[0]) for _ in range(S))
            self.align_matrix = nn.Parameter(init_align_matrix(S, top_k, teacher_depth))   # W: [S, K]
        else:
            # teacher layer j of the top K <- student block S-K+j (one to one), or floor(j*S/K) when K > S
            self.student_layers = tuple(S - top_k + j if top_k <= S else j * S // top_k for j in range(top_k))
            self.adaptors = nn.ModuleList(adaptor(adaptor_kind, D, w) for w in teacher_widths)
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
                   mask_ratio=m.mask_ratio, masking=m.masking, alignment=m.alignment, adaptor_kind=m.adaptor,
                   target_norm=m.target_norm, align_cls=m.align_cls, teacher_request=cls.teacher_request(cfg))

    def no_weight_decay(self) -> set[str]:
        # W mixes layers: decaying it would pull the mixing weights towards 0 (the reference exempts it)
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
            layers.append(normalize_features(t, self.target_norm))
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
        """S x [B, 1 + L, D] -> K predictions y_hat_j: [B, 1 + L, T]."""
        projected = [a(feats[i]) for a, i in zip(self.adaptors, self.student_layers)]   # A_i(x_i)
        if self.alignment == "layerwise":
            return projected
        stacked = torch.stack(projected)                                                  # [S, B, 1 + L, T]
        mixed = torch.einsum("sblt,sk->kblt", stacked, self.align_matrix.to(stacked.dtype))
        return list(mixed.unbind(0))                                                      # K x [B, 1 + L, T]

    def forward_loss(self, preds: list[torch.Tensor], targets: list[torch.Tensor], ids_keep: torch.Tensor):
        """preds: K x [B, 1 + L, T]; targets: K x [B, P + N, T]; the visible tokens (+ [CLS]) only."""
        ids = ids_keep
        if self.align_cls:  # the target's [CLS] sits at 0, its patches at 1..N
            ids = torch.cat([torch.zeros_like(ids[:, :1]), ids + 1], dim=1)
        loss = 0.0
        for pred, target in zip(preds, targets):
            t = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
            p = pred if self.align_cls else pred[:, 1:]
            loss = loss + F.smooth_l1_loss(p.float(), t.float(), beta=1.0) / len(preds)
        return loss

    def forward(self, x: torch.Tensor, targets: dict):
        B, N = x.shape[0], self.encoder.num_patches
        ids_keep = self.keep_ids(B, N, targets["attention"], x.device)
        preds = self.align(self.forward_student(x, ids_keep))
        loss = self.forward_loss(preds, targets["layers"], ids_keep)
        mask = torch.ones(B, N, device=x.device).scatter_(1, ids_keep, 0.0)   # [B, N], 1 = dropped
        return loss, {"preds": preds, "ids_keep": ids_keep, "mask": mask}
