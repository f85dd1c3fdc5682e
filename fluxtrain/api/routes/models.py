"""`GET /models`: what lies under the models root, for choosing a run's model files."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from fluxtrain.api.deps import SettingsDep
from fluxtrain.runs.model_choices import MAX_ENTRIES, list_model_choices

router = APIRouter(tags=["runs"])


class ModelEntry(BaseModel):
    path: str = Field(description="Relative to the models root, as /train's model fields take it.")
    kind: Literal["file", "folder"]
    size: int | None = Field(None, description="Bytes of a file; null for a folder.")


class ModelList(BaseModel):
    models: list[ModelEntry] = Field(description=f"Sorted by path; at most {MAX_ENTRIES}.")


@router.get("/models", response_model=ModelList)
def list_models(settings: SettingsDep) -> ModelList:
    """Weight files and model folders under FS_PATH that pretrained_model, ae, clip_l and t5xxl may name."""
    choices = list_model_choices(settings=settings)
    return ModelList.model_validate({"models": [asdict(choice) for choice in choices]})
