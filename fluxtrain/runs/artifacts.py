"""What a run has written that a client may download: its LoRA files, its samples and their contact sheet."""

from __future__ import annotations

from pathlib import Path

from fluxtrain.errors import ConflictError, InvalidInputError, NotFoundError
from fluxtrain.names import check_name
from fluxtrain.rundir import RunDir
from fluxtrain.runs.schemas import Artifact, ArtifactList
from fluxtrain.runs.status import run_dir
from fluxtrain.runs.table import Run
from fluxtrain.settings import Settings
from fluxtrain.training.contact_sheet import write_contact_sheet

SAMPLE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


def _artifacts(folder: RunDir, output_name: str) -> dict[str, tuple[Path, str]]:
    found = {path.name: (path, "lora") for path in folder.lora_files()}
    sheet = folder.contact_sheet(output_name)
    if folder.samples.is_dir():
        for path in sorted(folder.samples.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in SAMPLE_SUFFIXES:
                found.setdefault(path.name, (path, "contact_sheet" if path == sheet else "sample"))
    return found


def list_artifacts(*, settings: Settings, run: Run) -> ArtifactList:
    """LoRA files first, then samples and the contact sheet, each with its remote URL once uploaded."""
    folder = RunDir(run_dir(settings, run.id))
    urls = folder.uploaded_urls()
    files = [
        Artifact(name=name, kind=kind, size=path.stat().st_size, url=urls.get(folder.key(path)))  # type: ignore[arg-type]
        for name, (path, kind) in _artifacts(folder, run.output_name).items()
    ]
    return ArtifactList(run_id=run.id, files=files)


def artifact_path(*, settings: Settings, run: Run, name: str) -> Path:
    """The file of one artifact by its bare name (no folders, no '..')."""
    try:
        check_name(name, what="artifact name")
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    found = _artifacts(RunDir(run_dir(settings, run.id)), run.output_name).get(name)
    if found is None:
        raise NotFoundError(f"run '{run.id}' has no artifact '{name}'")
    return found[0]


def write_run_contact_sheet(*, settings: Settings, run: Run) -> Artifact:
    """Write the run's contact sheet now, from the samples it has so far; 409 while it has none."""
    folder = RunDir(run_dir(settings, run.id))
    path = write_contact_sheet(folder, run.output_name)
    if path is None:
        raise ConflictError(f"run '{run.id}' has no samples yet, so no contact sheet")
    url = folder.uploaded_urls().get(folder.key(path))
    return Artifact(name=path.name, kind="contact_sheet", size=path.stat().st_size, url=url)
