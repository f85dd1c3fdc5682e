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

from fluxtrain.names import header_safe

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
    def _checked_key(cls, value: object) -> object:
        """Surrounding whitespace (a key pasted from a CRLF file) is dropped on both ends of the
        wire alike; what is left must fit an HTTP header, or no client could send it."""
        if not isinstance(value, str):
            return value
        key = value.strip()
        if key and not header_safe(key):
            raise ValueError("may only hold printable ASCII characters (it is sent in an HTTP header)")
        return key or None

    @field_validator("mount_path", "fs_path", mode="before")
    @classmethod
    def _folder(cls, value: object) -> object:
        """An empty value means unset (not the current directory); a path that is a file is refused."""
        if isinstance(value, str) and not value.strip():
            return None
        if value is not None and Path(str(value)).exists() and not Path(str(value)).is_dir():
            raise ValueError(f"{value} is not a directory")
        return value

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


def variable_name(field: str) -> str:
    """The environment variable that sets `field` (named by field or by alias, as pydantic's
    errors do): the seed's own name, or FLUXTRAIN_<FIELD>."""
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = [str(choice) for choice in alias.choices] if isinstance(alias, AliasChoices) else []
        if field == name or field in choices:
            return choices[0] if choices else f"FLUXTRAIN_{name.upper()}"
    return field


def child_environment() -> dict[str, str]:
    """This process's environment without the service's own secrets, for the processes it starts:
    trainers read their run.json and image workers their bodies, never the settings."""
    return {name: value for name, value in os.environ.items() if name.upper() not in SECRET_VARIABLES}
