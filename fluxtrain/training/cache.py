"""Latents and text-encoder outputs, computed once and kept under the cache folder.

A latent is keyed by the image's content hash, the autoencoder file's identity, the bucket size
and whether it is mirrored; a text entry by the caption and both text encoders' identities and
the T5 length. Control images of edit pairs are latents like any other, keyed by their own
content and size. Entries are safetensors files written atomically, so a second run on the same
data (or a crashed first one) reuses every finished entry and loads no encoder at all.
Encoders, file identities and entry contents come from the run's model family (`families/`);
without one, FLUX.1's are used.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils.memory import clear_device_cache
from PIL import Image, ImageOps
from safetensors.torch import load_file, save

from fluxtrain.errors import InvalidInputError
from fluxtrain.fsutil import atomic_write_bytes
from fluxtrain.training.buckets import Size, fit_to_bucket
from fluxtrain.training.data import IMAGE_ERRORS, TrainingData
from fluxtrain.training.model_files import ModelFiles

if TYPE_CHECKING:
    from fluxtrain.training.families.family import Family, FamilyFiles, Reference, TextEncoder

log = logging.getLogger("fluxtrain.training")
ENCODE_BATCH = 4


def file_identity(path: Path) -> str:
    """A cheap identity of a model file or folder: resolved path, sizes and modification times."""
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = [str(path)]
    for file in files:
        stat = file.stat()
        parts.append(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()


@dataclass(frozen=True)
class LatentKey:
    image_sha256: str
    size: Size
    flip: bool


class TextEncoders:
    """CLIP-L (pooled output) and T5-XXL (hidden states), tokenised as FluxPipeline does."""

    def __init__(self, *, clip, clip_tokenizer, t5, t5_tokenizer, max_length: int) -> None:
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """T5 hidden states `t5` (B, L, D) in bf16 and CLIP's pooled output `pooled` (B, 768) in float32,
        on the CPU, as they are cached."""
        clip_ids = self.clip_tokenizer(
            captions,
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.clip.device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.t5.device)
        hidden = self.t5(t5_ids, output_hidden_states=False).last_hidden_state
        return {"t5": hidden.float().cpu().to(torch.bfloat16), "pooled": pooled.float().cpu()}


def image_tensor(path: Path, size: Size, *, flip: bool) -> torch.Tensor:
    """The image fitted to its bucket as a (3, H, W) tensor in [-1, 1]."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except IMAGE_ERRORS as exc:
        raise InvalidInputError(f"image {path} cannot be read: {exc}") from exc
    image = fit_to_bucket(image, size)
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents (the distribution's mean) of a pixel batch in [-1, 1]."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    mean = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((mean - shift) * vae.config.scaling_factor).float().cpu()


class FeatureCache:
    """Where the cached tensors live, under names derived from what they depend on."""

    def __init__(self, root: Path, *, vae_id: str, text_id: str, max_length: int) -> None:
        self.root = root
        self.vae_id = vae_id
        self.max_length = max_length
        self.text_id = f"{text_id}:{max_length}"

    def latent_path(self, key: LatentKey) -> Path:
        name = _key("latent", self.vae_id, key.image_sha256, key.size, key.flip)
        return self.root / "latents" / name[:2] / f"{name}.safetensors"

    def text_path(self, caption: str) -> Path:
        name = _key("text", self.text_id, caption)
        return self.root / "text" / name[:2] / f"{name}.safetensors"

    def load_latent(self, key: LatentKey) -> torch.Tensor:
        return load_file(self.latent_path(key))["latent"]

    def load_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_file(self.text_path(caption))
        return tensors["t5"].float(), tensors["pooled"]

    def load_text_features(self, caption: str) -> dict[str, torch.Tensor]:
        """A caption's cached text features as stored (names and dtypes are the family's)."""
        return load_file(self.text_path(caption))

    def fill_latents(
        self,
        wanted: dict[LatentKey, Path],
        load_vae: Callable[[], object],
        encode: Callable[[object, torch.Tensor], torch.Tensor] = encode_latents,
    ) -> tuple[int, int]:
        """Encode every missing latent with `encode(vae, pixels)`; returns (encoded, from cache)."""
        missing = [key for key in wanted if not self.latent_path(key).exists()]
        if missing:
            vae = load_vae()
            for chunk in _chunks(missing, ENCODE_BATCH):
                by_size: dict[Size, list[LatentKey]] = {}
                for key in chunk:
                    by_size.setdefault(key.size, []).append(key)
                for keys in by_size.values():
                    pixels = torch.stack([image_tensor(wanted[k], k.size, flip=k.flip) for k in keys])
                    for key, latent in zip(keys, encode(vae, pixels), strict=True):
                        atomic_write_bytes(self.latent_path(key), save({"latent": latent.contiguous()}))
        return len(missing), len(wanted) - len(missing)

    def fill_texts(
        self, captions: Iterable[str], load_encoders: Callable[[], TextEncoder]
    ) -> tuple[int, int]:
        """Encode every missing caption; returns (encoded, from cache)."""
        unique = list(dict.fromkeys(captions))
        missing = [caption for caption in unique if not self.text_path(caption).exists()]
        if missing:
            encoders = load_encoders()
            for chunk in _chunks(missing, ENCODE_BATCH):
                features = encoders.encode(list(chunk))
                for row, caption in enumerate(chunk):
                    tensors = {name: value[row].contiguous() for name, value in features.items()}
                    atomic_write_bytes(self.text_path(caption), save(tensors))
        return len(missing), len(unique) - len(missing)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def open_cache(root: Path, files: ModelFiles, *, max_length: int) -> FeatureCache:
    """The cache entries of this run's autoencoder and text encoders, T5 padded to `max_length`."""
    return FeatureCache(
        root,
        vae_id=file_identity(files.ae),
        text_id=f"{file_identity(files.clip_l)}:{file_identity(files.t5xxl)}",
        max_length=max_length,
    )


def training_captions(
    data: TrainingData, *, caption_dropout_rate: float, sample_prompts: list[str]
) -> list[str]:
    """Every text a run encodes: its captions, the empty caption when captions drop, its sample prompts."""
    captions = [caption for image in data.images for caption in image.captions]
    if caption_dropout_rate > 0:
        captions.append("")
    return captions + list(sample_prompts)


def _family(family: Family | None) -> Family:
    from fluxtrain.training.families.family import family_for

    return family if family is not None else family_for("flux1")


def cache_latents(
    cache: FeatureCache,
    data: TrainingData,
    *,
    files: FamilyFiles,
    accelerator: Accelerator,
    dtype: torch.dtype,
    family: Family | None = None,
) -> tuple[int, int]:
    """Encode the latents the cache lacks, each flip included (main process first, so other ranks
    only read); returns (encoded, from cache)."""
    family = _family(family)
    wanted: dict[LatentKey, Path] = {}
    for image in data.images:
        for flip in (False, True) if image.flip_aug else (False,):
            wanted[LatentKey(image.sha256, image.bucket, flip)] = image.path
        for path, sha, size in zip(image.controls, image.control_sha256, image.control_buckets, strict=True):
            wanted[LatentKey(sha, size, False)] = path

    def load_vae() -> object:
        log.info("loading autoencoder")
        return family.load_autoencoder(files, dtype=dtype, device=accelerator.device)

    with accelerator.main_process_first():
        counts = cache.fill_latents(wanted, load_vae, family.encode_latents)
        clear_device_cache(garbage_collection=True)
    return counts


def cache_texts(
    cache: FeatureCache,
    captions: list[str],
    *,
    files: FamilyFiles,
    accelerator: Accelerator,
    dtype: torch.dtype,
    family: Family | None = None,
) -> tuple[int, int]:
    """Encode the captions and prompts the cache lacks (main process first); returns (encoded, from cache)."""
    family = _family(family)

    def load_encoders() -> TextEncoder:
        log.info("loading text encoders")
        return family.load_text_encoder(
            files, dtype=dtype, device=accelerator.device, max_length=cache.max_length
        )

    with accelerator.main_process_first():
        counts = cache.fill_texts(captions, load_encoders)
        clear_device_cache(garbage_collection=True)
    return counts


def load_features_batch(
    cache: FeatureCache,
    data: TrainingData,
    indices: list[int],
    *,
    caption_dropout_rate: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(latents, text features stacked by name) of one batch, any family: the same draws from
    `generator` as `load_batch`, so a FLUX.1 run trains on the same images, flips and captions."""
    latents, texts = [], []
    for index in indices:
        image = data.images[index]
        flip = image.flip_aug and bool(torch.rand(1, generator=generator) < 0.5)
        latents.append(cache.load_latent(LatentKey(image.sha256, image.bucket, flip)))
        drop = caption_dropout_rate > 0 and float(torch.rand(1, generator=generator)) < caption_dropout_rate
        choice = int(torch.randint(len(image.captions), (1,), generator=generator))
        texts.append(cache.load_text_features("" if drop else image.captions[choice]))
    stacked = {name: torch.stack([text[name] for text in texts]) for name in texts[0]}
    return torch.stack(latents), stacked


def load_batch(
    cache: FeatureCache,
    data: TrainingData,
    indices: list[int],
    *,
    caption_dropout_rate: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, T5 states in float32, CLIP pooled) of one FLUX.1 batch (`load_features_batch`)."""
    latents, text = load_features_batch(
        cache, data, indices, caption_dropout_rate=caption_dropout_rate, generator=generator
    )
    return latents, text["t5"].float(), text["pooled"]


def load_references(cache: FeatureCache, data: TrainingData, indices: list[int]) -> Reference | None:
    """The batch's reference latents: one (B, C, h, w) tensor when each target has one control (all
    FLUX.1 Kontext takes), a list of them in reference order when each has several (FLUX.2); None
    for a batch without edit pairs. A batch shares its control sizes (`data.epoch_batches`)."""
    images = [data.images[index] for index in indices]
    if not images[0].controls:
        return None
    references = [
        torch.stack(
            [
                cache.load_latent(LatentKey(image.control_sha256[i], image.control_buckets[i], False))
                for image in images
            ]
        )
        for i in range(len(images[0].controls))
    ]
    return references[0] if len(references) == 1 else references
