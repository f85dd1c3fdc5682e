"""Which lines of `train.log` are the trainer's own, for the short log a status shows.

Libraries write to the same stderr: Python `warnings` (with the source line they echo),
transformers' and diffusers' notices, tqdm progress bars. They stay in `train.log`; the status
keeps to the lines a person watching the run needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WARNING = re.compile(
    r"^\S.*:\d+: (\w+\.)*\w*(Warning|Deprecation\w*)\b:"  # path.py:12: FutureWarning: ...
    r"|^(\w+\.)*\w*Warning: "  # UserWarning: ... printed without a location
    r"|^\s+warnings\.warn\("  # the source line Python echoes under a warning
    r"|^\s*warn\("
)
_TQDM = re.compile(r"\d+%\|.*\||\|\s*\d+/\d+\s*\[[\d:?]+<[\d:?]+")
_LIBRARY = re.compile(
    r"^\[(transformers|diffusers|huggingface_hub|accelerate|peft|torch)\] "  # transformers' own notices
    r"|^(`\w+` is deprecated|The following generation flags|Some weights of|You are using a model of type"
    r"|Loading checkpoint shards|Fetching \d+ files|Keyword arguments \{.*\} are not expected)"
)


def is_library_noise(line: str) -> bool:
    """Whether a log line comes from a library's warnings or progress bars rather than the trainer."""
    text = line.rsplit("\r", 1)[-1]
    if not text.strip():
        return True
    return bool(_WARNING.search(text) or _TQDM.search(text) or _LIBRARY.search(text))


def trainer_lines(lines: Iterable[str], count: int) -> list[str]:
    """The last `count` lines that are not library noise, oldest first."""
    kept = [line for line in lines if not is_library_noise(line)]
    return kept[-count:] if count > 0 else []
