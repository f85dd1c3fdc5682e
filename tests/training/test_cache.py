"""The feature cache: entry names follow what they depend on, and a second fill encodes nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator

from fluxtrain.training import model_files
from fluxtrain.training.cache import (
    FeatureCache,
    LatentKey,
    cache_latents,
    cache_texts,
    file_identity,
    load_batch,
    open_cache,
    training_captions,
)
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.data import load_training_data
from fluxtrain.training.model_files import ModelFiles, resolve_model_files
from tests.training import helpers_runs as helpers


def _cache(root: Path, *, vae: str = "vae", text: str = "text", length: int = 256) -> FeatureCache:
    return FeatureCache(root, vae_id=vae, text_id=text, max_length=length)


def test_latent_names_change_with_content_model_size_and_flip(tmp_path: Path) -> None:
    key = LatentKey("a" * 64, (64, 64), False)
    path = _cache(tmp_path).latent_path(key)
    others = [
        _cache(tmp_path).latent_path(LatentKey("b" * 64, (64, 64), False)),  # other image content
        _cache(tmp_path).latent_path(LatentKey("a" * 64, (64, 48), False)),  # other bucket size
        _cache(tmp_path).latent_path(LatentKey("a" * 64, (64, 64), True)),  # mirrored
        _cache(tmp_path, vae="other vae").latent_path(key),  # other autoencoder
    ]
    assert len({path, *others}) == 5
    assert path == _cache(tmp_path, text="other", length=512).latent_path(key)  # text side is irrelevant


def test_text_names_change_with_caption_encoders_and_length(tmp_path: Path) -> None:
    path = _cache(tmp_path).text_path("zqx, a disc")
    others = [
        _cache(tmp_path).text_path("zqx, a square"),
        _cache(tmp_path, text="other encoders").text_path("zqx, a disc"),
        _cache(tmp_path, length=512).text_path("zqx, a disc"),
    ]
    assert len({path, *others}) == 4
    assert path == _cache(tmp_path, vae="other vae").text_path("zqx, a disc")


def test_file_identity_follows_the_files_size_and_time(tmp_path: Path) -> None:
    model = tmp_path / "ae.sft"
    model.write_bytes(b"1234")
    first = file_identity(model)
    assert file_identity(model) == first
    model.write_bytes(b"12345")
    second = file_identity(model)
    assert second != first
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert file_identity(model) != second
    copy = tmp_path / "copy" / "ae.sft"
    copy.parent.mkdir()
    shutil.copy2(model, copy)
    assert file_identity(copy) != file_identity(model)


@pytest.fixture
def files(tiny_models: Path) -> ModelFiles:
    return resolve_model_files(TrainConfig(output_name="x"), tiny_models)


def test_open_cache_keys_follow_the_models_and_t5_length(files: ModelFiles, tmp_path: Path) -> None:
    key = LatentKey("a" * 64, (64, 64), False)
    cache = open_cache(tmp_path, files, max_length=512)
    assert open_cache(tmp_path, files, max_length=512).latent_path(key) == cache.latent_path(key)
    assert open_cache(tmp_path, files, max_length=256).text_path("x") != cache.text_path("x")
    other_ae = tmp_path / "models" / "ae.sft"
    other_ae.parent.mkdir()
    shutil.copy(files.ae, other_ae)
    moved = open_cache(tmp_path, ModelFiles(**{**files.__dict__, "ae": other_ae}), max_length=512)
    assert moved.latent_path(key) != cache.latent_path(key)
    assert moved.text_path("x") == cache.text_path("x")


def test_a_second_fill_encodes_nothing_and_loads_no_model(
    files: ModelFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = helpers.make_dataset(tmp_path / "data", flip_aug=True)
    data = load_training_data(toml)
    captions = training_captions(data, caption_dropout_rate=0.1, sample_prompts=["zqx, a prompt"])
    assert "" in captions and captions[-1] == "zqx, a prompt"
    accelerator = Accelerator(cpu=True)
    cache = open_cache(tmp_path / "cache", files, max_length=256)
    kwargs: dict[str, Any] = {"files": files, "accelerator": accelerator, "dtype": torch.float32}
    assert cache_latents(cache, data, **kwargs) == (4, 0)  # two images, each also mirrored
    unique = len(set(captions))
    assert cache_texts(cache, captions, **kwargs) == (unique, 0)

    loaded: list[str] = []
    for name in ("load_autoencoder", "load_clip", "load_t5"):
        monkeypatch.setattr(model_files, name, lambda *a, _name=name, **k: loaded.append(_name))
    assert cache_latents(cache, data, **kwargs) == (0, 4)
    assert cache_texts(cache, captions, **kwargs) == (0, unique)
    assert loaded == []

    # A changed image is a new entry: only it is encoded again.
    monkeypatch.undo()
    image = data.images[0].path
    image.write_bytes(image.read_bytes() + b"\0")
    assert cache_latents(cache, load_training_data(toml), **kwargs) == (2, 2)


def test_a_batch_is_read_back_with_the_generators_flips_and_captions(
    files: ModelFiles, tmp_path: Path
) -> None:
    toml = helpers.make_dataset(tmp_path / "data", flip_aug=True)
    data = load_training_data(toml)
    cache = open_cache(tmp_path / "cache", files, max_length=256)
    kwargs: dict[str, Any] = {"files": files, "accelerator": Accelerator(cpu=True), "dtype": torch.float32}
    cache_latents(cache, data, **kwargs)
    cache_texts(cache, training_captions(data, caption_dropout_rate=0.0, sample_prompts=[]), **kwargs)

    def batch(seed: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        return load_batch(cache, data, [0, 1], caption_dropout_rate=0.0, generator=generator)

    latents, hidden, pooled = batch(0)
    assert latents.shape[0] == pooled.shape[0] == 2 and hidden.shape[:2] == (2, 256)
    assert all(torch.equal(a, b) for a, b in zip(batch(0), batch(0), strict=True))
    flipped = {bool(torch.equal(batch(seed)[0][0], latents[0])) for seed in range(12)}
    assert flipped == {True, False}  # some draws take the mirrored latent, some the plain one
