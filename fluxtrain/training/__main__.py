"""`python -m fluxtrain.training RUN_DIR` (or under `accelerate launch -m`): train one run directory.

Exit status: 0 when the run finished or was stopped by SIGTERM / SIGINT (at any point, set-up
included; what was trained is kept in `state/`), 2 when run.json or the dataset is invalid, 1 on
any other failure; every failure is also an `error` event with its message.
"""

from __future__ import annotations

import sys

from fluxtrain.training.stop import StopFlag

STOP = StopFlag()
if __name__ == "__main__":
    STOP.install()

import logging  # noqa: E402 - a stop request is honoured before anything slow is imported
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from fluxtrain.errors import FluxtrainError  # noqa: E402
from fluxtrain.rundir import EventWriter, RunDir  # noqa: E402
from fluxtrain.training.config import load_config  # noqa: E402

USAGE = "usage: python -m fluxtrain.training RUN_DIR"


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def main(argv: list[str]) -> int:
    """Run the trainer on the run directory named by `argv`; returns the exit status."""
    STOP.install()
    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    run_dir = RunDir(Path(argv[0]).resolve())
    if not run_dir.root.is_dir():
        print(f"run directory {run_dir.root} does not exist", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if _is_main_process() else logging.WARNING,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(message)s",
        force=True,
    )
    errors = EventWriter(run_dir.events, enabled=_is_main_process())
    try:
        config = load_config(run_dir.config)
    except FluxtrainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        errors.emit("error", message=exc.message, kind="config")
        return 2
    from fluxtrain.training.trainer import Trainer

    try:
        outcome = Trainer(run_dir.root, config, stop=STOP).run()
    except FluxtrainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        errors.emit("error", message=exc.message, kind="input")
        return 2
    except Exception as exc:
        traceback.print_exc()
        errors.emit("error", message=f"{type(exc).__name__}: {exc}", kind="internal")
        return 1
    finally:
        errors.close()
    print(f"run {outcome}", flush=True)
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    STOP.settle()
    sys.exit(status)
