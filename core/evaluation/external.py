"""The `external` protocol: a user command (detectron2, mmsegmentation, anything) run after pre-training.

`evaluate.external.command` is a template; `{checkpoint}` (the encoder as a timm state_dict,
`timm_kwargs.json` beside it), `{output_dir}` (a folder for this run's evaluation, under the job's work
directory) and `{run_id}` (the MLflow run) are substituted. Without `shell`, the template is split
with shlex first and the placeholders are replaced inside each argument, so a path with spaces stays
one argument and nothing is interpreted by a shell; with `evaluate.external.shell=true` the substituted
values are shell-quoted and /bin/sh runs the line. Other braces in the template are left alone.

The command's stdout/stderr go to `<output_dir>/external.log`. After it exits 0, its metrics file
(`evaluate.external.metrics_file`, placeholders substituted) is read: a JSON object (nested objects
flattened with '/') or `key=value` lines ('#' comments and blank lines skipped); every value must be a
number. The metrics are returned with `evaluate.external.prefix` prepended and land in the same run.
"""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import torch

PLACEHOLDERS = ("checkpoint", "output_dir", "run_id")


class ExternalEvalError(RuntimeError):
    pass


def substitute(text: str, values: dict, quote: bool = False) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", shlex.quote(v) if quote else v)
    return text


def argv(command: str, values: dict, shell: bool):
    """-> what subprocess.run takes: a list of arguments, or one shell line when shell is true."""
    if shell:
        return substitute(command, values, quote=True)
    return [substitute(a, values) for a in shlex.split(command)]


def parse_metrics(text: str, source: str) -> dict[str, float]:
    def number(k, v):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ExternalEvalError(f"{source}: metric {k!r} is {v!r}, not a number")
        try:
            return float(v)
        except ValueError:
            raise ExternalEvalError(f"{source}: metric {k!r} is {v!r}, not a number") from None

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}/")
            else:
                yield f"{prefix}{k}", number(f"{prefix}{k}", v)

    if text.lstrip().startswith("{"):
        return dict(flat(json.loads(text)))
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ExternalEvalError(f"{source}:{i}: expected key=value, got {line[:80]!r}")
        k, v = (s.strip() for s in line.split("=", 1))
        out[k] = number(k, v)
    return out


def run(encoder, cfg, workdir, run_id: str | None) -> dict:
    x = cfg.evaluate.external
    out = Path(workdir or ".").resolve() / "external"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "encoder_timm.pth"
    torch.save(encoder.timm_state_dict(), ckpt)
    (out / "timm_kwargs.json").write_text(json.dumps({"model_name": "vit_base_patch16_224", **encoder.timm_kwargs(cfg.evaluate.pool)}))
    values = {"checkpoint": str(ckpt), "output_dir": str(out), "run_id": run_id or ""}
    metrics_file = Path(substitute(x.metrics_file, values))
    metrics_file.unlink(missing_ok=True)  # a stale file from an earlier attempt must not count
    log = out / "external.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(argv(x.command, values, x.shell), shell=bool(x.shell), cwd=out, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=x.timeout_s)
        except subprocess.TimeoutExpired:
            raise ExternalEvalError(f"evaluate.external.command ran past evaluate.external.timeout_s="
                                    f"{x.timeout_s}; its output is in {log}") from None
        except FileNotFoundError as e:
            raise ExternalEvalError(f"evaluate.external.command: {e.strerror}: {e.filename}") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise ExternalEvalError(f"evaluate.external.command exited with {proc.returncode}: {tail[0][:300]} "
                                f"(full output in {log})")
    if not metrics_file.is_file():
        raise ExternalEvalError(f"evaluate.external.command wrote no metrics file at {metrics_file}")
    metrics = parse_metrics(metrics_file.read_text(), str(metrics_file))
    return {f"{x.prefix}{k}": v for k, v in metrics.items()}
