"""One settings object for the whole service, read from the environment or `.env`.

The seed's names (PORT, MOUNT_PATH, FS_PATH, CLOUD_STORAGE_TYPE) are kept as they were; every
newer setting carries the FLUXTRAIN_ prefix.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLUXTRAIN_", env_file=".env", extra="ignore", populate_by_name=True
    )

    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("PORT", "port"))
    host: str = "127.0.0.1"
    mount_path: Path | None = Field(None, validation_alias=AliasChoices("MOUNT_PATH", "mount_path"))
    fs_path: Path | None = Field(None, validation_alias=AliasChoices("FS_PATH", "fs_path"))
    cloud_storage_type: Literal["S3", "GCS"] | None = Field(
        None, validation_alias=AliasChoices("CLOUD_STORAGE_TYPE", "cloud_storage_type")
    )

    allow_networks: Annotated[list[IPNetwork], NoDecode] = []
    download_timeout: float = Field(30.0, gt=0)
    max_download_bytes: int = Field(52_428_800, gt=0)
    max_image_pixels: int = Field(100_000_000, gt=0)
    download_concurrency: int = Field(32, ge=1, le=1024)
    download_per_host: int = Field(16, ge=1, le=1024, description="Requests open to one host at once.")
    max_urls: int = Field(10_000, ge=1, description="URLs one download request may hold.")
    image_workers: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)),
        ge=1,
        le=256,
        description="Worker processes that decode and encode downloaded images (default: the CPUs this "
        "process may use).",
    )
    max_upload_bytes: int = Field(1_073_741_824, gt=0)
    ca_bundle: Path | None = Field(None, description="Extra CA certificates (PEM) trusted for HTTPS fetches.")
    api_key: SecretStr | None = None

    caption_model: str = "florence-community/Florence-2-large"
    caption_device: str = "auto"
    caption_batch_size: int | None = Field(None, ge=1)

    database_url: str | None = None
    gpus: str = "auto"
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    storage_url: str | None = None
    cancel_grace_seconds: float = Field(60.0, gt=0, description="SIGTERM to SIGKILL delay on cancel.")
    ray_pending_timeout: float = Field(
        1800.0, ge=0, description="Seconds a Ray job may stay PENDING before its run fails; 0 waits for ever."
    )

    @field_validator("allow_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return [
                ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip()
            ]
        return value

    @field_validator("cloud_storage_type", mode="before")
    @classmethod
    def _upper_storage_type(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip().upper() or None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def data_root(self) -> Path:
        return (self.mount_path or Path("data")).resolve()

    @property
    def models_root(self) -> Path:
        return (self.fs_path or self.data_root / "models").resolve()

    @property
    def datasets_dir(self) -> Path:
        return self.data_root / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.data_root / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.data_root / "cache"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_root / 'fluxtrain.db'}"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings` instead."""
    return Settings()


SECRET_VARIABLES = frozenset({"FLUXTRAIN_API_KEY", "FLUXTRAIN_DATABASE_URL"})


def child_environment() -> dict[str, str]:
    """This process's environment without the service's own secrets, for the processes it starts:
    trainers read their run.json and image workers their bodies, never the settings."""
    return {name: value for name, value in os.environ.items() if name.upper() not in SECRET_VARIABLES}
