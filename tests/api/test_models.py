"""GET /models: the weight files and model folders under FS_PATH, relative to it, never beyond it."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from fluxtrain.settings import Settings


def test_lists_files_and_model_folders_relative_to_the_root(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    root = settings.models_root
    (root / "flux" / "diffusers-dev" / "transformer").mkdir(parents=True)
    (root / "flux" / "diffusers-dev" / "model_index.json").write_text("{}")
    (root / "flux1-dev.sft").write_bytes(b"x" * 10)
    (root / "text" / "clip_l.safetensors").parent.mkdir()
    (root / "text" / "clip_l.safetensors").write_bytes(b"y")
    (root / "notes.txt").write_text("not a model")
    (root / ".hidden.safetensors").write_bytes(b"z")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"s")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "link.safetensors").symlink_to(outside / "secret.safetensors")
    response = client.get("/models")
    assert response.status_code == 200
    assert response.json()["models"] == [
        {"path": "flux/diffusers-dev", "kind": "folder", "size": None},
        {"path": "flux1-dev.sft", "kind": "file", "size": 10},
        {"path": "text/clip_l.safetensors", "kind": "file", "size": 1},
    ]


def test_missing_root_is_an_empty_list(client: TestClient) -> None:
    assert client.get("/models").json() == {"models": []}
