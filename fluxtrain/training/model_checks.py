"""Cheap checks that a run's model paths hold what the trainer will load.

Only safetensors headers and config.json files are read, never the weights, so a wrong file (a
tokenizer folder, a text file renamed `.sft`, the VAE given as the transformer) is refused with a
422 at `/train` before a run exists, and by the trainer (exit 2) before it caches or loads anything
when a run directory was written by hand. The module imports no model library, so the service can
use it without loading diffusers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.families.detect import (
    DetectedTransformer,
    ModelFamily,
    check_requested_family,
    detect_from_config,
    detect_from_shapes,
)

SINGLE_FILE_SUFFIXES = (".sft", ".safetensors")
COMPONENT_SUBFOLDERS = {
    "pretrained_model": "transformer",
    "ae": "vae",
    "clip_l": "text_encoder",
    "t5xxl": "text_encoder_2",
    "text_encoder": "text_encoder",
}
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class HeaderShape:
    """A tensor as the safetensors header describes it: its shape, no data."""

    shape: tuple[int, ...]


def header_shapes(field: str, path: Path, shown: str) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors header; the weights are not read."""
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise InvalidInputError(
            f"{field}: '{shown}' must be a .sft or .safetensors file or a diffusers model folder"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for any bad header
        raise InvalidInputError(f"{field}: '{shown}' is not a readable safetensors file ({exc})") from exc


def _read_config(field: str, path: Path, shown: str) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError("the file is too large for a model config")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{field}: '{shown}' has an unreadable {path.name}: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidInputError(f"{field}: '{shown}' has a {path.name} that is not a JSON object")
    return config


def _folder_config(field: str, folder: Path, shown: str) -> tuple[Path, dict[str, Any]]:
    """The model's config.json: at the folder's root (a model folder) or in its pipeline subfolder."""
    subfolder = COMPONENT_SUBFOLDERS[field]
    for candidate in (folder / subfolder / "config.json", folder / "config.json"):
        if candidate.is_file():
            return candidate, _read_config(field, candidate, shown)
    raise InvalidInputError(
        f"{field}: '{shown}' is a folder but not a diffusers model: it holds neither config.json "
        f"nor {subfolder}/config.json"
    )


def check_transformer(path: Path, shown: str) -> DetectedTransformer:
    """A FLUX transformer (a diffusers folder of a Flux class, or a file with its keys) and its family."""
    if path.is_dir():
        source, detect = _folder_config("pretrained_model", path, shown)[1], detect_from_config
    else:
        source, detect = header_shapes("pretrained_model", path, shown), detect_from_shapes
    try:
        return detect(source)
    except InvalidInputError as exc:
        raise InvalidInputError(f"pretrained_model: '{shown}' {exc.message}") from exc


def check_model_family(path: Path, shown: str, requested: ModelFamily | None) -> ModelFamily:
    """The run's family: detected from the transformer and matched against the request."""
    return check_requested_family(requested, check_transformer(path, shown), shown)


def check_component(field: str, path: Path, shown: str) -> None:
    """An autoencoder or text encoder: a safetensors file whose header parses, or a diffusers folder."""
    if path.is_dir():
        _folder_config(field, path, shown)
        return
    if not header_shapes(field, path, shown):
        raise InvalidInputError(f"{field}: '{shown}' holds no tensors")


def check_model(field: str, path: Path, shown: str) -> None:
    """Refuse a model path whose file or folder cannot be the `field` model, naming both."""
    if field == "pretrained_model":
        check_transformer(path, shown)
    else:
        check_component(field, path, shown)


def transformer_has_guidance(path: Path, shown: str) -> bool:
    """Whether the transformer is guidance-distilled (dev, T5 length 512) rather than schnell (256)."""
    return bool(check_transformer(path, shown).guidance)


def transformer_config(path: Path, shown: str) -> dict[str, Any]:
    """The transformer's FluxTransformer2DModel config, from config.json or the file's header shapes.

    `convert` is imported here, not at the top: it imports torch (0.9 s), and this module is on the
    path of every CLI command and of /train's checks, which need no tensors.
    """
    from fluxtrain.training.convert import infer_transformer_config

    check_transformer(path, shown)
    if path.is_dir():
        return _folder_config("pretrained_model", path, shown)[1]
    shapes = header_shapes("pretrained_model", path, shown)
    return infer_transformer_config({key: HeaderShape(tuple(shape)) for key, shape in shapes.items()})
