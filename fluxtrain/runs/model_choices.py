"""The model files and folders under the models root that a `/train` request may name.

Paths are given relative to the root, as `/train` takes them. The walk never follows a link
out of the root and stops after MAX_ENTRIES, so a huge share cannot stall the answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fluxtrain.settings import Settings

WEIGHT_SUFFIXES = frozenset({".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin"})
FOLDER_MARKERS = ("model_index.json", "config.json")
MAX_DEPTH = 4
MAX_ENTRIES = 2000


@dataclass(frozen=True)
class ModelChoice:
    path: str
    kind: str
    size: int | None


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


def list_model_choices(*, settings: Settings) -> list[ModelChoice]:
    """Weight files and model folders (a `config.json` or `model_index.json` inside), sorted by path."""
    root = settings.models_root
    if not root.is_dir():
        return []
    found: list[ModelChoice] = []
    for current, folders, files in os.walk(root, followlinks=False):
        here = Path(current)
        depth = len(here.relative_to(root).parts)
        folders[:] = sorted(f for f in folders if not f.startswith(".")) if depth < MAX_DEPTH else []
        if here != root and any(marker in files for marker in FOLDER_MARKERS):
            found.append(ModelChoice(path=here.relative_to(root).as_posix(), kind="folder", size=None))
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in WEIGHT_SUFFIXES or not _inside(path, root):
                continue
            relative = path.relative_to(root).as_posix()
            found.append(ModelChoice(path=relative, kind="file", size=path.stat().st_size))
        if len(found) >= MAX_ENTRIES:
            break
    return sorted(found[:MAX_ENTRIES], key=lambda choice: choice.path)
