"""The model-family seam: what the shared trainer asks of a family, and the family of a run.

Loop, caching, bucketing, resume, events, checkpoints, validation, sampling and export are shared;
a `Family` says how its files load, how its latents and text features are made, how a batch
enters its transformer, which modules its LoRA targets and how its LoRA is named in other tools.
Text features travel as the dict of tensors the cache stores per caption (FLUX.1: `t5`, `pooled`;
FLUX.2: `hidden`), so nothing outside the family reads their names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image

from fluxtrain.model_paths import resolve_model_path
from fluxtrain.training.families.detect import ModelFamily
from fluxtrain.training.model_checks import check_model_family

if TYPE_CHECKING:
    from fluxtrain.training.cache import FeatureCache
    from fluxtrain.training.config import TrainConfig
    from fluxtrain.training.convert import ModuleRule
    from fluxtrain.training.flow import TimestepSampling

TextFeatures = Mapping[str, torch.Tensor]
Reference = torch.Tensor | list[torch.Tensor]
"""An edit pair's reference latents: one (B, C, h, w) tensor, or one per reference in order when each
target has several (FLUX.2 takes several; Kontext one, so it only ever sees a tensor)."""


class FamilyFiles(Protocol):
    """A run's resolved model files: every family has a transformer and an autoencoder."""

    transformer: Path
    ae: Path


class TextEncoder(Protocol):
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Each tensor batched over `captions`, on the CPU, in the dtype it is cached in."""
        ...


class Family(Protocol):
    """One model family, as the shared trainer uses it."""

    name: ModelFamily
    lora_targets: str  # peft's target_modules regex over diffusers module names
    timestep_sampling: TimestepSampling  # the default when the run names none

    def resolve_files(self, config: TrainConfig, models_root: Path) -> FamilyFiles: ...

    def open_cache(self, root: Path, files: Any, config: TrainConfig) -> FeatureCache: ...

    def load_autoencoder(self, files: Any, *, dtype: torch.dtype, device: torch.device | str) -> Any: ...

    def encode_latents(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor: ...

    def load_text_encoder(
        self, files: Any, *, dtype: torch.dtype, device: torch.device | str, max_length: int
    ) -> TextEncoder: ...

    def load_transformer(self, path: Path, *, dtype: torch.dtype) -> torch.nn.Module: ...

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents as the transformer's image tokens, in the order it predicts them."""
        ...

    def predict_velocity(
        self,
        model: torch.nn.Module,
        noisy: torch.Tensor,
        t: torch.Tensor,
        text: TextFeatures,
        *,
        guidance: float | None,
        dtype: torch.dtype,
        reference: Reference | None = None,
    ) -> torch.Tensor:
        """`reference`: an edit pair's reference latents, None without edit pairs."""
        ...

    def generate(
        self,
        transformer: torch.nn.Module,
        vae: Any,
        *,
        text: TextFeatures,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        reference: Reference | None = None,
    ) -> Image.Image: ...

    def module_rules(self, config: Mapping[str, Any]) -> list[ModuleRule]:
        """Every transformer module as a BFL <-> diffusers pair, for the kohya and BFL LoRA layouts."""
        ...

    def architecture(self, config: Mapping[str, Any]) -> tuple[str, str]:
        """(kohya's ss_base_model_version, the model spec's architecture) of this family's LoRAs."""
        ...


def family_for(name: ModelFamily) -> Family:
    """The trainer's implementation of a family."""
    if name in ("flux1", "flux1-kontext"):
        from fluxtrain.training.families.flux1 import Flux1

        return Flux1(name)
    if name in ("flux2-klein-4b", "flux2-klein-9b"):
        from fluxtrain.training.families.klein import Klein

        return Klein(name)
    if name == "flux2-dev":
        from fluxtrain.training.families.flux2_dev import Flux2Dev

        return Flux2Dev(name)
    raise ValueError(f"no trainer for model family {name!r}")


def run_family(config: TrainConfig, models_root: Path) -> Family:
    """The family of a run's transformer file, matched against the config's `model_family`."""
    path = resolve_model_path(models_root, "pretrained_model", config.pretrained_model)
    return family_for(check_model_family(path, config.pretrained_model, config.model_family))
