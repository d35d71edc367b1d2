"""Checks of everything a launch turns into files, folders, `#SBATCH` lines or commands.

Called by cluster/launch.py before the tracking store is opened: a bad value stops the launch with
`error: KEY=VALUE is invalid: ...` (exit 2) and nothing created, submitted or run. The point configs
themselves are validated by core/config.py; this module covers the keys that only say where and how
points run (the `cluster` group, `output_root`, the experiment and sweep names, the tracking URI).

The rules, and why:
- no string may hold a newline or another control character: one newline in a value written into the
  sbatch script starts a new shell line (that is how `cluster.account='x<newline>rm -rf ~'` would run);
- values of `#SBATCH --key=value` lines (partition, account, qos, constraint) are plain tokens of the
  characters SLURM's own names and feature expressions use, so no quoting is ever needed;
- resource numbers are integers in the range SLURM accepts (no bools, no strings, no floats);
- names that become folders (experiment) hold no path separator and are not `.`/`..`.
Paths (output_root, the repository, the interpreter) may contain spaces: cluster/slurm.py quotes them.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from core.config import ConfigError

BACKENDS = ("local", "slurm")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Partition/account/qos names (comma-separated lists for partitions) and feature expressions
# (`a100|h100`, `gpu&[rack1*2]`), never whitespace, quotes, `$`, `;` or backslashes.
TOKEN = {"partition": (r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*", "_ . + - and commas between names"),
         "account": (r"[A-Za-z0-9_.+@-]+", "_ . + - @"),
         "qos": (r"[A-Za-z0-9_.+-]+", "_ . + -"),
         "constraint": (r"[A-Za-z0-9_.,:|&*()\[\]!+-]+", "_ . , : | & * ( ) [ ] ! + -")}


def text(key: str, value, optional: bool = True, what: str = "text") -> None:
    """A string without control characters (newlines included)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or value == "":
        raise ConfigError(key, value, f"must be a non-empty {what}")
    m = CONTROL.search(value)
    if m:
        raise ConfigError(key, value, f"contains the control character {m.group()!r} at position {m.start()}: "
                          "newlines and other control characters could start a new line of the job script",
                          "Remove it.")


def token(key: str, value, kind: str, what: str) -> None:
    if value is None:
        return
    text(key, value)
    pattern, allowed = TOKEN[kind]
    if not re.fullmatch(pattern, value):
        raise ConfigError(key, value, f"must be a {what}: letters, digits and {allowed} only, no spaces")


