"""/train's model-family check: detected from the transformer file, matched against `model_family`."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import resolve_config
from fluxtrain.settings import Settings
from fluxtrain.training.tiny_flux2 import write_tiny_flux2_files


def test_flux1_files_train_as_before_and_may_name_their_family(run_settings: Settings) -> None:
    assert (
        resolve_config(settings=run_settings, request=TrainRequest(output_name="demo")).model_family is None
    )
    named = TrainRequest(output_name="demo", model_family="flux1")
    assert resolve_config(settings=run_settings, request=named).model_family == "flux1"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            {"pretrained_model": "flux-2-klein-4b.safetensors", "ae": "flux2-vae.safetensors"},
            "text_encoder: model file 'qwen_3_4b-missing.safetensors' not found",
        ),
        (
            {"model_family": "flux2-klein-9b", "pretrained_model": "flux-2-klein-4b.safetensors"},
            "model_family: 'flux2-klein-9b' (FLUX.2 [klein] 9B) was asked for, but pretrained_model "
            "'flux-2-klein-4b.safetensors' is a FLUX.2 [klein] 4B transformer",
        ),
        (
            {"model_family": "flux2-dev"},
            "model_family: 'flux2-dev' (FLUX.2 [dev]) was asked for, but pretrained_model 'flux1-dev.sft' "
            "is a FLUX.1 transformer ('flux1')",
        ),
        (
            {"model_family": "flux1-kontext"},
            "model_family 'flux1-kontext' (FLUX.1 Kontext) trains on edit pairs, but dataset config "
            "demo.toml names no control_directory",
        ),
        ({"model_family": "flux3"}, "model_family"),
    ],
)
def test_train_refuses_families_it_cannot_train_with_a_422(
    run_settings: Settings, client: TestClient, body: dict, needle: str
) -> None:
    write_tiny_flux2_files(run_settings.models_root)
    if "ae" in body:
        body = {**body, "text_encoder": "qwen_3_4b-missing.safetensors"}
    response = client.post("/train", json={"output_name": "demo", **body})
    assert response.status_code in (404, 422), response.text
    assert needle in response.text
    assert not run_settings.runs_dir.is_dir() or not any(run_settings.runs_dir.iterdir())


def test_klein_files_resolve_with_their_own_model_fields(run_settings: Settings) -> None:
    """A FLUX.2 [klein] run names text_encoder and ae; FLUX.1's clip_l and t5xxl are not needed."""
    write_tiny_flux2_files(run_settings.models_root)
    request = TrainRequest(
        output_name="demo",
        pretrained_model="flux-2-klein-4b.safetensors",
        ae="flux2-vae.safetensors",
        text_encoder="qwen_3_4b.safetensors",
        clip_l="absent.safetensors",
        t5xxl="absent.safetensors",
    )
    config = resolve_config(settings=run_settings, request=request)
    assert config.text_encoder == "qwen_3_4b.safetensors" and config.timestep_sampling is None
