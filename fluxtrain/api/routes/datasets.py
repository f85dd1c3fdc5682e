"""Dataset endpoints: the seed's `POST /download-images`, uploads, listing, lint and deletion."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Body, File, UploadFile

from fluxtrain.api.deps import SettingsDep
from fluxtrain.api.schemas.datasets import (
    DatasetDeleted,
    DatasetDetail,
    DatasetList,
    DownloadRequest,
    DownloadResponse,
    DownloadsProgress,
    RunningDownload,
    UploadResponse,
)
from fluxtrain.datasets import progress
from fluxtrain.datasets.catalog import describe_dataset, summarize_datasets
from fluxtrain.datasets.ingest import add_uploads, download_images
from fluxtrain.datasets.lint import LintReport
from fluxtrain.datasets.lint_service import LintRequest, lint_dataset
from fluxtrain.datasets.store import dataset_dir, delete_dataset
from fluxtrain.datasets.thumbnails import drop_thumbnails
from fluxtrain.errors import TooLargeError

router = APIRouter(tags=["datasets"])

_NOT_FOUND = {404: {"description": "The dataset does not exist."}}


@router.post("/download-images", response_model=DownloadResponse)
async def download_images_route(body: DownloadRequest, settings: SettingsDep) -> DownloadResponse:
    """Fetch the URLs into the dataset; each URL ends up in `files` or, with a reason, in `failed`."""
    result = await download_images(settings=settings, name=body.output_name, urls=body.urls)
    return DownloadResponse(files=result.files, failed=result.failed)


@router.post(
    "/datasets/{name}/images",
    response_model=UploadResponse,
    responses={413: {"description": "The upload exceeds FLUXTRAIN_MAX_UPLOAD_BYTES."}},
)
async def upload_images_route(
    name: str,
    files: Annotated[list[UploadFile], File(description="Image files, or .zip archives of images.")],
    settings: SettingsDep,
) -> UploadResponse:
    """Add uploaded images (or zips of them) to the dataset, creating it when missing.

    Answers are keyed by file name (`set.zip/entry` inside archives); a name repeated within one
    request is keyed `name#2`, `name#3`, ... Identical bytes keep their one file; different bytes
    under a name in use get a new file (`name-2.jpg`); an upload never replaces an image.
    """
    total = sum(upload.size or 0 for upload in files)
    if total > settings.max_upload_bytes:
        raise TooLargeError(f"upload is {total} bytes, the limit is {settings.max_upload_bytes}")
    uploads = [(upload.filename or "upload", upload.file) for upload in files]
    result = await add_uploads(settings=settings, name=name, uploads=uploads)
    return UploadResponse(files=result.files, failed=result.failed)


@router.get("/datasets", response_model=DatasetList)
def list_datasets_route(settings: SettingsDep) -> DatasetList:
    """Every dataset with its image and caption counts."""
    summaries = summarize_datasets(settings=settings)
    return DatasetList.model_validate({"datasets": [asdict(summary) for summary in summaries]})


@router.get("/datasets/{name}", response_model=DatasetDetail, responses=_NOT_FOUND)
def get_dataset_route(name: str, settings: SettingsDep) -> DatasetDetail:
    """The dataset's images, each with its caption and manifest entry."""
    return DatasetDetail.model_validate(asdict(describe_dataset(settings=settings, name=name)))


@router.post("/datasets/{name}/lint", response_model=LintReport, responses=_NOT_FOUND)
def lint_dataset_route(
    name: str,
    settings: SettingsDep,
    body: Annotated[LintRequest | None, Body()] = None,  # type: ignore[valid-type]
) -> LintReport:
    """What would make training on the dataset fail (`error`) or go badly (`warning`), before any
    run: image sizes against the buckets, duplicates, captions, T5 length, dataset size."""
    return lint_dataset(settings=settings, name=name, request=body or LintRequest())


@router.get("/datasets/{name}/downloads", response_model=DownloadsProgress, responses=_NOT_FOUND)
def downloads_progress_route(name: str, settings: SettingsDep) -> DownloadsProgress:
    """The counts of the downloads into the dataset running now; `running: false` when none is."""
    running = progress.running(name)
    if not running:
        dataset_dir(settings, name)
    return DownloadsProgress(
        name=name,
        running=bool(running),
        downloads=[
            RunningDownload(
                total=item.total,
                done=item.done,
                saved=item.saved,
                failed=item.failed,
                started_at=item.started_at,
                images_per_s=round(item.images_per_s, 1),
            )
            for item in running
        ],
    )


@router.delete("/datasets/{name}", response_model=DatasetDeleted, responses=_NOT_FOUND)
def delete_dataset_route(name: str, settings: SettingsDep) -> DatasetDeleted:
    """Remove the dataset folder with its images, captions and manifest."""
    delete_dataset(settings, name)
    drop_thumbnails(settings=settings, name=name)
    return DatasetDeleted(name=name)
