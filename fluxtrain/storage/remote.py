"""Where artifacts go: an S3 or GCS bucket and prefix, reached through fsspec (s3fs / gcsfs).

Enabled when `CLOUD_STORAGE_TYPE` is `S3` or `GCS` and `FLUXTRAIN_STORAGE_URL` names a bucket of
that kind (`s3://bucket/prefix`, `gs://bucket/prefix`). Credentials are found the libraries' own
way (environment, shared profiles, instance metadata); endpoints can be overridden with their
own variables (`AWS_ENDPOINT_URL` for S3-compatible servers, `STORAGE_EMULATOR_HOST` for a GCS
emulator). Nothing here reads or logs a secret.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cached_property
from typing import Literal
from urllib.parse import urlsplit

from fsspec import AbstractFileSystem

from fluxtrain.errors import InvalidInputError, UnavailableError
from fluxtrain.settings import Settings

Scheme = Literal["s3", "gs"]

_SCHEMES: dict[str, Scheme] = {"S3": "s3", "GCS": "gs"}
_SCHEME_ALIASES: dict[str, Scheme] = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}


class StorageConfigError(InvalidInputError):
    """CLOUD_STORAGE_TYPE and FLUXTRAIN_STORAGE_URL do not describe one usable bucket."""


@dataclass
class RemoteStore:
    """A bucket and key prefix; keys below it are '/'-separated relative paths."""

    scheme: Scheme
    bucket: str
    prefix: str

    @cached_property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem, made on first use: finding credentials may take a network round trip."""
        return _filesystem(self.scheme)

    def path(self, key: str) -> str:
        """The filesystem path (bucket/prefix/key) that fsspec calls take."""
        return "/".join(part for part in (self.bucket, self.prefix, _check_key(key)) if part)

    def url(self, key: str) -> str:
        """The URL users see for `key`, e.g. s3://bucket/prefix/key."""
        return f"{self.scheme}://{self.path(key)}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(part in ("", ".", "..") for part in parts) or "\\" in key:
        raise InvalidInputError(f"invalid remote key {key!r}")
    return key


def parse_storage_url(url: str, *, storage_type: str) -> tuple[Scheme, str, str]:
    """Split `url` into scheme, bucket and prefix, checking it matches CLOUD_STORAGE_TYPE."""
    expected = _SCHEMES.get(storage_type.upper())
    if expected is None:
        raise StorageConfigError(f"CLOUD_STORAGE_TYPE must be S3 or GCS, not {storage_type!r}")
    parts = urlsplit(url.strip())
    scheme = _SCHEME_ALIASES.get(parts.scheme.lower())
    if scheme is None:
        raise StorageConfigError(
            f"FLUXTRAIN_STORAGE_URL must look like {expected}://bucket/prefix, got scheme {parts.scheme!r}"
        )
    if scheme != expected:
        raise StorageConfigError(
            f"FLUXTRAIN_STORAGE_URL uses {parts.scheme}:// but CLOUD_STORAGE_TYPE is {storage_type.upper()}; "
            f"use {expected}://bucket/prefix or change CLOUD_STORAGE_TYPE"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise StorageConfigError(
            "FLUXTRAIN_STORAGE_URL must be only bucket and prefix; give credentials the provider's usual way"
        )
    bucket = parts.hostname or ""
    if not bucket:
        raise StorageConfigError(f"FLUXTRAIN_STORAGE_URL names no bucket: use {expected}://bucket/prefix")
    prefix = "/".join(part for part in parts.path.split("/") if part)
    if any(part in (".", "..") for part in prefix.split("/")):
        raise StorageConfigError("FLUXTRAIN_STORAGE_URL prefix must not contain '.' or '..' parts")
    return scheme, bucket, prefix


_PACKAGES: dict[Scheme, str] = {"s3": "s3fs", "gs": "gcsfs"}


def _filesystem(scheme: Scheme) -> AbstractFileSystem:
    if scheme == "s3":
        from s3fs import S3FileSystem

        return S3FileSystem(skip_instance_cache=True)
    # gcsfs's default class first asks the gRPC control plane for the bucket layout, which
    # emulators and plain-object uploads do not need; the JSON-API class does every upload.
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(skip_instance_cache=True)


def open_remote(settings: Settings) -> RemoteStore | None:
    """The configured artifact store, or None when uploads are off; half a configuration is an error."""
    storage_type = settings.cloud_storage_type
    url = (settings.storage_url or "").strip()
    if storage_type is None and not url:
        return None
    if storage_type is None:
        raise StorageConfigError(
            "FLUXTRAIN_STORAGE_URL is set but CLOUD_STORAGE_TYPE is not: set it to S3 or GCS"
        )
    if not url:
        example = _SCHEMES[storage_type]
        raise StorageConfigError(
            f"CLOUD_STORAGE_TYPE is {storage_type} but FLUXTRAIN_STORAGE_URL is not set: "
            f"set it to {example}://bucket/prefix"
        )
    scheme, bucket, prefix = parse_storage_url(url, storage_type=storage_type)
    package = _PACKAGES[scheme]
    if importlib.util.find_spec(package) is None:
        raise UnavailableError(f"uploads to {scheme}:// need the {package} package (fluxtrain[cloud])")
    return RemoteStore(scheme=scheme, bucket=bucket, prefix=prefix)
