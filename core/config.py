"""Config plumbing shared by the entry points: composition, validation, flattening and signatures.

A point's *signature* is the identity of its result: a hash of its resolved config without the keys
that only say where or how it runs (RUN_ONLY). Two launches of the same point, on a laptop or a
cluster, with a different tracking server or checkpoint interval, share a signature; any change to
what is computed (a mask ratio, a seed, the data, the code's config schema) gives a new one.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "sweeps" / "conf"
# The `cluster` group lives in cluster/ (one file per cluster profile), found through the repo root.
SEARCHPATH = f"hydra.searchpath=[file://{REPO}]"

RUN_ONLY = (
    "cluster", "tracking", "sweep", "output_root", "dry_run", "retry_failed", "reuse", "device", "report_dir",
    "pretrain.checkpoint_every", "pretrain.log_every", "pretrain.compile", "data.num_workers", "data.root", "evaluate.batch_size",
)


class ConfigError(ValueError):
    """A user mistake in the config: names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value, allowed: str, hint: str = ""):
        self.key, self.value = key, value
        msg = f"{key}={value!r} is invalid: {allowed}."
        super().__init__(msg + (f" {hint}" if hint else ""))


def unknown_key(key: str, value, known) -> ConfigError:
    """The error for a key no config has, with a did-you-mean from the real keys."""
    import difflib
    close = difflib.get_close_matches(key, list(known), n=1)
    return ConfigError(key, value, "no config has this key, so nothing would read it",
                       f"Did you mean {close[0]}?" if close else "`python sweeps/run.py --cfg job` lists the keys.")


