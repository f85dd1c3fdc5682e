"""The dataset TOML on disk: render it with tomli_w, read it back with tomllib."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w
from pydantic import ValidationError

from fluxtrain.dataset_config.schema import DatasetConfigFile, KohyaDatasetToml, resolve_document
from fluxtrain.errors import InvalidInputError, NotFoundError


def render_dataset_toml(document: KohyaDatasetToml) -> str:
    """The file text, every table written as a `[header]` section (kohya reads the file with the
    older `toml` package, which mishandles arrays of inline tables); keys left unset stay out so
    kohya's fallbacks apply to them."""
    data = document.model_dump(mode="json", exclude_none=True)
    sections = [f"[general]\n{tomli_w.dumps(data['general'])}"]
    for dataset in data["datasets"]:
        subsets = dataset.pop("subsets")
        sections.append(f"[[datasets]]\n{tomli_w.dumps(dataset)}")
        sections.extend(
            f"[[datasets.subsets]]\n{tomli_w.dumps({'image_dir': subset.pop('image_dir'), **subset})}"
            for subset in subsets
        )
    return "\n".join(sections)


def parse_dataset_toml(text: str) -> KohyaDatasetToml:
    """Check a TOML text against kohya's sections and key types, with a readable message."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"dataset config is not valid TOML: {exc}") from exc
    try:
        return KohyaDatasetToml.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'file'}: {error['msg']}"
            for error in exc.errors()
        )
        raise InvalidInputError(f"dataset config is not a valid kohya dataset TOML: {problems}") from exc


def read_dataset_toml(path: Path) -> KohyaDatasetToml:
    """Read a dataset TOML file (ours or hand-written for kohya), each section checked, unresolved."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"dataset config '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"dataset config {path.name} cannot be read: {exc}") from exc
    return parse_dataset_toml(text)


def load_dataset_config(path: Path) -> DatasetConfigFile:
    """Read a dataset TOML with every inherited key resolved: what the trainer uses."""
    path = Path(path).resolve()
    return resolve_document(read_dataset_toml(path), path=path)
