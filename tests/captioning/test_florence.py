"""Where FLUXTRAIN_CAPTION_MODEL points, and the one model kept per process."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from fluxtrain.captioning.florence import (
    caption_device,
    default_batch_size,
    get_caption_model,
    resolve_model_path,
)
from fluxtrain.errors import UnavailableError
from fluxtrain.settings import Settings


def test_a_local_folder_loads_the_native_classes(caption_settings: Settings, tiny_florence2: Path) -> None:
    loaded = get_caption_model(caption_settings)
    assert type(loaded.model).__name__ == "Florence2ForConditionalGeneration"
    assert type(loaded.processor).__name__ == "Florence2Processor"
    assert loaded.path == tiny_florence2.resolve()
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32


def test_the_model_is_loaded_once_and_shared_across_threads(
    caption_settings: Settings, load_count: list[Path]
) -> None:
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(get_caption_model(caption_settings))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(load_count) == 1
    assert all(result is results[0] for result in results)


def test_a_folder_name_under_models_root(settings: Settings, tiny_florence2: Path) -> None:
    shutil.copytree(tiny_florence2, settings.models_root / "my-florence")
    settings.caption_model = "my-florence"
    assert resolve_model_path(settings) == (settings.models_root / "my-florence").resolve()


def test_a_hub_id_uses_its_copy_under_models_root(settings: Settings, tiny_florence2: Path) -> None:
    local = settings.models_root / "florence-community" / "Florence-2-large"
    shutil.copytree(tiny_florence2, local)
    settings.caption_model = "florence-community/Florence-2-large"
    assert resolve_model_path(settings) == local.resolve()


def test_a_hub_id_without_copy_or_network_is_unavailable(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    settings.caption_model = "florence-community/Florence-2-large"
    with pytest.raises(UnavailableError) as caught:
        resolve_model_path(settings)
    message = caught.value.message
    assert "FLUXTRAIN_CAPTION_MODEL" in message
    assert str(settings.models_root / "florence-community" / "Florence-2-large") in message
    assert not (settings.models_root / "florence-community" / "Florence-2-large").exists()


@pytest.mark.parametrize("value", ["/nonexistent/florence2", "missing-folder"])
def test_a_missing_folder_names_the_setting_and_the_folder(settings: Settings, value: str) -> None:
    settings.caption_model = value
    with pytest.raises(UnavailableError) as caught:
        get_caption_model(settings)
    message = caught.value.message
    assert "FLUXTRAIN_CAPTION_MODEL" in message
    expected = Path(value) if value.startswith("/") else settings.models_root / value
    assert str(expected) in message


def test_a_remote_code_checkpoint_is_refused(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    config = {
        "model_type": "florence2",
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"},
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    settings.caption_model = str(folder)
    with pytest.raises(UnavailableError, match="native transformers Florence-2"):
        get_caption_model(settings)


def test_a_broken_model_folder_is_unavailable(
    settings: Settings, tiny_florence2: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_florence2, folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    settings.caption_model = str(folder)
    with pytest.raises(UnavailableError, match="could not be loaded"):
        get_caption_model(settings)


def test_device_and_batch_size_defaults(settings: Settings) -> None:
    settings.caption_device = "cpu"
    assert caption_device(settings) == torch.device("cpu")
    assert default_batch_size(settings, torch.device("cpu")) == 2
    assert default_batch_size(settings, torch.device("cuda")) == 8
    settings.caption_batch_size = 5
    assert default_batch_size(settings, torch.device("cpu")) == 5
    settings.caption_device = "auto"
    assert caption_device(settings).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_unavailable(settings: Settings) -> None:
    settings.caption_device = "cuda"
    with pytest.raises(UnavailableError, match="FLUXTRAIN_CAPTION_DEVICE"):
        caption_device(settings)


def test_a_bad_device_name_is_unavailable(settings: Settings) -> None:
    settings.caption_device = "toaster"
    with pytest.raises(UnavailableError, match="FLUXTRAIN_CAPTION_DEVICE"):
        caption_device(settings)