def hydra_error(e: Exception, overrides: list[str]) -> str | None:
    """Hydra's own errors (unknown group option, unknown key, unparsable override) as our one line
    `KEY=VALUE is invalid: ...`; None for anything that is not a user mistake Hydra found."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException
    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    by_key = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides if "=" in o}
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, OverrideParseException):
        return (f"cannot parse the override {getattr(e, 'override', '')!r}: {lines[0] if lines else ''}. Overrides "
                "are KEY=VALUE in Hydra's syntax: https://hydra.cc/docs/advanced/override_grammar/basic/")
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return str(ConfigError(group, option, f"is not an option of the config group {group}",
                               "Options: " + ", ".join(e.options) + "."))
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and "not in struct" in str(cause) \
            and getattr(cause, "full_key", None) in by_key:
        key = cause.full_key
        o = by_key[key]
        try:  # the real keys, for the did-you-mean: the same command line without this override
            from hydra import compose, initialize_config_dir
            from hydra.core.global_hydra import GlobalHydra
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                ref = compose("config", overrides=[SEARCHPATH] + [x for x in overrides if x != o and "=" in x
                                                   and not x.startswith("hydra")])
            known = flatten(ref)
        except Exception:  # noqa: BLE001 - another mistake on the line: no suggestion then
            known = {}
        return str(unknown_key(key, o.split("=", 1)[1], known))
    return " ".join(lines[:1] + ([str(cause).splitlines()[0]] if cause is not None and str(cause) else []))


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


def check(ok: bool, key: str, value, allowed: str, hint: str = "") -> None:
    if not ok:
        raise ConfigError(key, value, allowed, hint)


def check_in(cfg, key: str, choices) -> None:
    v = OmegaConf.select(cfg, key)
    check(v in choices, key, v, "must be one of " + ", ".join(map(str, choices)))


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_number(cfg, key: str, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, optional=False):
    v = OmegaConf.select(cfg, key)
    if v is None and optional:
        return
    kind = "an integer" if integer else "a number"
    rng = ""
    if lo is not None or hi is not None:
        rng = f" in {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, " \
              f"{hi if hi is not None else 'inf'}{')' if hi_open else ']'}"
    allowed = f"must be {kind}{rng}"
    check(is_number(v) and (not integer or isinstance(v, int)), key, v, allowed)
    check(lo is None or (v > lo if lo_open else v >= lo), key, v, allowed)
    check(hi is None or (v < hi if hi_open else v <= hi), key, v, allowed)


def validate(cfg) -> None:
    """Raise ConfigError on the first bad value of a resolved point config.

    Generic groups are checked here; `method.*` by the method's own `check` (core/method.py), and the
    teacher only when the method asks for one."""
    from core import method as methods

    m = cfg.model
    for key in ("input_size", "patch_size", "embed_dim", "depth", "num_heads"):
        check_number(cfg, f"model.{key}", 1, integer=True)
    check(m.input_size % m.patch_size == 0, "model.input_size", m.input_size,
          f"must be a multiple of model.patch_size={m.patch_size}")
    check(m.embed_dim % m.num_heads == 0, "model.embed_dim", m.embed_dim,
          f"must be divisible by model.num_heads={m.num_heads}")
    check(m.embed_dim % 4 == 0, "model.embed_dim", m.embed_dim, "must be a multiple of 4 (2-D sin-cos position embedding)")
    check_number(cfg, "model.drop_path", 0, 1, hi_open=True)

    method = methods.get(cfg.method.name)
    method.check(cfg)

    check_in(cfg, "data.source", ("embedded", "fashion_mnist", "imagefolder"))
    check_number(cfg, "data.channels", 1, integer=True)
    check(len(cfg.data.mean) == cfg.data.channels and len(cfg.data.std) == cfg.data.channels, "data.mean",
          list(cfg.data.mean), f"data.mean and data.std need data.channels={cfg.data.channels} values")
    check_pair(cfg, "data.crop_scale", lambda lo, hi: 0 < lo <= hi <= 1, "must be [lo, hi] with 0 < lo <= hi <= 1")
    check(cfg.data.source != "embedded" or cfg.data.get("root") is None, "data.root", cfg.data.get("root"),
          "is not read by data.source=embedded (the images shipped in core/assets)",
          "Drop data.root, or pick data that reads it: data=fashion_mnist or data=imagenet.")
    if cfg.data.source != "embedded" and cfg.get("task", "train") == "train":  # task=flops reads no data
        root = cfg.data.root
        check(root is not None and Path(root).exists(), "data.root", root, "must be an existing folder",
              "For Fashion-MNIST: `apt-get install dataset-fashion-mnist`; for ImageNet set data.root or $IMAGENET_ROOT.")
    for split in ("train_limit", "test_limit"):
        check_number(cfg, f"data.{split}", 1, integer=True, optional=True)
    from core.data import MAX_AUTO_WORKERS
    w = cfg.data.get("num_workers", 0)
    check(w == "auto" or (isinstance(w, int) and not isinstance(w, bool) and w >= 0), "data.num_workers", w,
          "must be auto or an integer >= 0 (DataLoader worker processes; 0 = load in the training process)",
          f"auto = the CPUs this process may use (shared by the node's training processes), less one, at most "
          f"{MAX_AUTO_WORKERS}.")

    request = method.teacher_request(cfg)
    if request is not None:
        _validate_teacher(cfg, request)

    p = cfg.pretrain
    check_number(cfg, "pretrain.epochs", 0, integer=True, lo_open=True)
    check_number(cfg, "pretrain.batch_size", 1, integer=True)
    check_number(cfg, "pretrain.base_lr", 0, lo_open=True)
    check_number(cfg, "pretrain.min_lr", 0)
    check_number(cfg, "pretrain.weight_decay", 0)
    check_pair(cfg, "pretrain.betas", lambda b1, b2: 0 <= b1 < 1 and 0 <= b2 < 1, "must be [beta1, beta2] in [0, 1)")
    check_number(cfg, "pretrain.warmup_epochs", 0)
    check(p.warmup_epochs <= p.epochs, "pretrain.warmup_epochs", p.warmup_epochs,
          f"must not exceed pretrain.epochs={p.epochs}")
    check_in(cfg, "pretrain.precision", ("fp32", "bf16", "fp16"))
    c = p.get("compile", "auto")
    check(c == "auto" or isinstance(c, bool), "pretrain.compile", c, "must be auto, true or false",
          "auto = torch.compile on CUDA, eager on CPU.")
    check_number(cfg, "pretrain.grad_clip", 0, lo_open=True, optional=True)
    check_number(cfg, "pretrain.max_steps", 1, integer=True, optional=True)
    check_number(cfg, "pretrain.checkpoint_every", 1, integer=True)
    check_number(cfg, "pretrain.log_every", 1, integer=True)

    _validate_evaluate(cfg)
    check_number(cfg, "tracking.outage_wait_s", 0, optional=True)
    check_in(cfg, "task", ("train", "flops"))
    check_in(cfg, "device", ("auto", "cpu", "cuda"))
    check_in(cfg, "reuse", ("store", "experiment", "none"))
    check_number(cfg, "seed", 0, integer=True)


def check_list(cfg, key: str, ok, allowed: str, nonempty: bool = True) -> list:
    """A list whose every item passes ok(item); returns it as a plain list."""
    v = OmegaConf.select(cfg, key)
    v = list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else v
    check(isinstance(v, list) and (len(v) > 0 or not nonempty) and all(ok(x) for x in v), key, v, allowed)
    return v


def _validate_evaluate(cfg) -> None:
    """The `evaluate` group; a protocol's own keys only when it is asked for (core/evaluate.py)."""
    from core.evaluate import PROTOCOLS
    depth = cfg.model.depth
    is_layer = lambda x: isinstance(x, int) and not isinstance(x, bool) and -depth <= x < depth  # noqa: E731
    protocols = check_list(cfg, "evaluate.protocols", lambda p: p in PROTOCOLS,
                           "must be a list of " + ", ".join(PROTOCOLS), nonempty=False)
    check(len(set(protocols)) == len(protocols), "evaluate.protocols", protocols, "must not repeat a protocol")
    check_in(cfg, "evaluate.pool", ("mean", "cls"))
    check_number(cfg, "evaluate.layer", -depth, depth - 1, integer=True)
    check_number(cfg, "evaluate.batch_size", 1, integer=True)
    if "knn" in protocols:
        check_number(cfg, "evaluate.knn.k", 1, integer=True)
        check_number(cfg, "evaluate.knn.temperature", 0, lo_open=True)
    if "linear" in protocols:
        check_list(cfg, "evaluate.linear.layers", is_layer, f"must be a list of block indices in [{-depth}, {depth - 1}]")
        check_list(cfg, "evaluate.linear.pools", lambda p: p in ("mean", "cls"), "must be a list of mean, cls")
        check_list(cfg, "evaluate.linear.lrs", lambda x: is_number(x) and x > 0, "must be a list of numbers > 0")
        check_number(cfg, "evaluate.linear.epochs", 1, integer=True)
        check_number(cfg, "evaluate.linear.warmup_epochs", 0, cfg.evaluate.linear.epochs)
        check_number(cfg, "evaluate.linear.batch_size", 2, integer=True)
        check_number(cfg, "evaluate.linear.weight_decay", 0)
        check_in(cfg, "evaluate.linear.optimizer", ("sgd", "lars"))
    if "finetune" in protocols:
        f = "evaluate.finetune."
        check_number(cfg, f + "epochs", 1, integer=True)
        check_number(cfg, f + "warmup_epochs", 0, cfg.evaluate.finetune.epochs)
        check_number(cfg, f + "batch_size", 2, integer=True)
        check_number(cfg, f + "base_lr", 0, lo_open=True)
        check_number(cfg, f + "min_lr", 0)
        check_number(cfg, f + "weight_decay", 0)
        check_number(cfg, f + "layer_decay", 0, 1, lo_open=True)
        check_number(cfg, f + "drop_path", 0, 1, hi_open=True)
        check_number(cfg, f + "label_smoothing", 0, 1, hi_open=True)
        check_number(cfg, f + "mixup", 0)
        check_number(cfg, f + "cutmix", 0)
        check_in(cfg, f + "pool", ("mean", "cls"))
        check_pair(cfg, f + "crop_scale", lambda lo, hi: 0 < lo <= hi <= 1, "must be [lo, hi] with 0 < lo <= hi <= 1")
        ra = cfg.evaluate.finetune.rand_augment
        if ra is not None:
            from timm.data.auto_augment import rand_augment_transform
            try:
                ok = isinstance(ra, str) and ra.startswith("rand") and rand_augment_transform(ra, {}) is not None
            except Exception:  # noqa: BLE001 - timm raises assorted errors on a malformed spec
                ok = False
            check(ok, f + "rand_augment", ra, "must be a timm RandAugment spec such as rand-m9-mstd0.5-inc1, or null")
    if "seg_linear" in protocols:
        s = "evaluate.seg_linear."
        check_number(cfg, s + "layer", -depth, depth - 1, integer=True)
        check_number(cfg, s + "epochs", 1, integer=True)
        check_number(cfg, s + "lr", 0, lo_open=True)
        check_number(cfg, s + "batch_size", 1, integer=True)
        check_number(cfg, s + "train_limit", 1, integer=True, optional=True)
        check_number(cfg, s + "fg_threshold", 0, 1, lo_open=True, hi_open=True)
        check_in(cfg, s + "layout", ("auto", "voc", "ade20k"))
        if cfg.data.source not in ("embedded", "fashion_mnist"):  # per-pixel labels from a folder
            root = cfg.evaluate.seg_linear.root
            check(root is not None and Path(str(root)).is_dir(), s + "root", root,
                  "must be a PascalVOC or ADE20K folder when data.source has no per-pixel labels")
            check_number(cfg, s + "num_classes", 2, 255, integer=True, hi_open=True)
    if "external" in protocols:
        import shlex
        x = cfg.evaluate.external
        command = x.command
        check(isinstance(command, str) and command.strip() != "", "evaluate.external.command", command,
              "must be a command line; {checkpoint}, {output_dir} and {run_id} are substituted")
        check(isinstance(x.shell, bool), "evaluate.external.shell", x.shell, "must be true or false")
        try:
            shlex.split(command)
        except ValueError as e:
            check(False, "evaluate.external.command", command, f"must split into arguments ({e})")
        check(isinstance(x.metrics_file, str) and x.metrics_file.strip() != "", "evaluate.external.metrics_file",
              x.metrics_file, "must be a file path (placeholders allowed)")
        check(isinstance(x.prefix, str), "evaluate.external.prefix", x.prefix, "must be a string (may be empty)")
        check_number(cfg, "evaluate.external.timeout_s", 0, lo_open=True)


