"""Config plumbing shared by the entry points: composition, validation, flattening and signatures.

A point's *signature* is the identity of its result: a hash of its resolved config without the keys
that only say where or how it runs (RUN_ONLY). Two launches of the same point, on a laptop or a
cluster, with a different tracking server or checkpoint interval, share a signature; any change to
what is computed (a mask ratio, a seed, the data, the code's config schema) gives a new one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "sweeps" / "conf"
# The `cluster` group lives in cluster/ (one file per cluster profile), found through the repo root.
SEARCHPATH = f"hydra.searchpath=[file://{REPO}]"

RUN_ONLY = (
    "cluster", "tracking", "sweep", "output_root", "dry_run", "device", "report_dir",
    "pretrain.checkpoint_every", "pretrain.log_every", "data.num_workers", "data.root", "evaluate.batch_size",
)


TARGET_KINDS = ("pixel", "norm_pixel", "teacher")  # see core/targets.py


class ConfigError(ValueError):
    """A user mistake in the config: names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value, allowed: str, hint: str = ""):
        self.key, self.value = key, value
        msg = f"{key}={value!r} is invalid: {allowed}."
        super().__init__(msg + (f" {hint}" if hint else ""))


def flatten(cfg, prefix: str = "") -> dict:
    """Nested config -> {'method.mask_ratio': 0.75, ...}; lists stay values (JSON-able)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out = {}
    for k, v in container.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def science_params(cfg) -> dict:
    """The flattened config without the run-only keys: what determines the result."""
    return {k: v for k, v in flatten(cfg).items()
            if not any(k == r or k.startswith(r + ".") for r in RUN_ONLY)}


def signature(cfg) -> str:
    blob = json.dumps(science_params(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _check(ok: bool, key: str, value, allowed: str, hint: str = "") -> None:
    if not ok:
        raise ConfigError(key, value, allowed, hint)


def _in(cfg, key: str, choices) -> None:
    v = OmegaConf.select(cfg, key)
    _check(v in choices, key, v, "must be one of " + ", ".join(map(str, choices)))


def _number(cfg, key: str, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, optional=False):
    v = OmegaConf.select(cfg, key)
    if v is None and optional:
        return
    kind = "an integer" if integer else "a number"
    rng = ""
    if lo is not None or hi is not None:
        rng = f" in {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, " \
              f"{hi if hi is not None else 'inf'}{')' if hi_open else ']'}"
    allowed = f"must be {kind}{rng}"
    _check(isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or isinstance(v, int)),
           key, v, allowed)
    _check(lo is None or (v > lo if lo_open else v >= lo), key, v, allowed)
    _check(hi is None or (v < hi if hi_open else v <= hi), key, v, allowed)


def validate(cfg) -> None:
    """Raise ConfigError on the first bad value of a resolved point config."""
    m = cfg.model
    for key in ("input_size", "patch_size", "embed_dim", "depth", "num_heads"):
        _number(cfg, f"model.{key}", 1, integer=True)
    _check(m.input_size % m.patch_size == 0, "model.input_size", m.input_size,
           f"must be a multiple of model.patch_size={m.patch_size}")
    _check(m.embed_dim % m.num_heads == 0, "model.embed_dim", m.embed_dim,
           f"must be divisible by model.num_heads={m.num_heads}")
    _check(m.embed_dim % 4 == 0, "model.embed_dim", m.embed_dim, "must be a multiple of 4 (2-D sin-cos position embedding)")
    _number(cfg, "model.drop_path", 0, 1, hi_open=True)

    _in(cfg, "method.name", ("mae", "mcm"))
    _in(cfg, "method.target", TARGET_KINDS)
    _number(cfg, "method.mask_ratio", 0, 1, lo_open=True, hi_open=True)
    _number(cfg, "method.decoder_depth", 1, integer=True)
    _number(cfg, "method.decoder_dim", 1, integer=True)
    _number(cfg, "method.decoder_heads", 1, integer=True)
    _check(cfg.method.decoder_dim % cfg.method.decoder_heads == 0, "method.decoder_dim", cfg.method.decoder_dim,
           f"must be divisible by method.decoder_heads={cfg.method.decoder_heads}")
    if cfg.method.name == "mcm":
        _in(cfg, "method.masking", ("random", "block"))
        _in(cfg, "method.recon_range", ("all", "masked"))
        _in(cfg, "method.encode_channel_forward", (True, False))
        masked = round(cfg.model.embed_dim * cfg.method.mask_ratio)
        _check(0 < masked < cfg.model.embed_dim, "method.mask_ratio", cfg.method.mask_ratio,
               f"must leave at least one masked and one visible channel of model.embed_dim={cfg.model.embed_dim}")
    else:
        keep = int(cfg.model.input_size // cfg.model.patch_size) ** 2 * (1 - cfg.method.mask_ratio)
        _check(int(keep) >= 1, "method.mask_ratio", cfg.method.mask_ratio, "must leave at least one visible patch")

    _in(cfg, "data.source", ("embedded", "fashion_mnist", "imagefolder"))
    _number(cfg, "data.channels", 1, integer=True)
    _check(len(cfg.data.mean) == cfg.data.channels and len(cfg.data.std) == cfg.data.channels, "data.mean",
           list(cfg.data.mean), f"data.mean and data.std need data.channels={cfg.data.channels} values")
    lo, hi = cfg.data.crop_scale
    _check(0 < lo <= hi <= 1, "data.crop_scale", [lo, hi], "must be [lo, hi] with 0 < lo <= hi <= 1")
    if cfg.data.source != "embedded":
        root = cfg.data.root
        _check(root is not None and Path(root).exists(), "data.root", root, "must be an existing folder",
               "For Fashion-MNIST: `apt-get install dataset-fashion-mnist`; for ImageNet set data.root or $IMAGENET_ROOT.")
    for split in ("train_limit", "test_limit"):
        _number(cfg, f"data.{split}", 1, integer=True, optional=True)

    if cfg.method.target == "teacher":
        _validate_teacher(cfg)

    p = cfg.pretrain
    _number(cfg, "pretrain.epochs", 0, integer=True, lo_open=True)
    _number(cfg, "pretrain.batch_size", 1, integer=True)
    _number(cfg, "pretrain.base_lr", 0, lo_open=True)
    _number(cfg, "pretrain.min_lr", 0)
    _number(cfg, "pretrain.weight_decay", 0)
    _number(cfg, "pretrain.warmup_epochs", 0)
    _check(p.warmup_epochs <= p.epochs, "pretrain.warmup_epochs", p.warmup_epochs,
           f"must not exceed pretrain.epochs={p.epochs}")
    _in(cfg, "pretrain.precision", ("fp32", "bf16", "fp16"))
    _number(cfg, "pretrain.grad_clip", 0, lo_open=True, optional=True)
    _number(cfg, "pretrain.max_steps", 1, integer=True, optional=True)
    _number(cfg, "pretrain.checkpoint_every", 1, integer=True)
    _number(cfg, "pretrain.log_every", 1, integer=True)

    _in(cfg, "evaluate.pool", ("mean", "cls"))
    _number(cfg, "evaluate.layer", -m.depth, m.depth - 1, integer=True)
    _number(cfg, "evaluate.knn.k", 1, integer=True)
    _number(cfg, "evaluate.knn.temperature", 0, lo_open=True)
    _number(cfg, "evaluate.linear.epochs", 1, integer=True)
    _number(cfg, "evaluate.linear.lr", 0, lo_open=True)
    _in(cfg, "device", ("auto", "cpu", "cuda"))
    _number(cfg, "seed", 0, integer=True)


def _validate_teacher(cfg) -> None:
    t = cfg.teacher
    _in_t = lambda key, choices: _check(t.get(key) in choices, f"teacher.{key}", t.get(key),
                                        "must be one of " + ", ".join(map(str, choices)))
    _in_t("kind", ("open_clip", "timm", "efficientnet_lite0"))
    _in_t("dtype", ("float32", "bfloat16", "float16"))
    pre = t.pretrained
    _check(isinstance(pre, str) and pre != "", "teacher.pretrained", pre,
           "must name weights: a pretrained tag, a local checkpoint file, or `random` (tests only)")
    if "/" in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors")):
        _check(Path(pre).is_file(), "teacher.pretrained", pre, "is not an existing checkpoint file")
    if t.kind == "open_clip":
        import open_clip
        _check(t.model in open_clip.list_models(), "teacher.model", t.model,
               "is not an open_clip model; see open_clip.list_models()")
        if pre not in ("random",) and not Path(pre).is_file():
            tags = open_clip.list_pretrained_tags_by_model(t.model)
            _check(pre in tags, "teacher.pretrained", pre,
                   f"is not a pretrained tag of {t.model} (known: {', '.join(tags) or 'none'}), nor a local file")
    elif t.kind == "timm":
        import timm
        _check(timm.is_model(t.model), "teacher.model", t.model, "is not a timm model; see timm.list_models()")
    else:
        _check(pre in ("package", "random") or Path(pre).is_file(), "teacher.pretrained", pre,
               "must be `package`, `random` or a local state_dict file")
        _number(cfg, "teacher.feature_stage", 1, 7, integer=True)
    _number(cfg, "teacher.input_size", 16, integer=True, optional=True)
