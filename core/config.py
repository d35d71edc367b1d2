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
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# MLflow 3's telemetry client runs in a thread of every process that imports mlflow and rewrites this process's
# environment (_MLFLOW_TELEMETRY_SESSION_ID) while launches and jobs read it: off in our processes (and the jobs
# they start inherit it). Every entry point imports this module before mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "sweeps" / "conf"
METHOD_ENTRY_POINTS = "mimsweep.methods"   # the entry-point group of methods from other packages (core/methods)


def cache_dir() -> Path:
    """mimsweep's cache on this machine (the launch's timings, an empty MLflow store per version):
    $MIMSWEEP_CACHE, else $XDG_CACHE_HOME/mimsweep (~/.cache/mimsweep). The tests give it a folder of their own:
    timings taken while the suite loads the machine would otherwise be a user's estimates for a week."""
    folder = os.environ.get("MIMSWEEP_CACHE")
    return Path(folder) if folder else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimsweep"


def to_yaml(cfg) -> str:
    """`OmegaConf.to_yaml(cfg, resolve=True)`, the same text, through libyaml's C emitter where PyYAML has it:
    about 3x faster here (34 -> 12 ms a resolved config), which a 1,000-point launch (a `config.yaml` per run
    and per SLURM task) feels. OmegaConf's own representer quotes a string that would read back as a bool or
    a number (tests/test_config.py compares both on every sweep's default row, with and without preset=paper)."""
    import yaml
    dumper = _fast_dumper()
    if dumper is None:
        return OmegaConf.to_yaml(cfg, resolve=True)
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return yaml.dump(container, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=dumper)


@functools.lru_cache(maxsize=1)
def _fast_dumper():
    """OmegaConf's dumper on libyaml's CDumper; None where PyYAML was built without libyaml."""
    import yaml
    from omegaconf._utils import OmegaConfDumper
    if not getattr(yaml, "__with_libyaml__", False):
        return None
    dumper = type("FastOmegaConfDumper", (yaml.CDumper,), {})
    dumper.add_representer(str, OmegaConfDumper.str_representer)
    return dumper


def _plugin_config_dirs() -> list[str]:
    """The `conf/` folder of each installed package that declares a method entry point: a plug-in's
    `conf/method/<name>.yaml` joins the `method` group without a word from the user."""
    from importlib.metadata import entry_points
    from importlib.util import find_spec
    dirs = []
    for ep in entry_points(group=METHOD_ENTRY_POINTS):
        spec = find_spec(ep.value.split(":")[0].split(".")[0])
        for root in (spec.submodule_search_locations or []) if spec else []:
            if (Path(root) / "conf").is_dir() and f"file://{Path(root) / 'conf'}" not in dirs:
                dirs.append(f"file://{Path(root) / 'conf'}")
    return dirs


# The `cluster` group lives in cluster/ (one file per cluster profile), found through the repo root; then
# the config folders of installed method plug-ins.
SEARCH_DIRS = [f"file://{REPO}"] + _plugin_config_dirs()
SEARCHPATH = f"hydra.searchpath=[{','.join(SEARCH_DIRS)}]"


