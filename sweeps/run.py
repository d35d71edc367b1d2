"""mimsweep entry point: `python sweeps/run.py sweep=NAME [preset=...] [cluster=...] [key=value ...]`.

Expands the sweep's grid, validates every point, skips points already finished in MLflow, and runs
the rest locally or on a cluster. `--help` lists the sweeps and every config group.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from core.config import SEARCHPATH, ConfigError  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    from cluster.launch import Interrupted, LaunchError, launch

    try:
        code = launch(cfg, list(HydraConfig.get().overrides.task))
    except ConfigError as e:  # a user mistake, found before anything was created: exit 2
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Interrupted as e:  # Ctrl-C / SIGTERM: the runs are marked KILLED; 130 as a shell reports Ctrl-C
        print(f"error: {e}", file=sys.stderr)
        code = 130
    except LaunchError as e:  # failed after creating runs (they are marked FAILED): exit 1
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except Exception:  # a bug: show the traceback, but not Hydra's echo of the overrides (a URI's password)
        import os
        import traceback

        from core.tracking import redact_text
        uri = cfg.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
        print(redact_text(traceback.format_exc(), uri), file=sys.stderr)
        code = 1
    if code:  # hydra.main drops the return value: exit here so scripts and CI see the failure
        sys.exit(code)
    return 0


if __name__ == "__main__":
    # Hydra's overrides must be one run of arguments (`-m`, `--cfg job` before or after them): ours joins it.
    user_args = sys.argv[1:]
    first = next((i for i, a in enumerate(sys.argv[1:], 1) if "=" in a and not a.startswith("-")), len(sys.argv))
    sys.argv.insert(first, SEARCHPATH)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its own errors (a typo, a bad group option) ...
    from core.entry import finish
    try:
        main()
    except SystemExit as e:
        finish(e.code)
    except Exception as e:  # ... and they are printed in our style: one line, exit 2, no traceback
        from core.config import hydra_error
        msg = hydra_error(e, user_args)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        finish(2)
    finish(0)
