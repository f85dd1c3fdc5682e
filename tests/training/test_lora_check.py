"""A run succeeds only with a LoRA file that loads: the check after each write, on tiny models.

Files are corrupted by hooking the writer (`export.save_lora`), so the real trainer path runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from fluxtrain.rundir import read_events, rejected_lora
from fluxtrain.training import __main__ as trainer_main
from fluxtrain.training import export
from fluxtrain.training.config import load_config
from fluxtrain.training.lora import add_lora, lora_state_dict
from fluxtrain.training.lora_check import LoraCheckError, check_lora_file
from fluxtrain.training.model_files import load_transformer
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers

Mutation = Callable[[dict[str, torch.Tensor], dict[str, str]], None]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One dataset and one feature cache for every run of this module: only the first run encodes."""
    root = tmp_path_factory.mktemp("lora_check")
    return {"toml": helpers.make_dataset(root / "data"), "cache": root / "cache"}


def _run(tmp_path: Path, models: Path, dataset: dict[str, Path], save_format: str) -> Path:
    """A two-step run (final LoRA only) in `save_format`; returns its run directory after training."""
    run = helpers.make_run(
        tmp_path / "run",
        models=models,
        toml=dataset["toml"],
        cache=dataset["cache"],
        max_train_steps=2,
        save_format=save_format,
    )
    Trainer(run, load_config(run / "run.json"), stop=StopFlag()).run()
    return run


def _rewrite(path: Path, mutate: Mutation) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    mutate(tensors, metadata)
    path.write_bytes(save(tensors, metadata=metadata))


def _corrupt_writer(monkeypatch: pytest.MonkeyPatch, mutate: Mutation) -> None:
    original = export.save_lora

    def writer(path: Path, lora: dict[str, torch.Tensor], **kwargs: Any) -> None:
        original(path, lora, **kwargs)
        _rewrite(path, mutate)

    monkeypatch.setattr(export, "save_lora", writer)


def _rename(old: str, new: str) -> Mutation:
    return lambda tensors, _: tensors.__setitem__(new, tensors.pop(old))


def _reshape(key: str) -> Mutation:
    return lambda tensors, _: tensors.__setitem__(key, tensors[key][:-1].clone())


def _drop_metadata(key: str) -> Mutation:
    return lambda _, metadata: metadata.pop(key)


def _zero_up(tensors: dict[str, torch.Tensor], _: dict[str, str]) -> None:
    for key in tensors:
        if ".lora_B." in key or ".lora_up." in key:
            tensors[key] = torch.zeros_like(tensors[key])


def _vector_alpha(tensors: dict[str, torch.Tensor], _: dict[str, str]) -> None:
    key = "lora_unet_double_blocks_0_img_attn_qkv.alpha"
    tensors[key] = tensors[key].reshape(1)


Q_A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
QKV_UP = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"


@pytest.mark.parametrize("save_format", ["diffusers", "kohya"])
def test_a_good_run_passes_the_check_and_succeeds(
    tiny_models: Path, dataset: dict[str, Path], tmp_path: Path, save_format: str, caplog: Any
) -> None:
    with caplog.at_level("INFO", logger="fluxtrain.training"):
        run = _run(tmp_path, tiny_models, dataset, save_format)
    final = run / "output" / "tiny.safetensors"
    assert final.is_file() and not rejected_lora(final).exists()
    assert read_events(run / "events.jsonl")[-1]["event"] == "finished"
    assert "LoRA check: tiny.safetensors loads" in caplog.text


@pytest.mark.parametrize(
    ("save_format", "mutate", "needle"),
    [
        ("diffusers", _rename(Q_A, Q_A.replace("to_q", "to_qx")), "to_qx.lora_A.weight: transformer_blocks"),
        ("diffusers", _drop_metadata("ss_network_dim"), "metadata ss_network_dim: missing"),
        (
            "kohya",
            _rename(QKV_UP, QKV_UP.replace("qkv", "qkvx")),
            "img_attn_qkvx.lora_up.weight: not a kohya",
        ),
        ("kohya", _reshape(QKV_UP), f"{QKV_UP}: shape [95, 12], the model needs [96, 12]"),
    ],
)
def test_a_file_that_does_not_load_fails_the_run_naming_the_tensor(
    tiny_models: Path,
    dataset: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    save_format: str,
    mutate: Mutation,
    needle: str,
) -> None:
    _corrupt_writer(monkeypatch, mutate)
    with pytest.raises(LoraCheckError) as failure:
        _run(tmp_path, tiny_models, dataset, save_format)
    message = str(failure.value)
    assert message.startswith("LoRA file tiny.safetensors does not load: ")
    assert needle in message
    final = tmp_path / "run" / "output" / "tiny.safetensors"
    assert not final.exists() and rejected_lora(final).is_file()
    assert "finished" not in [e["event"] for e in read_events(tmp_path / "run" / "events.jsonl")]


