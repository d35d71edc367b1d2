"""The `finetune` protocol: end-to-end fine-tuning of a copy of the encoder (MAE / MCM Table A2 recipe).

- A fresh ViTEncoder of the same architecture with `evaluate.finetune.drop_path` (linearly increasing
  per block, as timm) takes the pre-trained weights; the caller's encoder is never modified.
- Head: global average pool of the patch tokens + LayerNorm (`fc_norm`, MAE's `global_pool`) or the
  [CLS] token after the final norm; for an encoder whose "CLS" is the mean of its prefix tokens
  (SemanticMIM's proxies, core/vit.py `cls_pool`), that mean + the LayerNorm (the official `ln2`). Linear
  initialised trunc-normal 2e-5 (MAE).
- AdamW (betas 0.9/0.999) over timm's `param_groups_layer_decay` (the encoder's group_matcher: stem,
  one group per block, then norm + head), lr = base_lr x batch / 256, warm-up then cosine, per step; no
  weight decay on 1-D parameters, [CLS], the proxies and the position tables (the official codes').
- Training view: RandomResizedCrop(`crop_scale`) + horizontal flip + timm's RandAugment (on PIL images,
  gray ones included, filled with the data mean); timm's RandomErasing ('pixel' mode, probability
  `random_erasing`) on the normalised batch; timm Mixup/CutMix with label smoothing folded into the
  soft targets (SoftTargetCrossEntropy), or label-smoothed cross-entropy when both alphas are 0.
- Precision: bf16 autocast when `pretrain.precision=bf16`, else fp32. Metric: `finetune_top1` on the
  test split (resized + centre-cropped, as every evaluation here).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from core.evaluation.common import arch_kwargs, normalise, progress, warmup_cosine


class Classifier(nn.Module):
    def __init__(self, encoder, num_classes: int, pool: str):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        d = encoder.embed_dim
        self.proxy_mean = pool == "cls" and encoder.cls_pool == "proxy_mean"
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if pool == "mean" or self.proxy_mean else nn.Identity()
        self.head = nn.Linear(d, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.add_cls(enc.embed(x) + enc.pos_embed[:, 1:])
        for blk in enc.blocks:
            x = blk(x)
        if self.pool == "mean":
            return self.head(self.fc_norm(x[:, enc.num_prefix:].mean(dim=1)))
        if self.proxy_mean:
            return self.head(self.fc_norm(x[:, :enc.num_prefix].mean(dim=1)))
        return self.head(enc.norm(x)[:, 0])

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping for layer-wise lr decay, as MAE's lr_decay.py: stem (layer 0), block i
        (layer i + 1), then the norms + head as a layer of their own (scale 1; the last block gets
        layer_decay). Not timm's (99999,), which would merge them into the last block's group."""
        return dict(stem=r"^encoder\.(?:cls_token|pos_embed|patch_embed|reg_token|reg_pos)",
                    blocks=[(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm|^fc_norm|^head", (100_000,))])


def _posterize(img, bits: int, **_):
    """timm's posterize, with 0 bits kept giving a black image as PIL did before it started to raise
    (timm's increasing posterize reaches 0 bits at magnitude 10, which mstd0.5 draws)."""
    from PIL import Image, ImageOps
    return ImageOps.posterize(img, bits) if bits >= 1 else Image.new(img.mode, img.size)


class TrainView(Dataset):
    """Fine-tuning view of a split: crop, flip, RandAugment -> float image in [0, 1], label."""

    def __init__(self, base, input_size: int, crop_scale, rand_augment: str | None, mean,
                 interpolation: str = "bilinear"):
        from torchvision.transforms import InterpolationMode, v2
        self.base = base
        ops = [v2.RandomResizedCrop(input_size, scale=tuple(crop_scale), antialias=True,
                                    interpolation=InterpolationMode(interpolation)), v2.RandomHorizontalFlip()]
        if rand_augment:
            from timm.data.auto_augment import rand_augment_transform
            fill = tuple(int(round(255 * m)) for m in mean)
            ra = rand_augment_transform(rand_augment, dict(translate_const=int(input_size * 0.45), img_mean=fill))
            for op in ra.ops:
                if op.aug_fn.__name__ == "posterize":
                    op.aug_fn = _posterize
            ops.append(ra)
        self.transform = v2.Compose(ops + [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        from PIL import Image
        img, label = self.base[i]
        if isinstance(img, torch.Tensor):  # uint8 [C, H, W] -> PIL ('L' for gray), which RandAugment takes
            arr = img.numpy()
            img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
        return self.transform(img), label


def make_classifier(encoder, cfg, num_classes: int) -> Classifier:
    from core.vit import ViTEncoder
    f = cfg.evaluate.finetune
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        copy = ViTEncoder(**arch_kwargs(encoder), drop_path=f.drop_path)
        copy.load_state_dict(encoder.state_dict())
        return Classifier(copy, num_classes, f.pool)


def run(encoder, cfg, train_split, test_split, device) -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay

    from core.training import data as data_lib
    f, n = cfg.evaluate.finetune, train_split.num_classes
    model = make_classifier(encoder, cfg, n).to(device)
    groups = param_groups_layer_decay(model, weight_decay=f.weight_decay, layer_decay=f.layer_decay,
                                      no_weight_decay_list=[f"encoder.{n}" for n in
                                                            model.encoder.finetune_no_weight_decay()])
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))
    random.seed(cfg.seed)  # RandAugment draws from Python's and NumPy's generators
    np.random.seed(cfg.seed)
    view = TrainView(train_split.dataset, cfg.model.input_size, f.crop_scale, f.rand_augment, cfg.data.mean,
                     cfg.data.get("interpolation", "bilinear"))
    batch = min(f.batch_size, len(view)) // 2 * 2  # Mixup needs an even batch
    loader = DataLoader(view, batch_size=batch, shuffle=True, drop_last=True, num_workers=data_lib.loader_workers(cfg.data),
                        generator=torch.Generator().manual_seed(cfg.seed), pin_memory=device.type == "cuda")
    erase = None
    if f.get("random_erasing", 0):
        from timm.data.random_erasing import RandomErasing
        erase = RandomErasing(f.random_erasing, mode="pixel", device=str(device))
    mix = None
    if f.mixup > 0 or f.cutmix > 0:
        mix = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, label_smoothing=f.label_smoothing, num_classes=n)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=f.label_smoothing)
    peak = f.base_lr * batch / 256
    total, warmup = f.epochs * len(loader), int(round(f.warmup_epochs * len(loader)))
    amp = cfg.pretrain.precision == "bf16"
    model.train()
    step = 0
    with progress(total, "fine-tune") as bar:
        for _ in range(f.epochs):
            for imgs, y in loader:
                x, y = normalise(imgs, cfg, device), y.to(device)
                if erase is not None:  # per image, before mixing (as the official codes' per-sample transform)
                    x = erase(x)
                if mix is not None:
                    x, y = mix(x, y)
                lr = f.min_lr + (peak - f.min_lr) * warmup_cosine(step, total, warmup)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = criterion(model(x), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {step}; "
                                             "lower evaluate.finetune.base_lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for imgs, y in data_lib.eval_loader(test_split, cfg.data, cfg.model.input_size, cfg.evaluate.batch_size):
            correct += (model(normalise(imgs, cfg, device)).argmax(1).cpu() == torch.as_tensor(y)).sum().item()
    return {"finetune_top1": 100.0 * correct / len(test_split.dataset)}