def config_groups_text() -> str:
    """`group: option, option, ...` lines of every config group on the search path (SEARCHPATH included: the
    `cluster` profiles and plug-ins' methods), for `--help` (`${mimsweep_groups:}` in sweeps/conf/hydra/help/).
    Hydra's own `$APP_CONFIG_GROUPS` lists the groups before the command line's search path applies, so it
    misses `cluster`. Read from the folders (a group = a folder of YAML files), not through Hydra's loader:
    Hydra resolves this at every composition, and the loader's listing takes ~0.3 s."""
    roots = [CONFIG_DIR] + [Path(d[len("file://"):]) for d in SEARCH_DIRS]
    groups: dict[str, set] = {}
    for root in roots:
        for folder in (p for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
            options = {f.stem for f in folder.glob("*.yaml")}
            if options:
                groups.setdefault(folder.name, set()).update(options)
    return "\n".join(f"{g}: {', '.join(sorted(o))}" for g, o in sorted(groups.items()))


OmegaConf.register_new_resolver("mimsweep_groups", config_groups_text, replace=True)

RUN_ONLY = (
    "recipe",  # the name and sources of a preset's recipe: its values are the config's own keys
    "cluster", "tracking", "sweep", "output_root", "dry_run", "retry_failed", "reuse", "device", "report_dir", "estimate",
    "pretrain.checkpoint_every", "pretrain.log_every", "pretrain.compile", "data.num_workers", "data.root", "evaluate.batch_size",
)


class ConfigError(ValueError):
    """A user mistake in the config: names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value, allowed: str, hint: str = ""):
        self.key, self.value = key, value
        msg = f"{key}={value!r} is invalid: {allowed}."
        super().__init__(msg + (f" {hint}" if hint else ""))


# Keys a check reads though no config file sets them: absent means their documented default. They were
# added this way so that no existing point's signature changed (a signature hashes every key).
OPTIONAL_KEYS = ("pretrain.epochs_scale",)   # sweeps/conf/pretrain/default.yaml says what it does


def unknown_key(key: str, value, known) -> ConfigError:
    """The error for a key no config has, with a did-you-mean from the real keys."""
    import difflib
    if key in OPTIONAL_KEYS:
        return ConfigError(key, value, "is optional and absent by default", f"Add it with +{key}={value}.")
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
        swept = _set_by_sweep(key, o.split("=", 1)[1], by_key.get("sweep", "").partition("=")[2])
        if swept is not None:
            return str(swept)
        # the real keys, for the did-you-mean: the same command line without this override (none if it has
        # another mistake)
        known = _keys_with([x for x in overrides if x != o and "=" in x and not x.startswith("hydra")])
        return str(unknown_key(key, o.split("=", 1)[1], known))
    return " ".join(lines[:1] + ([str(cause).splitlines()[0]] if cause is not None and str(cause) else []))


def _set_by_sweep(key: str, value, sweep: str) -> ConfigError | None:
    """The error for an override of a key that only the sweep's own configs have (the points of
    `sweep=maskalign_topk` select method=maskalign, whose `method.top_k` the default method lacks):
    the sweep sets it (grid, points, fixed), or a group choice of its `fixed` brings it (`++KEY=VALUE`)."""
    path = CONFIG_DIR / "sweep" / f"{sweep}.yaml"
    if not sweep or not path.is_file():
        return None
    spec = OmegaConf.load(path)
    key_of = lambda o: str(o).split("=", 1)[0].lstrip("+~")  # noqa: E731
    fixed = [str(o) for o in spec.get("fixed") or []]
    if key in (spec.get("grid") or {}):
        return ConfigError(key, value, f"the sweep {sweep} sweeps this key (grid values {list(spec.grid[key])}) and "
                           "its grid would replace this override", f"To change the grid: 'sweep.grid={{{key}:[{value}]}}'"
                           " (a list of values), or a new file in sweeps/conf/sweep/.")
    if any(key_of(o) == key for p in spec.get("points") or [] for o in p.get("overrides") or []):
        return ConfigError(key, value, f"the points of sweep {sweep} set this key and would replace this override",
                           "Change the points (sweep.points=[...]) or write a new file in sweeps/conf/sweep/.")
    if any(key_of(o) == key for o in fixed):
        return ConfigError(key, value, f"the sweep {sweep} fixes this key (fixed: {fixed}) and would replace this "
                           "override", "Change the sweep's fixed overrides (sweep.fixed=[...]) or write a new file in "
                           "sweeps/conf/sweep/.")
    choices = [o for o in fixed if "." not in key_of(o)]
    if choices and key in _keys_with(choices):
        return ConfigError(key, value, f"only the sweep's own choice ({', '.join(choices)}) has this key, and the "
                           "command line is read before the sweep's choices apply", f"Write it as ++{key}={value}.")
    return None


def _keys_with(overrides: list[str]) -> dict:
    """The flattened keys of the config composed with these overrides (for error messages only)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return flatten(compose("config", overrides=[SEARCHPATH, *overrides]))
    except Exception:  # noqa: BLE001 - a message helper: no keys rather than a second error
        return {}


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


