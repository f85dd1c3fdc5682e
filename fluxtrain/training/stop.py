"""Stop requests: SIGTERM / SIGINT, and the death of the process that launched the trainer.

Installed first thing in `python -m fluxtrain.training`, before torch is imported, so a stop sent
during the seconds of start-up is honoured like any other (state kept, exit 0). Started by a
launcher (`accelerate launch`, torchrun), the trainer on Linux also asks for SIGTERM when the
launcher dies: a SIGTERM sent to the launcher alone kills it at once, and the trainer would
otherwise train on unseen. Started by hand (`python -m ...` under nohup), it outlives its shell.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
# Set in the trainer's environment by `accelerate launch` and by torchrun respectively.
LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")


def _signal_on_parent_death() -> bool:
    """Under a launcher, ask the kernel for SIGTERM when it dies; False when not asked."""
    if not sys.platform.startswith("linux") or not any(name in os.environ for name in LAUNCHER_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class StopFlag:
    """Set by SIGTERM / SIGINT; the trainer checks it between set-up phases and at each step boundary."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        parent = os.getppid()
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        if _signal_on_parent_death() and os.getppid() != parent:
            self.requested = True  # the parent died before the request was in place

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def settle(self) -> None:
        """Ignore SIGTERM / SIGINT from here on: the run has ended and has nothing left to save.

        At interpreter shutdown Python puts the default action back in place of a Python handler
        (not of SIG_IGN), so a stop arriving during the second or two torch takes to tear down
        would otherwise kill a finished trainer with 143, and its launcher would exit 1.
        """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
