"""Request and response bodies of the dataset endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from fluxtrain.datasets.pairs import Role
from fluxtrain.names import SafeName


class DownloadRequest(BaseModel):
    """The seed's request: image URLs and the dataset they go into."""

    urls: list[str] = Field(min_length=1, description="Image URLs (http or https); duplicates count once.")
    output_name: SafeName = Field(description="Dataset name: letters, digits, '-', '_', '.'.")
    role: Role = Field(
        "target", description="'target': training images; 'control': reference inputs of edit pairs."
    )
    control_for: list[str] | None = Field(
        None,
        description="With role 'control', one stem per URL naming its target: 'cat' (the one reference "
        "of cat.jpg) or 'cat_0', 'cat_1' (several references).",
    )


class DownloadResponse(BaseModel):
    message: str = "Download complete"
    files: dict[str, str] = Field(description="URL -> absolute path of its saved JPEG.")
    failed: dict[str, str] = Field(default_factory=dict, description="URL -> why it was not saved.")


class UploadResponse(BaseModel):
    message: str = "Upload complete"
    files: dict[str, str] = Field(description="Uploaded file (or zip entry) -> absolute path of its JPEG.")
    failed: dict[str, str] = Field(default_factory=dict, description="Uploaded file -> why it was not saved.")


class DatasetSummary(BaseModel):
    name: str
    images: int
    captions: int


class DatasetList(BaseModel):
    datasets: list[DatasetSummary]


class DatasetImage(BaseModel):
    file: str
    path: str
    caption: str | None = None
    manifest: dict[str, Any] | None = Field(None, description="url, sha256, bytes, width, height.")
    controls: list[str] = Field(
        default_factory=list, description="Its control images in control/, in reference order."
    )
    caption_error: str | None = Field(
        None, description="Why its caption file cannot be read (not UTF-8); saving a caption replaces it."
    )


class DatasetDetail(BaseModel):
    name: str
    path: str
    images: list[DatasetImage]
    unpaired_controls: list[str] = Field(
        default_factory=list, description="Control images in control/ that no target's stem claims."
    )


class DatasetDeleted(BaseModel):
    message: str = "Dataset deleted"
    name: str


class RunningDownload(BaseModel):
    total: int = Field(description="Distinct URLs in the request.")
    done: int = Field(description="URLs finished so far, saved or failed.")
    saved: int
    failed: int
    started_at: datetime
    images_per_s: float = Field(description="Saved images per second since the download started.")


class DownloadsProgress(BaseModel):
    name: str
    running: bool = Field(description="Whether any download into the dataset is running now.")
    downloads: list[RunningDownload] = Field(description="Running downloads, oldest first; empty when idle.")
