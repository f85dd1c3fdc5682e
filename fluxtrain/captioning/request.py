"""What a caller asks captioning for: the body of `POST /caption-images` and `fluxtrain caption`."""

from __future__ import annotations

from pydantic import BaseModel, Field

from fluxtrain.captioning.prompts import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_BEAMS,
    DEFAULT_PROMPT,
    CaptionTask,
)
from fluxtrain.names import SafeName, TriggerWord

MAX_CAPTION_IMAGES = 1000


class CaptionRequest(BaseModel):
    output_name: SafeName = Field(description="Dataset folder whose images are captioned.")
    trigger_word: TriggerWord = Field(description="Written first in every caption.")
    prompt: str = Field(
        DEFAULT_PROMPT,
        max_length=1000,
        description="The default maps to <MORE_DETAILED_CAPTION>; a caption task token is used as given; "
        "other text is the model's prompt.",
    )
    overwrite: bool = Field(False, description="Re-caption images that already have a .txt caption.")
    task: CaptionTask | None = Field(None, description="Florence-2 caption task; overrides `prompt`.")
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=1024, description="Longest caption.")
    num_beams: int = Field(DEFAULT_NUM_BEAMS, ge=1, le=8, description="Beam search width.")
    images: list[SafeName] | None = Field(
        None,
        min_length=1,
        max_length=MAX_CAPTION_IMAGES,
        description="Only these image file names (all images when left out); the answer covers them alone.",
    )
