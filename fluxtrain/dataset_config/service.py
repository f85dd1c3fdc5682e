"""Writing a dataset's kohya TOML next to its folder: `$DATA_ROOT/datasets/<name>.toml`."""

from __future__ import annotations

from pathlib import Path

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.schema import (
    DatasetSection,
    GeneralSection,
    KohyaDatasetToml,
    SubsetSection,
)
from fluxtrain.dataset_config.toml_file import render_dataset_toml
from fluxtrain.datasets.store import control_dir, dataset_dir, list_controls, list_images
from fluxtrain.errors import NotFoundError
from fluxtrain.fsutil import atomic_write_text
from fluxtrain.settings import Settings


def build_dataset_toml(
    *, request: DatasetConfig, image_dir: Path, control_dir: Path | None = None
) -> KohyaDatasetToml:
    """Map a request onto kohya's sections: caption and augmentation options in [general],
    resolution, batch and buckets per dataset, the folder and its trigger word per subset; an
    edit-pair dataset adds its control folder and control options with musubi-tuner's keys."""
    paired = control_dir is not None
    return KohyaDatasetToml(
        general=GeneralSection(
            shuffle_caption=request.shuffle_caption,
            caption_extension=request.caption_extension,
            keep_tokens=request.keep_tokens,
            flip_aug=request.flip_aug,
            color_aug=request.color_aug,
            random_crop=request.random_crop,
        ),
        datasets=[
            DatasetSection(
                resolution=request.resolution,
                batch_size=request.batch_size,
                enable_bucket=request.enable_bucket,
                min_bucket_reso=request.min_bucket_reso,
                max_bucket_reso=request.max_bucket_reso,
                bucket_reso_steps=request.bucket_reso_steps,
                control_resolution=request.control_resolution if paired else None,
                no_resize_control=request.no_resize_control if paired else None,
                subsets=[
                    SubsetSection(
                        image_dir=str(image_dir),
                        control_directory=str(control_dir) if paired else None,
                        class_tokens=request.trigger_word,
                        num_repeats=request.num_repeats,
                    )
                ],
            )
        ],
    )


def dataset_config_path(settings: Settings, name: str) -> Path:
    """Where dataset `name`'s TOML lives; the name is checked like the folder's."""
    folder = dataset_dir(settings, name, must_exist=False)
    return folder.with_name(f"{folder.name}.toml")


def create_dataset_config(*, settings: Settings, request: DatasetConfig) -> Path:
    """Write the TOML a trainer (ours or kohya's) needs for a dataset that holds images."""
    folder = dataset_dir(settings, request.output_name)
    if not list_images(folder):
        raise NotFoundError(f"dataset '{request.output_name}' holds no image")
    path = dataset_config_path(settings, request.output_name)
    controls = control_dir(folder) if list_controls(folder) else None
    document = build_dataset_toml(request=request, image_dir=folder, control_dir=controls)
    atomic_write_text(path, render_dataset_toml(document))
    return path