def check_pair(cfg, key: str, ok, allowed: str) -> None:
    """A two-number list such as [lo, hi] or betas, checked by ok(a, b)."""
    v = OmegaConf.select(cfg, key)
    v = list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else v
    good = isinstance(v, list) and len(v) == 2 and all(is_number(x) for x in v) and ok(*v)
    check(good, key, v, allowed)


def _validate_teacher(cfg, request) -> None:
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
    elif t.kind == "timm":
        import timm
        check(timm.is_model(t.model), "teacher.model", t.model, "is not a timm model; see timm.list_models()")
    else:
        check(pre in ("package", "random") or resolve_path(pre).is_file(), "teacher.pretrained", pre,
              "must be `package`, `random` or a local state_dict file")
        check_number(cfg, "teacher.feature_stage", 1, 7, integer=True)
        needs = [k for k in ("cls", "cls_attention") if getattr(request, k)]
        check(not needs, "teacher.kind", t.kind, f"has no [CLS] token or attention, which method.name="
              f"{cfg.method.name} needs ({', '.join(needs)}); use a ViT teacher (open_clip or timm)")
    if t.kind in ("open_clip", "timm") and pre != "random" and not resolve_path(pre).is_file():
        problem = _pretrained_unavailable(t.kind, t.model, pre)
        check(problem is None, "teacher.pretrained", pre, f"cannot be loaded offline: {problem}",
              "Use a local file (teacher.pretrained=/path/to/weights) or download the weights into the cache "
              "first on a machine with network.")
    check_number(cfg, "teacher.input_size", 16, integer=True, optional=True)


@functools.lru_cache(maxsize=16)  # once per launch, not once per point
def _pretrained_unavailable(kind: str, model: str, tag: str) -> str | None:
    from core.teachers import pretrained_unavailable
    return pretrained_unavailable(kind, model, tag)


def resolve_path(path: str) -> Path:
    """A file named in the config: absolute, or relative to the repository (packaged assets)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else REPO / p
