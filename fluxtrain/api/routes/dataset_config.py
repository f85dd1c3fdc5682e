"""`POST /create-dataset-config`: the seed's endpoint that writes a dataset's kohya TOML."""

from __future__ import annotations

from fastapi import APIRouter

from fluxtrain.api.deps import SettingsDep
from fluxtrain.dataset_config.request import DatasetConfig, DatasetConfigCreated
from fluxtrain.dataset_config.service import create_dataset_config

router = APIRouter(tags=["dataset config"])


@router.post(
    "/create-dataset-config",
    response_model=DatasetConfigCreated,
    responses={404: {"description": "The dataset folder is missing or holds no image."}},
)
def create_dataset_config_route(body: DatasetConfig, settings: SettingsDep) -> DatasetConfigCreated:
    """Write `$DATA_ROOT/datasets/<output_name>.toml`, replacing an older one."""
    path = create_dataset_config(settings=settings, request=body)
    return DatasetConfigCreated(path=str(path))