def integer(key: str, value, lo: int, hi: int | None = None, hint: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(key, value, f"must be an integer {rng}", hint)


def name(key: str, value) -> None:
    """A name that becomes a folder and appears in the job script (experiment)."""
    text(key, value, optional=True, what="name")
    if value is not None and (any(c in value for c in '/\\"') or value.strip(". ") == ""):
        raise ConfigError(key, value, 'must be a name without /, \\ or ", and not only dots or spaces')


def validate_cluster(cl, prefix: str = "cluster") -> None:
    """The whole `cluster` group (any profile). Raises ConfigError naming the first bad key."""
    backend = cl.get("backend")
    if backend not in BACKENDS:
        raise ConfigError(f"{prefix}.backend", backend, "must be one of " + ", ".join(BACKENDS),
                          "Pick a profile with cluster=local or cluster=slurm (or cluster=<your site file>).")
    integer(f"{prefix}.max_attempts", cl.get("max_attempts", 3), 1, 1000)
    if backend != "slurm":
        if cl.get("workers", 1) != "auto":
            integer(f"{prefix}.workers", cl.get("workers", 1), 1, 1024,
                    hint="How many points run at once on this machine; auto = one per CPU core (1 on a GPU).")
        return
    for key, what in (("partition", "partition name (or comma-separated list)"), ("account", "account name"),
                      ("qos", "QOS name"), ("constraint", "feature expression")):
        token(f"{prefix}.{key}", cl.get(key), key, what)
    _resources(cl, prefix)
    integer(f"{prefix}.array_parallelism", cl.get("array_parallelism"), 1)
    integer(f"{prefix}.max_requeues", cl.get("max_requeues"), 0, 1000)
    integer(f"{prefix}.signal_delay_s", cl.get("signal_delay_s"), 0, 65535)
    limit_s = cl.time_min * 60
    if cl.signal_delay_s >= limit_s:
        raise ConfigError(f"{prefix}.signal_delay_s", cl.signal_delay_s,
                          f"must be shorter than the time limit ({prefix}.time_min={cl.time_min} = {limit_s} s)",
                          "Otherwise the job is told to checkpoint and requeue as soon as it starts.")
    if cl.get("separate_eval") not in (True, False):
        raise ConfigError(f"{prefix}.separate_eval", cl.get("separate_eval"), "must be true or false")
    if cl.separate_eval:
        if cl.get("eval") is None:
            raise ConfigError(f"{prefix}.eval", None, "must give the evaluation array's resources")
        _resources(cl.eval, f"{prefix}.eval")
    setup = cl.get("setup")
    if setup is not None:
        if isinstance(setup, str) or not hasattr(setup, "__iter__"):
            raise ConfigError(f"{prefix}.setup", setup, "must be a list of shell lines")
        for i, line in enumerate(setup):
            text(f"{prefix}.setup[{i}]", line, optional=False, what="shell line")
    python = cl.get("python")
    text(f"{prefix}.python", python, what="path to a python interpreter")
    if python is not None and not (setup and "/" not in python):  # a bare name may come from a setup line
        found = shutil.which(python)
        if found is None:
            raise ConfigError(f"{prefix}.python", python, "is not an executable on this machine" + (
                "" if "/" in python else " (not on PATH)"), "Give the interpreter the nodes run, at a path they "
                "share with this machine (null = the one running sweeps/run.py).")


def _resources(res, prefix: str) -> None:
    integer(f"{prefix}.time_min", res.get("time_min"), 1, hint="SLURM's --time, in minutes.")
    integer(f"{prefix}.cpus_per_task", res.get("cpus_per_task"), 1)
    integer(f"{prefix}.mem_gb", res.get("mem_gb"), 1, hint="Memory per node in GiB.")
    integer(f"{prefix}.gpus_per_task", res.get("gpus_per_task"), 0, 64)


def validate(cfg, sweep_name: str) -> None:
    """Everything of a launch that becomes a file, folder, `#SBATCH` line or command, beyond the point
    configs: run before the tracking store is opened."""
    text("output_root", cfg.get("output_root"), optional=False, what="path")
    if cfg.get("sweep") is not None:
        name("sweep.name", sweep_name)
    name("tracking.experiment", cfg.tracking.get("experiment"))
    text("tracking.uri", cfg.tracking.get("uri"), what="URI")
    validate_cluster(cfg.cluster)


# What MLflow's tracking client accepts: a server, a SQL store (SQLAlchemy URL, `postgresql+psycopg2://`
# included), the file store, Databricks.
URI_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
REACH_TIMEOUT_S = 5.0


def tracking_uri(uri: str, shown: str) -> None:
    """The scheme is one MLflow takes, and a server (or database host) answers within REACH_TIMEOUT_S:
    MLflow's own HTTP retries take minutes to give up on a server that is down."""
    from core.net import reachable
    scheme = uri.split(":", 1)[0].split("+")[0].lower() if "://" in uri or uri.startswith("databricks") else ""
    if scheme not in URI_SCHEMES:
        raise ConfigError("tracking.uri", shown, "must be an MLflow tracking URI: " + ", ".join(
            f"{s}://" for s in URI_SCHEMES[:-1]) + " or databricks", "e.g. tracking.uri=http://HOST:5000 or "
            "sqlite:////abs/path/mlflow.db (default: a SQLite file under output_root).")
    if scheme in ("sqlite", "file", "databricks"):
        return
    problem = reachable(uri, REACH_TIMEOUT_S)
    if problem:
        raise ConfigError("tracking.uri", shown, f"the MLflow store cannot be reached ({problem})",
                          "Start the server or fix the URI; nothing was run.")


def checkpoint_bytes(cfg) -> int:
    """Disk a point's checkpoint takes, estimated from the config: the encoder's parameters (12 L D^2 for
    the blocks + patch and position embeddings), doubled for the method's decoder / heads / adaptors,
    times 3 for the weights and AdamW's two moments, 4 bytes each."""
    m = cfg.model
    grid = (m.input_size // m.patch_size) ** 2
    encoder = 12 * m.depth * m.embed_dim ** 2 + (m.patch_size ** 2 * cfg.data.channels + grid + 2) * m.embed_dim
    return 2 * encoder * 3 * 4


def model_fits(cfg, overrides: list[str], memory_bytes: int, where: str) -> None:
    """The point's model with its gradients and AdamW state (4 copies of the parameters: checkpoint_bytes
    holds 3) fits the memory it trains in. Named by the `model` key the command line or the sweep changed:
    a typo like model.embed_dim=100000 would otherwise only show as a disk-space error."""
    need = checkpoint_bytes(cfg) * 4 // 3
    if need <= memory_bytes:
        return
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if o.lstrip("+~").startswith("model")]
    key = keys[-1] if keys else "model"
    value = cfg.model.name if key == "model" else OmegaConf.select(cfg, key)
    raise ConfigError(key, value, f"gives a model whose weights, gradients and AdamW state alone need about "
                      f"{_size(need)}, more than {where} ({_size(memory_bytes)})", "Pick a smaller model.")


def output_folder(root, need_bytes: int | None = None) -> None:
    """output_root (or its nearest existing ancestor: a dry run creates nothing) is writable and, when
    `need_bytes` is given, has that much free space. Read only: nothing is created here."""
    path = Path(root).resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("output_root", str(root), f"{probe} is not a writable folder" + (
            "" if probe == path else f" (the nearest existing part of {path})"),
                          "Pick a folder you can write to (output_root=/a/writable/folder).")
    fs = os.statvfs(probe)
    if fs.f_blocks == 0:  # /proc, /sys, ...: a filesystem with no blocks stores no files
        raise ConfigError("output_root", str(root), f"{probe} is on a virtual filesystem that stores no files",
                          "Pick a folder on a disk (output_root=/a/writable/folder).")
    if need_bytes is not None:
        free = shutil.disk_usage(probe).free
        if free < need_bytes:
            raise ConfigError("output_root", str(root), f"{probe} has {_size(free)} free, and the points to run need "
                              f"about {_size(need_bytes)} for their checkpoints (model + AdamW state each, "
                              "plus a margin)", "Free some space or pick another output_root.")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
