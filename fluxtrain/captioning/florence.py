"""Finding, loading and keeping the Florence-2 caption model: once per process, shared by threads.

`FLUXTRAIN_CAPTION_MODEL` is a local folder, a folder name under `$FS_PATH`, or a hub id
(`owner/name`) whose copy lives at `$FS_PATH/owner/name`, downloaded there once when the
machine has a network. Only the native transformers classes are used, never remote code.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoProcessor, Florence2ForConditionalGeneration, ProcessorMixin

from fluxtrain.errors import UnavailableError
from fluxtrain.settings import Settings

MODEL_SETTING = "FLUXTRAIN_CAPTION_MODEL"
DEVICE_SETTING = "FLUXTRAIN_CAPTION_DEVICE"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass
class CaptionModel:
    """A loaded Florence-2 with its processor; `lock` serialises generation on the device."""

    model: Florence2ForConditionalGeneration
    processor: ProcessorMixin
    device: torch.device
    dtype: torch.dtype
    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache: dict[tuple[Path, str], CaptionModel] = {}
_cache_lock = threading.Lock()


def caption_device(settings: Settings) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; an explicit device must exist."""
    wanted = settings.caption_device.strip().lower()
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError as exc:
        raise UnavailableError(
            f"{DEVICE_SETTING}={settings.caption_device!r} is not a device: {exc}"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError(f"{DEVICE_SETTING}={settings.caption_device!r} but no CUDA device is present")
    return device


def default_batch_size(settings: Settings, device: torch.device) -> int:
    if settings.caption_batch_size is not None:
        return settings.caption_batch_size
    return 8 if device.type == "cuda" else 2


def resolve_model_path(settings: Settings) -> Path:
    """The local folder that holds the configured model, downloading a hub id once if needed."""
    value = settings.caption_model.strip()
    root = settings.models_root
    given = Path(value).expanduser()
    if given.is_absolute() or value.startswith("."):
        return _require_folder(value, given)
    for folder in (root / value, given):
        if folder.is_dir():
            return _require_folder(value, folder)
    if _HUB_ID.fullmatch(value):
        return _local_hub_copy(value, root)
    return _require_folder(value, root / value)


def _require_folder(value: str, folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise UnavailableError(
            f"caption model not found: {MODEL_SETTING}={value!r}, looked in {folder}, which holds no "
            f"Florence-2 model (no config.json). Point {MODEL_SETTING} at a Florence-2 folder, a folder name "
            "under FS_PATH (the models folder), or a hub id on a machine with a network."
        )
    return folder.resolve()


def _local_hub_copy(repo_id: str, root: Path) -> Path:
    folder = root / repo_id
    if (folder / "config.json").is_file():
        return folder.resolve()
    from huggingface_hub import snapshot_download

    partial = folder.with_name(f".{folder.name}.partial")
    try:
        snapshot_download(repo_id, local_dir=partial)
    except Exception as exc:
        raise UnavailableError(
            f"caption model {repo_id!r} ({MODEL_SETTING}) has no local copy in {folder} and could not be "
            f"downloaded ({type(exc).__name__}). Copy it there, or set {MODEL_SETTING} to a local Florence-2 "
            "folder."
        ) from exc
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    partial.replace(folder)
    return folder.resolve()


def _refuse_remote_code(folder: Path) -> None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UnavailableError(f"caption model config {folder / 'config.json'} is unreadable: {exc}") from exc
    if not isinstance(config, dict) or config.get("model_type") != "florence2" or "auto_map" in config:
        raise UnavailableError(
            f"{folder} ({MODEL_SETTING}) is not a native transformers Florence-2 checkpoint; use a converted "
            "one such as florence-community/Florence-2-large (original remote-code checkpoints do not load)"
        )


def _load(folder: Path, device: torch.device) -> CaptionModel:
    _refuse_remote_code(folder)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    except Exception as exc:
        raise UnavailableError(
            f"caption model in {folder} ({MODEL_SETTING}) could not be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    model.to(device).eval()
    return CaptionModel(model=model, processor=processor, device=device, dtype=dtype, path=folder)


def get_caption_model(settings: Settings) -> CaptionModel:
    """The process-wide model for these settings; the first caller loads it, the rest wait and share."""
    device = caption_device(settings)
    with _cache_lock:
        folder = resolve_model_path(settings)
        key = (folder, str(device))
        if key not in _cache:
            _cache[key] = _load(folder, device)
        return _cache[key]


def release_caption_models() -> None:
    """Drop every kept model so its memory (GPU memory included) can be returned."""
    with _cache_lock:
        _cache.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
