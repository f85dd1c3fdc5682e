"""Copying artifacts to S3 / GCS through fsspec."""
