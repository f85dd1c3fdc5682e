"""/train with FLUX.2 [dev] files: resolved into a run config, and refused clearly when the Mistral
text encoder is missing or is klein's Qwen3 (the trainer's check, before it caches anything)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxtrain.errors import InvalidInputError
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import resolve_config
from fluxtrain.settings import Settings
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.families.family import family_for
from tests.runs.service_doubles import write_trainable_dataset

DEV = {
    "pretrained_model": "flux2-dev.safetensors",
    "ae": "flux2-vae.safetensors",
    "text_encoder": "mistral_3_small_flux2_bf16.safetensors",
}


@pytest.fixture
def dev_settings(settings: Settings, dev_models: Path) -> Settings:
    """A data root with the `demo` dataset and a models root with the tiny FLUX.2 files."""
    write_trainable_dataset(settings, "demo")
    shutil.copytree(dev_models, settings.models_root, dirs_exist_ok=True)
    return settings


@pytest.mark.parametrize("named", [None, "flux2-dev"])
def test_dev_files_resolve_into_a_run_config(dev_settings: Settings, named: str | None) -> None:
    request = TrainRequest(output_name="demo", model_family=named, **DEV)
    config = resolve_config(settings=dev_settings, request=request)
    # written into run.json either way, as for every family that trains edit pairs (MAX_REFERENCES)
    assert config.model_family == "flux2-dev" and config.text_encoder == DEV["text_encoder"]
    family = family_for("flux2-dev")
    files = family.resolve_files(config, dev_settings.models_root)
    assert files.tokenizer == dev_settings.models_root / "tokenizers" / "mistral3"


def test_train_refuses_dev_without_its_text_encoder(dev_settings: Settings, client: TestClient) -> None:
    body = {
        "output_name": "demo",
        "model_family": "flux2-dev",
        **DEV,
        "text_encoder": "mistral-missing.safetensors",
    }
    response = client.post("/train", json=body)
    assert response.status_code == 404, response.text
    assert "text_encoder: model file 'mistral-missing.safetensors' not found" in response.text
    assert not dev_settings.runs_dir.is_dir() or not any(dev_settings.runs_dir.iterdir())


def test_the_trainer_refuses_klein_text_encoder_for_dev(dev_settings: Settings) -> None:
    config = TrainConfig(output_name="demo", **{**DEV, "text_encoder": "qwen_3_4b.safetensors"})
    with pytest.raises(InvalidInputError, match="'qwen_3_4b.safetensors' is a Qwen3 text encoder"):
        family_for("flux2-dev").resolve_files(config, dev_settings.models_root)


def test_train_refuses_klein_text_encoder_for_dev_before_a_run_exists(
    dev_settings: Settings, client: TestClient
) -> None:
    klein_text = dev_settings.models_root / "qwen_3_4b.safetensors"
    assert klein_text.is_file()
    body = {"output_name": "demo", "model_family": "flux2-dev", **DEV, "text_encoder": klein_text.name}
    response = client.post("/train", json=body)
    assert response.status_code == 422, response.text
    assert "is a Qwen3 text encoder" in response.text
    assert not dev_settings.runs_dir.is_dir() or not any(dev_settings.runs_dir.iterdir())