@functools.lru_cache(maxsize=8192)
def under(key: str, prefixes: tuple) -> bool:
    """Whether a flattened key is one of `prefixes` or below one (asked for every key of every point of a grid:
    cached)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def science_params(cfg, flat: dict | None = None) -> dict:
    """The flattened config without the run-only keys: what determines the result (`flat`: flatten(cfg) if
    the caller has it)."""
    return {k: v for k, v in (flat if flat is not None else flatten(cfg)).items() if not under(k, RUN_ONLY)}


def signature(cfg, flat: dict | None = None) -> str:
    blob = json.dumps(science_params(cfg, flat), sort_keys=True, default=str)
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


def check_model(cfg) -> None:
    """The `model` group (ConfigError on the first bad key)."""
    m = cfg.model
    for key in ("input_size", "patch_size", "embed_dim", "depth", "num_heads"):
        check_number(cfg, f"model.{key}", 1, integer=True)
    check(m.input_size % m.patch_size == 0, "model.input_size", m.input_size,
          f"must be a multiple of model.patch_size={m.patch_size}")
    check(m.embed_dim % m.num_heads == 0, "model.embed_dim", m.embed_dim,
          f"must be divisible by model.num_heads={m.num_heads}")
    check(m.embed_dim % 4 == 0, "model.embed_dim", m.embed_dim, "must be a multiple of 4 (2-D sin-cos position embedding)")
    check_number(cfg, "model.drop_path", 0, 1, hi_open=True)


def check_pretrain(cfg) -> None:
    """The `pretrain` group."""
    p = cfg.pretrain
    check_number(cfg, "pretrain.epochs", 0, integer=True, lo_open=True)
    check_number(cfg, "pretrain.batch_size", 1, integer=True)
    check_number(cfg, "pretrain.base_lr", 0, lo_open=True)
    check_number(cfg, "pretrain.min_lr", 0)
    check_number(cfg, "pretrain.weight_decay", 0)
    check_pair(cfg, "pretrain.betas", lambda b1, b2: 0 <= b1 < 1 and 0 <= b2 < 1, "must be [beta1, beta2] in [0, 1)")
    check_number(cfg, "pretrain.warmup_epochs", 0)
    check_number(cfg, "pretrain.epochs_scale", 0, lo_open=True, optional=True)
    check(p.warmup_epochs <= p.epochs, "pretrain.warmup_epochs", p.warmup_epochs,
          f"must not exceed pretrain.epochs={p.epochs}")
    check_in(cfg, "pretrain.precision", ("fp32", "bf16", "fp16"))
    check(p.precision != "fp16" or on_cuda(cfg), "pretrain.precision", p.precision,
          f"needs a CUDA GPU (autocast + grad scaler), and this point runs on the CPU ({where(cfg)})",
          "Use bf16 or fp32 on a CPU.")
    c = p.get("compile", "auto")
    check(c == "auto" or isinstance(c, bool), "pretrain.compile", c, "must be auto, true or false",
          "auto = torch.compile on CUDA, eager on CPU.")
    check_number(cfg, "pretrain.grad_clip", 0, lo_open=True, optional=True)
    check_number(cfg, "pretrain.max_steps", 1, integer=True, optional=True)
    check_number(cfg, "pretrain.checkpoint_every", 1, integer=True)
    check_number(cfg, "pretrain.log_every", 1, integer=True)


def on_cuda(cfg) -> bool:
    """Whether the point will run on a CUDA GPU: `device`, and for `auto` where it runs (this machine for a
    local launch, a SLURM task with cluster.gpus_per_task > 0)."""
    if cfg.device != "auto":
        return cfg.device == "cuda"
    if cfg.cluster.get("backend") == "slurm":
        return bool(cfg.cluster.get("gpus_per_task"))
    import torch
    return torch.cuda.is_available()


def where(cfg) -> str:
    """Why on_cuda(cfg) said no, in words."""
    if cfg.device != "auto":
        return f"device={cfg.device}"
    if cfg.cluster.get("backend") == "slurm":
        return "device=auto in a SLURM task with cluster.gpus_per_task=0"
    return "device=auto, and this machine has no CUDA GPU"


def check_run(cfg) -> None:
    """The top-level keys: task, device, reuse, seed, and the tracking store's patience."""
    check_number(cfg, "tracking.outage_wait_s", 0, optional=True)
    check_in(cfg, "task", ("train", "flops"))
    check_in(cfg, "device", ("auto", "cpu", "cuda"))
    if cfg.device == "cuda" and cfg.cluster.get("backend") != "slurm":
        import torch
        check(torch.cuda.is_available(), "device", "cuda", "this machine has no CUDA GPU (a local launch runs here)",
              "Use device=auto or cpu, or cluster=slurm with cluster.gpus_per_task >= 1.")
    check_in(cfg, "reuse", ("store", "experiment", "none"))
    check_in(cfg, "estimate", ("auto", True, False))
    check_number(cfg, "seed", 0, integer=True)


def check_list(cfg, key: str, ok, allowed: str, nonempty: bool = True) -> list:
    """A list whose every item passes ok(item); returns it as a plain list."""
    v = OmegaConf.select(cfg, key)
    v = list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else v
    check(isinstance(v, list) and (len(v) > 0 or not nonempty) and all(ok(x) for x in v), key, v, allowed)
    return v


def check_pair(cfg, key: str, ok, allowed: str) -> None:
    """A two-number list such as [lo, hi] or betas, checked by ok(a, b)."""
    v = OmegaConf.select(cfg, key)
    v = list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else v
    good = isinstance(v, list) and len(v) == 2 and all(is_number(x) for x in v) and ok(*v)
    check(good, key, v, allowed)


def resolve_path(path: str) -> Path:
    """A file named in the config: absolute, or relative to the repository (packaged assets)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else REPO / p


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity: what SLURM or taskset bound it to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
