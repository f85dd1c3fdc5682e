"""Captioning endpoints: the seed's `POST /caption-images`, and editing one caption by hand."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from fluxtrain.api.deps import SettingsDep
from fluxtrain.captioning.request import CaptionRequest
from fluxtrain.captioning.service import caption_request, set_caption

router = APIRouter(tags=["captions"])

MAX_CAPTION_CHARS = 10_000


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
    result = caption_request(settings=settings, request=request)
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
