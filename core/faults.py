"""Fault injection for the reliability tests: a real SIGKILL of this process at a named point.

A kill at a random moment rarely lands in the few microseconds between a checkpoint's rename and the
metric flush after it; `MIMSWEEP_FAULT=checkpoint.renamed@2` kills the process (SIGKILL, nothing runs
after it) the 2nd time it passes that point, so tests/test_reliability.py can hit that window every time.
Unset (always, outside tests) it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("MIMSWEEP_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
