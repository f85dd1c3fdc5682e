"""FLUX.1 (dev, schnell) as a `Family`: the trainer's original code behind the seam, unchanged.

Files load through `model_files.py`, latents through `cache.encode_latents`, text through CLIP-L
and T5-XXL (`cache.TextEncoders`), a batch enters through `flow.predict_velocity`, samples through
`sampling.generate`, and the LoRA targets `lora.TARGET_PATTERN`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fluxtrain.training import flow, model_files, sampling
from fluxtrain.training.cache import FeatureCache, TextEncoders, encode_latents, open_cache
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.convert import ModuleRule, transformer_module_rules
from fluxtrain.training.families.detect import ModelFamily
from fluxtrain.training.families.family import TextFeatures
from fluxtrain.training.flow import TimestepSampling
from fluxtrain.training.lora import TARGET_PATTERN
from fluxtrain.training.model_checks import transformer_has_guidance
from fluxtrain.training.model_files import ModelFiles, resolve_model_files


class Flux1:
    """FLUX.1's files, features, inputs and LoRA targets; Kontext is FLUX.1 dev with a reference image."""

    lora_targets: str = TARGET_PATTERN
    timestep_sampling: TimestepSampling = "shift"

    def __init__(self, name: ModelFamily = "flux1") -> None:
        self.name = name

    def resolve_files(self, config: TrainConfig, models_root: Path) -> ModelFiles:
        return resolve_model_files(config, models_root)

    def open_cache(self, root: Path, files: ModelFiles, config: TrainConfig) -> FeatureCache:
        """T5 padded to 512 tokens for a guidance-distilled (dev) transformer, 256 for schnell."""
        guided = transformer_has_guidance(files.transformer, config.pretrained_model)
        return open_cache(root, files, max_length=512 if guided else 256)

    def load_autoencoder(self, files: ModelFiles, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        return model_files.load_autoencoder(files.ae, dtype=dtype, device=device)

    def encode_latents(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        return encode_latents(vae, pixels)

    def load_text_encoder(
        self, files: ModelFiles, *, dtype: torch.dtype, device: torch.device | str, max_length: int
    ) -> TextEncoders:
        clip, clip_tokenizer = model_files.load_clip(
            files.clip_l, tokenizer_dir=files.clip_tokenizer, dtype=dtype, device=device
        )
        t5, t5_tokenizer = model_files.load_t5(
            files.t5xxl, tokenizer_dir=files.t5_tokenizer, dtype=dtype, device=device
        )
        return TextEncoders(
            clip=clip, clip_tokenizer=clip_tokenizer, t5=t5, t5_tokenizer=t5_tokenizer, max_length=max_length
        )

    def load_transformer(self, path: Path, *, dtype: torch.dtype) -> torch.nn.Module:
        return model_files.load_transformer(path, dtype=dtype)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return flow.pack_latents(latents)

    def predict_velocity(
        self,
        model: torch.nn.Module,
        noisy: torch.Tensor,
        t: torch.Tensor,
        text: TextFeatures,
        *,
        guidance: float | None,
        dtype: torch.dtype,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return flow.predict_velocity(
            model, noisy, t, text["t5"], text["pooled"], guidance=guidance, dtype=dtype, reference=reference
        )

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
        reference: torch.Tensor | None = None,
    ) -> Image.Image:
        return sampling.generate(
            transformer,
            vae,
            t5=text["t5"],
            pooled=text["pooled"],
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            device=device,
            dtype=dtype,
            reference=reference,
        )

    def module_rules(self, config: Mapping[str, Any]) -> list[ModuleRule]:
        return transformer_module_rules(
            num_double=int(config["num_layers"]),
            num_single=int(config["num_single_layers"]),
            guidance=bool(config["guidance_embeds"]),
        )

    def architecture(self, config: Mapping[str, Any]) -> tuple[str, str]:
        return "flux1", f"flux-1-{'dev' if config['guidance_embeds'] else 'schnell'}/lora"
