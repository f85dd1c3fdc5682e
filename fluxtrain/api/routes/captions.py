"""Captioning endpoints: the seed's `POST /caption-images`, and editing one caption by hand."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from fluxtrain.api.deps import SettingsDep
from fluxtrain.captioning.prompts import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_BEAMS,
    DEFAULT_PROMPT,
    CaptionTask,
)
from fluxtrain.captioning.service import caption_dataset, set_caption
from fluxtrain.names import SafeName

router = APIRouter(tags=["captions"])

MAX_CAPTION_CHARS = 10_000
MAX_CAPTION_IMAGES = 1000


class CaptionRequest(BaseModel):
    output_name: SafeName = Field(description="Dataset folder whose images are captioned.")
    trigger_word: str = Field(
        min_length=1, max_length=200, pattern=r"^[^\r\n]*$", description="Written first in every caption."
    )
    prompt: str = Field(
        DEFAULT_PROMPT,
        max_length=1000,
        description="The default maps to <MORE_DETAILED_CAPTION>; a caption task token is used as given; "
        "other text is the model's prompt.",
    )
    overwrite: bool = Field(False, description="Re-caption images that already have a .txt caption.")
    task: CaptionTask | None = Field(None, description="Florence-2 caption task; overrides `prompt`.")
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=1024)
    num_beams: int = Field(DEFAULT_NUM_BEAMS, ge=1, le=8)
    images: list[SafeName] | None = Field(
        None,
        min_length=1,
        max_length=MAX_CAPTION_IMAGES,
        description="Only these image file names (all images when left out); the answer covers them alone.",
    )


class CaptionResponse(BaseModel):
    message: str = "Captions generated and saved"
    captions: dict[str, str] = Field(description="Caption line by image file name.")
    failed: dict[str, str] = Field(default_factory=dict, description="Reason by image file name.")


class CaptionUpdate(BaseModel):
    caption: str = Field(max_length=MAX_CAPTION_CHARS)


class CaptionUpdated(BaseModel):
    dataset: str
    image: str
    caption: str


@router.post("/caption-images", response_model=CaptionResponse)
def caption_images(request: CaptionRequest, settings: SettingsDep) -> CaptionResponse:
    """Caption every image of a dataset with Florence-2 (runs in the threadpool, off the event loop)."""
    result = caption_dataset(
        settings=settings,
        name=request.output_name,
        trigger_word=request.trigger_word,
        prompt=request.prompt,
        overwrite=request.overwrite,
        task=request.task,
        max_new_tokens=request.max_new_tokens,
        num_beams=request.num_beams,
        images=request.images,
    )
    return CaptionResponse(captions=result.captions, failed=result.failed)


@router.put("/datasets/{name}/captions/{image}", response_model=CaptionUpdated)
def put_caption(
    name: Annotated[str, Path(max_length=100)],
    image: Annotated[str, Path(max_length=100, description="Image file name, e.g. cat.jpg")],
    update: CaptionUpdate,
    settings: SettingsDep,
) -> CaptionUpdated:
    """Write one image's caption by hand, exactly as sent."""
    set_caption(settings=settings, name=name, image=image, caption=update.caption)
    return CaptionUpdated(dataset=name, image=image, caption=update.caption)
