"""Fault injection for the reliability tests: a real SIGKILL of this process at a named point, or a pause there.

A kill at a random moment rarely lands in the few microseconds between a checkpoint's rename and the
metric flush after it; `MIMSWEEP_FAULT=checkpoint.renamed@2` kills the process (SIGKILL, nothing runs
after it) the 2nd time it passes that point, so tests/test_reliability.py can hit that window every time.

`MIMSWEEP_PACE=train.step=0.3` sleeps 0.3 s each time a process passes that point: a test that stops or kills a
launch in the middle of its training (tests/test_local_workers.py) keeps its points there for a known wall time
that costs no CPU. A step of the tests' tiny model takes ~40 ms, so a point of 100 of them could end, on a
loaded machine, before the test caught it.
Unset (always, outside tests) each costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import time

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


def pace(name: str) -> None:
    spec = os.environ.get("MIMSWEEP_PACE")
    if not spec:
        return
    target, _, seconds = spec.rpartition("=")
    if target == name:
        time.sleep(float(seconds))
