"""Reading the artifact-store settings: what turns uploads on, and the errors for a bad pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxtrain.errors import InvalidInputError
from fluxtrain.settings import Settings
from fluxtrain.storage.remote import StorageConfigError, open_remote, parse_storage_url


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(mount_path=tmp_path, _env_file=None, **values)


def test_uploads_are_off_without_configuration(tmp_path: Path) -> None:
    assert open_remote(_settings(tmp_path)) is None


def test_s3_store_from_settings_builds_urls(tmp_path: Path) -> None:
    store = open_remote(_settings(tmp_path, cloud_storage_type="s3", storage_url="s3://bucket/a/b/"))
    assert store is not None
    assert (store.scheme, store.bucket, store.prefix) == ("s3", "bucket", "a/b")
    assert type(store.fs).__name__ == "S3FileSystem"
    assert store.path("run1/output/x.safetensors") == "bucket/a/b/run1/output/x.safetensors"
    assert store.url("run1/output/x.safetensors") == "s3://bucket/a/b/run1/output/x.safetensors"


def test_gcs_store_accepts_gs_and_gcs_schemes(tmp_path: Path) -> None:
    store = open_remote(_settings(tmp_path, cloud_storage_type="GCS", storage_url="gcs://bkt"))
    assert store is not None
    assert (store.scheme, store.bucket, store.prefix) == ("gs", "bkt", "")
    assert store.url("r/samples/a.png") == "gs://bkt/r/samples/a.png"
    assert parse_storage_url("gs://bkt/p", storage_type="GCS") == ("gs", "bkt", "p")


@pytest.mark.parametrize(
    ("storage_type", "url", "message"),
    [
        ("S3", "gs://bucket/prefix", "uses gs:// but CLOUD_STORAGE_TYPE is S3"),
        ("GCS", "s3://bucket/prefix", "uses s3:// but CLOUD_STORAGE_TYPE is GCS"),
        ("S3", "https://bucket/prefix", "must look like s3://bucket/prefix"),
        ("S3", "s3:///prefix-only", "names no bucket"),
        ("S3", "s3://key:secret@bucket/prefix", "only bucket and prefix"),
        ("GCS", "gs://bucket/../other", "must not contain"),
    ],
)
def test_bad_storage_url_is_a_clear_error(tmp_path: Path, storage_type: str, url: str, message: str) -> None:
    with pytest.raises(StorageConfigError, match=message) as info:
        open_remote(_settings(tmp_path, cloud_storage_type=storage_type, storage_url=url))
    assert "secret" not in info.value.message


def test_half_a_configuration_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError, match="FLUXTRAIN_STORAGE_URL is not set: set it to gs://"):
        open_remote(_settings(tmp_path, cloud_storage_type="GCS"))
    with pytest.raises(StorageConfigError, match="CLOUD_STORAGE_TYPE is not"):
        open_remote(_settings(tmp_path, storage_url="s3://bucket/p"))


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "a\\b", "."])
def test_keys_cannot_leave_the_prefix(tmp_path: Path, key: str) -> None:
    store = open_remote(_settings(tmp_path, cloud_storage_type="S3", storage_url="s3://bucket/p"))
    assert store is not None
    with pytest.raises(InvalidInputError, match="invalid remote key"):
        store.url(key)