METADATA = {"ss_network_dim": "4", "ss_base_model_version": "flux1", "ss_steps": "7"}


@pytest.fixture(scope="module")
def trained(tiny_models: Path) -> torch.nn.Module:
    """The tiny transformer with an adapter moved away from its start, as training leaves it."""
    transformer = load_transformer(tiny_models / "flux1-dev.sft", dtype=torch.float32)
    add_lora(transformer, rank=4, alpha=8.0, dtype=torch.float32)
    generator = torch.Generator("cpu").manual_seed(1)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 1e-2
    return transformer


def _write(path: Path, transformer: torch.nn.Module, save_format: str, dtype: torch.dtype) -> dict[str, Any]:
    options: dict[str, Any] = {"save_format": save_format, "rank": 4, "dtype": dtype}
    export.save_lora(
        path, lora_state_dict(transformer), alpha=8.0, metadata=METADATA, config=transformer.config, **options
    )
    return {**options, "metadata": METADATA}


@pytest.mark.parametrize(
    ("save_format", "mutate", "needle"),
    [
        (None, None, None),
        ("diffusers", _reshape(Q_A), f"{Q_A}: shape [3, 32], the model needs [4, 32]"),
        ("diffusers", _zero_up, "changes nothing (B is all zero) where the trained adapter changes"),
        ("kohya", _drop_metadata("ss_base_model_version"), "metadata ss_base_model_version: missing"),
        ("kohya", _vector_alpha, "img_attn_qkv.alpha: must be one number, holds shape [1]"),
        ("kohya", lambda _, metadata: metadata.update(ss_steps="8"), "ss_steps: is '8', the run wrote '7'"),
    ],
)
def test_the_check_reads_both_layouts_against_the_trained_adapter(
    trained: torch.nn.Module,
    tmp_path: Path,
    save_format: str | None,
    mutate: Mutation | None,
    needle: str | None,
) -> None:
    if mutate is None:
        for layout, dtype in (
            ("diffusers", torch.bfloat16),
            ("kohya", torch.float16),
            ("kohya", torch.float32),
        ):
            path = tmp_path / f"{layout}-{dtype}.safetensors"
            check_lora_file(path, trained, **_write(path, trained, layout, dtype))
        return
    path = tmp_path / "bad.safetensors"
    options = _write(path, trained, save_format, torch.float32)
    _rewrite(path, mutate)
    with pytest.raises(LoraCheckError, match=re.escape(needle)):
        check_lora_file(path, trained, **options)
    assert rejected_lora(path).is_file()


def test_an_untrained_adapter_passes_as_identity_and_a_moved_file_does_not(
    tiny_models: Path, tmp_path: Path
) -> None:
    """Step 0 (peft starts B at zero): the file must be the identity too, and that is what passes."""
    transformer = load_transformer(tiny_models / "flux1-dev.sft", dtype=torch.float32)
    add_lora(transformer, rank=4, alpha=4.0, dtype=torch.float32)
    path = tmp_path / "step0.safetensors"
    options: dict[str, Any] = {"save_format": "diffusers", "rank": 4, "dtype": torch.float32}
    metadata = {"ss_steps": "0"}
    export.save_lora(path, lora_state_dict(transformer), alpha=4.0, metadata=metadata, config={}, **options)
    check_lora_file(path, transformer, metadata=metadata, **options)

    def nudge(tensors: dict[str, torch.Tensor], _: dict[str, str]) -> None:
        tensors[Q_A.replace("lora_A", "lora_B")] += 1e-3

    _rewrite(path, nudge)
    with pytest.raises(LoraCheckError, match="to_q: changes the output where the trained adapter is still"):
        check_lora_file(path, transformer, metadata=metadata, **options)


def test_the_trainer_process_reports_the_failure_as_an_error_and_exits_1(
    tiny_models: Path, dataset: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m fluxtrain.training`'s own path: an `error` event naming file and tensor, exit 1;
    the executor settles exit 1 with an error event as `failed` (tests/runs/test_executor.py)."""
    monkeypatch.setattr(trainer_main.STOP, "install", lambda: None)  # no signal handlers in pytest
    monkeypatch.setattr(trainer_main.logging, "basicConfig", lambda **_: None)
    _corrupt_writer(monkeypatch, _rename(Q_A, Q_A.replace("to_q", "to_qx")))
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=dataset["toml"], cache=dataset["cache"], max_train_steps=2
    )
    assert trainer_main.main([str(run)]) == 1
    last = read_events(run / "events.jsonl")[-1]
    assert last["event"] == "error" and last["kind"] == "internal"
    assert last["message"].startswith("LoraCheckError: LoRA file tiny.safetensors does not load: ")
    assert "transformer.transformer_blocks.0.attn.to_qx.lora_A.weight" in last["message"]
    assert not (run / "output" / "tiny.safetensors").exists()
