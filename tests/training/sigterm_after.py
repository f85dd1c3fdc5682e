"""Test helper: `python tests/training/sigterm_after.py EVENT[:STEP] RUN_DIR` runs the real trainer entry
point and sends this process SIGTERM right after it writes the named event (a `step` event: that
step's), so a stop lands at an exact point of the real loop instead of whenever a timer fires.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from fluxtrain.rundir import EventWriter
from fluxtrain.training import __main__ as entry


def _arm(event: str, step: int | None) -> None:
    emit = EventWriter.emit

    def emit_then_signal(self: EventWriter, name: str, **fields: Any) -> None:
        emit(self, name, **fields)
        if name == event and (step is None or fields.get("step") == step):
            os.kill(os.getpid(), signal.SIGTERM)

    EventWriter.emit = emit_then_signal  # type: ignore[method-assign]


if __name__ == "__main__":
    name, _, at = sys.argv[1].partition(":")
    _arm(name, int(at) if at else None)
    sys.exit(entry.main(sys.argv[2:]))
