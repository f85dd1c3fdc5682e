"""Stop requests: SIGTERM / SIGINT, and the death of the process that launched the trainer.

Installed first thing in `python -m fluxtrain.training`, before torch is imported, so a stop sent
during the seconds of start-up is honoured like any other (state kept, exit 0). On Linux the
trainer also asks for SIGTERM when its parent dies: under `accelerate launch`, a SIGTERM sent to
the launcher alone kills it at once, and the trainer would otherwise train on unseen.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def _signal_on_parent_death() -> bool:
    """Ask the kernel for SIGTERM when the parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
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
