"""/train on a local GPU host: the memory pre-flight refuses, or with memory_preset auto chooses."""

from __future__ import annotations

import json

import pytest

from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import RunDir
from fluxtrain.runs import service
from fluxtrain.runs.db import Database
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import create_run
from fluxtrain.runs.status import run_dir
from fluxtrain.settings import Settings
from fluxtrain.training import memory
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.tiny import tiny_transformer_config

DATASET = (
    '[general]\nresolution = 512\nbatch_size = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "demo"\n'
)


@pytest.fixture
def gpu_host(run_settings: Settings) -> Settings:
    """A local executor's host with one listed GPU; its memory is set by each test."""
    (run_settings.datasets_dir / "demo.toml").write_text(DATASET)
    run_settings.gpus = "0"
    return run_settings


def _estimate(**fields: object) -> int:
    shape = memory.TransformerShape.from_config(tiny_transformer_config())
    step = memory.StepSize(batch_size=2, image_tokens=1024, text_tokens=512, resolution=(512, 512))
    return memory.estimate_memory(shape, TrainConfig(output_name="demo", **fields), step).total


def test_a_run_that_does_not_fit_the_gpu_is_refused_before_it_exists(
    gpu_host: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "smallest_gpu_bytes", lambda: _estimate() - 1)
    request = TrainRequest(output_name="demo", gradient_checkpointing=False)
    with pytest.raises(InvalidInputError) as caught:
        create_run(settings=gpu_host, db=db, request=request)
    message = str(caught.value)
    assert "set gradient_checkpointing: true (saves ~" in message and "resolution (512x512)" in message
    assert not gpu_host.runs_dir.is_dir() or not any(gpu_host.runs_dir.iterdir())


def test_memory_preset_auto_records_its_choice_in_run_json(
    gpu_host: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "smallest_gpu_bytes", lambda: _estimate())
    request = TrainRequest(output_name="demo", gradient_checkpointing=False, memory_preset="auto")
    run = create_run(settings=gpu_host, db=db, request=request)
    saved = json.loads(RunDir(run_dir(gpu_host, run.id)).config.read_text())
    assert saved["gradient_checkpointing"] is True
    assert saved["memory_preset"] == "auto"
    assert saved["memory_preset_chosen"] == {"gradient_checkpointing": True}


def test_no_cuda_refuses_nothing_and_requests_cannot_fill_the_choice(
    gpu_host: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "smallest_gpu_bytes", lambda: None)
    request = TrainRequest(output_name="demo", memory_preset="auto", gradient_checkpointing=False)
    config = service.resolve_config(settings=gpu_host, request=request)
    assert config.memory_preset_chosen is None and config.gradient_checkpointing is False
    assert "memory_preset_chosen" not in TrainRequest.model_fields
