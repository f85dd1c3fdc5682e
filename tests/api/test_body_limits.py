"""Bodies over their bound are refused with 413 before they are parsed or spooled to disk."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.api.app import create_app
from fluxtrain.api.limits import MAX_JSON_BODY_BYTES
from fluxtrain.settings import Settings


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "PNG")
    return buffer.getvalue()


def test_declared_upload_over_the_limit_is_413_and_creates_nothing(settings: Settings) -> None:
    settings.max_upload_bytes = 10_000
    with TestClient(create_app(settings)) as client:
        response = client.post("/datasets/big/images", files={"files": ("a.png", b"x" * 20_000)})
    assert response.status_code == 413
    assert "larger than 10000 bytes" in response.json()["detail"]
    assert not (settings.datasets_dir / "big").exists()


def test_chunked_upload_is_counted_as_it_streams(settings: Settings) -> None:
    settings.max_upload_bytes = 10_000
    boundary = "fluxtrainboundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(40):
            yield b"x" * 1000
        yield f"\r\n--{boundary}--\r\n".encode()

    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/datasets/big/images",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert response.status_code == 413
    assert "larger than 10000 bytes" in response.json()["detail"]
    assert not (settings.datasets_dir / "big").exists()


def test_upload_within_the_limit_still_works(settings: Settings) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("b.png", _png())
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/datasets/small/images",
            files=[("files", ("a.png", _png())), ("files", ("more.zip", archive.getvalue()))],
        )
    assert response.status_code == 200, response.text
    assert len(response.json()["files"]) == 2


def test_json_bodies_have_their_own_lower_bound(client: TestClient) -> None:
    filler = "x" * (MAX_JSON_BODY_BYTES + 1)
    response = client.post(
        "/download-images",
        content=b'{"urls": ["' + filler.encode() + b'"], "output_name": "x"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
