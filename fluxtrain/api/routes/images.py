"""One image of a dataset: its thumbnail, the image itself, and deleting it; a control image's thumbnail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse
from pydantic import BaseModel

from fluxtrain.api.deps import SettingsDep
from fluxtrain.datasets.removal import delete_image
from fluxtrain.datasets.thumbnails import control_thumbnail, dataset_image, drop_thumbnails, thumbnail

router = APIRouter(tags=["datasets"])

DatasetName = Annotated[str, Path(max_length=100)]
ImageName = Annotated[str, Path(max_length=100, description="Image file name, e.g. cat.jpg")]
_NOT_FOUND = {404: {"description": "The dataset or the image does not exist."}}
_JPEG = {200: {"content": {"image/jpeg": {}}, "description": "The image as JPEG."}}


class ImageDeleted(BaseModel):
    message: str = "Image deleted"
    dataset: str
    image: str


@router.get(
    "/datasets/{name}/thumbnails/{image}",
    response_class=FileResponse,
    responses={**_JPEG, **_NOT_FOUND},
)
def get_thumbnail(name: DatasetName, image: ImageName, settings: SettingsDep) -> FileResponse:
    """A small JPEG preview (at most 256 px a side), made once and cached under $DATA_ROOT/thumbnails."""
    path = thumbnail(settings=settings, name=name, image=image)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/datasets/{name}/control-thumbnails/{image}",
    response_class=FileResponse,
    responses={**_JPEG, 404: {"description": "The dataset or the control image does not exist."}},
)
def get_control_thumbnail(name: DatasetName, image: ImageName, settings: SettingsDep) -> FileResponse:
    """A small JPEG preview of one control image (`control/`, as `GET /datasets/{name}` lists them)."""
    path = control_thumbnail(settings=settings, name=name, image=image)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/datasets/{name}/images/{image}", response_class=FileResponse, responses={**_JPEG, **_NOT_FOUND})
def get_image(name: DatasetName, image: ImageName, settings: SettingsDep) -> FileResponse:
    """The stored image itself, full size."""
    path = dataset_image(settings, name, image)
    return FileResponse(path, media_type="image/jpeg", filename=path.name)


@router.delete("/datasets/{name}/images/{image}", response_model=ImageDeleted, responses=_NOT_FOUND)
def delete_image_route(name: DatasetName, image: ImageName, settings: SettingsDep) -> ImageDeleted:
    """Remove one image with its caption and manifest entry."""
    delete_image(settings=settings, name=name, image=image)
    drop_thumbnails(settings=settings, name=name, image=image)
    return ImageDeleted(dataset=name, image=image)
