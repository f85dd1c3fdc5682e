"""What /train checks before a run exists: model files by their headers, GPUs, and UTC timestamps."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import text

from fluxtrain.errors import InvalidInputError
from fluxtrain.runs.db import Database
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import create_run, get_run, resolve_config
from fluxtrain.runs.status import build_status
from fluxtrain.runs.table import Run
from fluxtrain.settings import Settings
from fluxtrain.training.config import RUN_PATHS, cuda_only_options, load_config


def _check(settings: Settings, **fields: object) -> None:
    resolve_config(settings=settings, request=TrainRequest(output_name="demo", **fields))


def _folder(settings: Settings, name: str, config: dict | None) -> str:
    folder = settings.models_root / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return name


def test_the_tiny_flux_files_pass(run_settings: Settings) -> None:
    _check(run_settings)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("pretrained_model", "tokenizers", "neither config.json nor transformer/config.json"),
        ("pretrained_model", "notes.sft", "not a readable safetensors file"),
        ("pretrained_model", "ae.sft", "no FLUX transformer weights"),
        ("pretrained_model", "clip_l.safetensors", "no FLUX transformer weights"),
        ("pretrained_model", "tokenizers/clip_l/tokenizer.json", "must be a .sft or .safetensors"),
        ("ae", "notes.sft", "not a readable safetensors file"),
        ("ae", "tokenizers", "neither config.json nor vae/config.json"),
        ("clip_l", "notes.sft", "not a readable safetensors file"),
        ("t5xxl", "tokenizers/t5xxl", "neither config.json nor text_encoder_2/config.json"),
    ],
)
def test_wrong_model_files_are_refused_naming_field_and_file(
    run_settings: Settings, db: Database, field: str, value: str, needle: str
) -> None:
    (run_settings.models_root / "notes.sft").write_text("these are my notes, not weights\n")
    with pytest.raises(InvalidInputError) as caught:
        create_run(settings=run_settings, db=db, request=TrainRequest(output_name="demo", **{field: value}))
    message = str(caught.value)
    assert message.startswith(f"{field}: '{value}'") and needle in message, message
    assert not run_settings.runs_dir.is_dir() or not any(run_settings.runs_dir.iterdir())
    with db.session() as session:
        assert session.query(Run).count() == 0


def test_diffusers_folders_and_prefixed_single_files_pass(run_settings: Settings) -> None:
    flux = {"_class_name": "FluxTransformer2DModel"}
    _check(run_settings, pretrained_model=_folder(run_settings, "flux-transformer", flux))
    pipeline = _folder(run_settings, "flux-pipeline", {"_class_name": "FluxPipeline"})
    _folder(run_settings, "flux-pipeline/transformer", flux)
    _folder(run_settings, "flux-pipeline/vae", {"_class_name": "AutoencoderKL"})
    _check(run_settings, pretrained_model=pipeline, ae=pipeline)
    weight = torch.zeros(2, 2)
    save_file(
        {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": weight},
        str(run_settings.models_root / "comfy.safetensors"),
    )
    save_file(
        {"transformer_blocks.0.attn.to_q.weight": weight}, str(run_settings.models_root / "diffusers.sft")
    )
    _check(run_settings, pretrained_model="comfy.safetensors")
    _check(run_settings, pretrained_model="diffusers.sft")


def test_a_folder_of_another_model_class_is_not_a_transformer(run_settings: Settings) -> None:
    vae = _folder(run_settings, "vae-folder", {"_class_name": "AutoencoderKL"})
    with pytest.raises(
        InvalidInputError, match="not a FLUX transformer: config.json names class 'AutoencoderKL'"
    ):
        _check(run_settings, pretrained_model=vae)


def test_more_than_one_gpu_is_refused_on_a_host_without_one(run_settings: Settings) -> None:
    run_settings.gpus = ""
    with pytest.raises(InvalidInputError, match="gpus: this host has no GPU; gpus must be 1"):
        _check(run_settings, gpus=2)
    _check(run_settings, gpus=1)
    _check(run_settings.model_copy(update={"executor": "ray"}), gpus=2)


def test_timestamps_come_out_in_utc_with_an_offset(
    submit: Callable[..., Run], make_executor: Callable, drive: Callable, run_settings: Settings, db: Database
) -> None:
    run = submit("demo", max_train_steps=1)
    done = drive(make_executor(), run.id, lambda r: r.status == "succeeded")
    body = json.loads(build_status(run_settings, done).model_dump_json())
    for field in ("created_at", "started_at", "finished_at"):
        stamp = datetime.fromisoformat(body[field])
        assert stamp.utcoffset() == timedelta(0), body[field]
    with db.session() as session:
        session.execute(
            text("UPDATE runs SET created_at = '2025-01-02 03:04:05.000006' WHERE id = :id"), {"id": run.id}
        )
    assert get_run(db=db, run_id=run.id).created_at.isoformat() == "2025-01-02T03:04:05.000006+00:00"


def test_train_follows_a_link_the_administrator_placed_in_the_models_folder(
    run_settings: Settings, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-mount"
    shared.mkdir()
    (run_settings.models_root / "ae.sft").rename(shared / "ae.sft")
    (run_settings.models_root / "ae.sft").symlink_to(shared / "ae.sft")
    (run_settings.models_root / "mount").symlink_to(shared, target_is_directory=True)
    _check(run_settings)
    _check(run_settings, ae="mount/ae.sft")


@pytest.mark.parametrize("value", ["../ae.sft", "mount/../../ae.sft"])
def test_train_refuses_a_path_that_climbs_out_by_its_text(run_settings: Settings, value: str) -> None:
    with pytest.raises(InvalidInputError, match=f"ae: '{re.escape(value)}' leaves the models folder"):
        _check(run_settings, ae=value)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"fp8_base": True}, "fp8_base needs a CUDA GPU"),
        ({"optimizer": "adamw8bit"}, "optimizer 'adamw8bit' needs a CUDA GPU"),
        ({"optimizer": "adamw8bit", "fp8_base": True}, "optimizer 'adamw8bit' and fp8_base need a CUDA GPU"),
    ],
)
def test_cuda_only_options_are_judged_by_the_host_that_runs_the_trainer(
    run_settings: Settings, fields: dict, named: str
) -> None:
    run_settings.gpus = ""
    with pytest.raises(InvalidInputError, match=re.escape(named) + r".*FLUXTRAIN_EXECUTOR=local"):
        _check(run_settings, **fields)
    ray = run_settings.model_copy(update={"executor": "ray"})
    config = resolve_config(settings=ray, request=TrainRequest(output_name="demo", **fields))
    expected = [part for part in ("optimizer 'adamw8bit'", "fp8_base") if part in named]
    assert cuda_only_options(config) == expected
    run_settings.gpus = "0"
    _check(run_settings, **fields)


def test_train_answers_422_for_fp8_base_on_a_gpu_less_local_host(
    run_settings: Settings, db: Database
) -> None:
    run_settings.gpus = ""
    with pytest.raises(InvalidInputError, match="fp8_base"):
        create_run(settings=run_settings, db=db, request=TrainRequest(output_name="demo", fp8_base=True))
    assert not run_settings.runs_dir.exists() or not any(run_settings.runs_dir.iterdir())


def test_the_trainer_refuses_cuda_only_options_on_a_machine_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.json"
    paths = {field: str(tmp_path / field) for field in RUN_PATHS}
    path.write_text(json.dumps({"output_name": "x", "fp8_base": True, **paths}), encoding="utf-8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="fp8_base needs a CUDA GPU and this machine has none"):
        load_config(path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(path).fp8_base


@pytest.mark.parametrize("field", ["dataset_config", "models_root", "cache_dir"])
def test_run_json_names_every_path_the_trainer_uses(tmp_path: Path, field: str) -> None:
    path = tmp_path / "run.json"
    paths = {name: str(tmp_path / name) for name in RUN_PATHS if name != field}
    path.write_text(json.dumps({"output_name": "x", **paths}), encoding="utf-8")
    with pytest.raises(InvalidInputError, match=f"{field} missing"):
        load_config(path)


def test_run_json_as_written_by_create_run_names_every_path(run_settings: Settings, db: Database) -> None:
    run = create_run(settings=run_settings, db=db, request=TrainRequest(output_name="demo"))
    config = load_config(run_settings.runs_dir / run.id / "run.json")
    assert config.dataset_config == (run_settings.datasets_dir / "demo.toml").resolve()
    assert (config.models_root, config.cache_dir) == (run_settings.models_root, run_settings.cache_dir)
