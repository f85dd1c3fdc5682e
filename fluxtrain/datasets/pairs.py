"""Edit pairs: which control (reference) images in `control/` belong to which target image.

One rule, used by the dataset listing, the lint and the trainer. A control belongs to the target
whose stem it shares: `cat.jpg` in `control/` is the one reference of `cat.jpg`; `cat_0.jpg`,
`cat_1.jpg`, ... are its references in that order (several references, FLUX.2), the bare stem
counting before `_0`. A control whose stem is a target's own stem always pairs with that target, so
a target named `cat_0` keeps its bare control. The extension never matters (musubi-tuner's rule).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Role = Literal["target", "control"]
"""What an ingested image is: a training target (the default) or a control (reference) input."""
CONTROL_DIR = "control"
_NUMBERED = re.compile(r"(?P<stem>.+)_(?P<index>\d+)")


@dataclass(frozen=True)
class Pairing:
    """Each target stem's controls in reference order, and the controls no target claims."""

    controls: dict[str, list[Path]] = field(default_factory=dict)
    unpaired: list[Path] = field(default_factory=list)


def _order(target_stem: str, control: Path) -> tuple[int, int, str]:
    if control.stem == target_stem:
        return (0, -1, control.name)
    return (1, int(control.stem[len(target_stem) + 1 :]), control.name)


def pair_controls(target_stems: Iterable[str], controls: Iterable[Path]) -> Pairing:
    """Match control files to target stems by the rule above."""
    targets = set(target_stems)
    matched: dict[str, list[Path]] = {}
    unpaired: list[Path] = []
    for control in sorted(controls):
        numbered = _NUMBERED.fullmatch(control.stem)
        if control.stem in targets:
            owner = control.stem
        elif numbered is not None and numbered["stem"] in targets:
            owner = numbered["stem"]
        else:
            unpaired.append(control)
            continue
        matched.setdefault(owner, []).append(control)
    return Pairing(
        controls={stem: sorted(paths, key=lambda p, s=stem: _order(s, p)) for stem, paths in matched.items()},
        unpaired=unpaired,
    )
