"""The one rule for the model paths a run names (`pretrained_model`, `clip_l`, `t5xxl`, `ae`).

`/train` and the trainer both resolve through `resolve_model_path`, so a file one accepts the
other accepts too. A value is relative to the models root (`FS_PATH`) and may not climb out of
it by its own text: absolute paths and `..` that leaves the root are refused. The check is on the
text, not on the resolved file, so a symbolic link an administrator placed inside the root is
followed wherever it points (models are often shared from another mount).
"""

from __future__ import annotations

import os
from pathlib import Path

from fluxtrain.errors import InvalidInputError, NotFoundError

MODEL_FIELDS = ("pretrained_model", "clip_l", "t5xxl", "ae")


def resolve_model_path(models_root: Path, field: str, value: str) -> Path:
    """The existing file or folder that `value` names under `models_root`; errors name `field`."""
    if not value or "\x00" in value:
        raise InvalidInputError(f"{field}: must be a non-empty path relative to the models folder")
    if Path(value).is_absolute():
        raise InvalidInputError(f"{field}: '{value}' must be a path relative to the models folder")
    root = Path(os.path.normpath(models_root.absolute()))
    path = Path(os.path.normpath(root / value))
    if not path.is_relative_to(root) or path == root:
        raise InvalidInputError(f"{field}: '{value}' leaves the models folder")
    if not path.exists():
        raise NotFoundError(f"{field}: model file '{value}' not found in {models_root}")
    return path
