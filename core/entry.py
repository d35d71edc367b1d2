"""How our entry points end: as Python ends, less the module teardown.

A process that has imported torch, timm and MLflow spends 1-1.5 CPU-seconds after its last line tearing
those modules down (measured on a 2-core machine at ~350 GFLOP/s: `import torch, timm, mlflow` then exit,
4.9 s against 3.4 s with the teardown skipped; torch alone 1.7 against 1.2 s), and nobody sees its result.
Every launch, status table, report and SLURM task paid it. `finish(code)` does what Python's exit does that
can be seen: it stops and waits for the non-daemon threads (threading's shutdown), runs the atexit handlers
(MLflow's run and logging queues, logging's flush, multiprocessing's and tempfile's clean-up), flushes standard
output and error, then ends the process with `os._exit`, as multiprocessing's own children end.
tests/test_entry.py checks each of those.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def finish(code=0) -> NoReturn:
    """End this process with `code`, read as `sys.exit` reads it (None: 0; a message: printed, 1)."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    # CPython's own two steps, in its order: threading's shutdown (its exit hooks, which stop e.g.
    # concurrent.futures' workers, then a join of every non-daemon thread), then the atexit handlers
    shutdown, run_exitfuncs = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:  # another Python: its full exit
        sys.exit(code)
    shutdown()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed, or a broken pipe: as Python's own exit ignores it
            pass
    os._exit(code & 0xFF)


def run(main, *args) -> NoReturn:
    """`finish(main(*args))`; a SystemExit out of `main` gives its code. Any other exception goes on up, to
    Python's own exit (its traceback printed, status 1)."""
    try:
        code = main(*args)
    except SystemExit as e:
        code = e.code
    finish(code)
