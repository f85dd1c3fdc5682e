"""What a run has written that a client may download: its LoRA files and its sample images."""

from __future__ import annotations

from pathlib import Path

from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.names import check_name
from fluxtrain.rundir import RunDir
from fluxtrain.runs.schemas import Artifact, ArtifactList
from fluxtrain.runs.status import run_dir
from fluxtrain.runs.table import Run
from fluxtrain.settings import Settings

SAMPLE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


def _artifacts(folder: RunDir) -> dict[str, tuple[Path, str]]:
    found = {path.name: (path, "lora") for path in folder.lora_files()}
    if folder.samples.is_dir():
        for path in sorted(folder.samples.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in SAMPLE_SUFFIXES:
                found.setdefault(path.name, (path, "sample"))
    return found


def list_artifacts(*, settings: Settings, run: Run) -> ArtifactList:
    """LoRA files first, then samples, each with its remote URL once uploaded."""
    folder = RunDir(run_dir(settings, run.id))
    urls = folder.uploaded_urls()
    files = [
        Artifact(name=name, kind=kind, size=path.stat().st_size, url=urls.get(folder.key(path)))  # type: ignore[arg-type]
        for name, (path, kind) in _artifacts(folder).items()
    ]
    return ArtifactList(run_id=run.id, files=files)


def artifact_path(*, settings: Settings, run: Run, name: str) -> Path:
    """The file of one artifact by its bare name (no folders, no '..')."""
    try:
        check_name(name, what="artifact name")
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    found = _artifacts(RunDir(run_dir(settings, run.id))).get(name)
    if found is None:
        raise NotFoundError(f"run '{run.id}' has no artifact '{name}'")
    return found[0]
