"""FLUX.2 [klein] 4B / 9B as a `Family`: its files, features, inputs and LoRA targets.

Files: the transformer as a BFL single file (`flux-2-klein-4b.safetensors`, ComfyUI prefixes
allowed, converted by `convert_flux2.py`), a single file in diffusers layout or a diffusers folder;
the autoencoder as a BFL file (converted likewise) or a folder (`ae` field); the Qwen3 text encoder
(`text_encoder` field) as one Hugging Face-layout file (ComfyUI's `qwen_3_4b.safetensors`, bf16 or
fp8) or a model folder; its tokenizer and chat template from `FS_PATH/tokenizers/qwen3`. Features
are `flux2.py`'s: text `hidden` (512 tokens, layers 9/18/27 stacked, no pooled vector), normalised
2x2-patchified latents, 4-axis ids, no guidance. Edit pairs: each reference's latent (made and
cached as the targets') is packed after the noisy tokens at time 10 + 10 i, and the prediction is
cut back to the targets' tokens. The LoRA targets every attention q/k/v/out, the single blocks'
fused `to_qkv_mlp_proj` and `to_out`, and the MLPs; never the modulation, embedders or final layer.
Shapes cannot say Qwen3's rope theta, norm epsilon or context length: Qwen3-4B/8B's are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3Model

from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.model_paths import resolve_model_path
from fluxtrain.training.cache import FeatureCache, file_identity
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.convert import ModuleRule
from fluxtrain.training.convert_flux2 import (
    DIFFUSERS_FLUX2_MARKER,
    bfl_to_diffusers_flux2,
    bfl_to_diffusers_flux2_vae,
    flux2_module_rules,
    infer_flux2_config,
    infer_flux2_vae_config,
)
from fluxtrain.training.families import flux2
from fluxtrain.training.families.detect import TRANSFORMER_PREFIXES, ModelFamily, block_count, strip_prefix
from fluxtrain.training.families.family import Reference, TextFeatures
from fluxtrain.training.flow import TimestepSampling, flux2_mu
from fluxtrain.training.model_checks import check_model
from fluxtrain.training.model_files import _assign_weights, _component_folder, _dequantize, _read_single_file

QWEN3_PREFIXES = ("model.", "text_encoders.qwen3_4b.transformer.model.")
QWEN3_DEFAULTS = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960}
DOUBLE_BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
)
SINGLE_BLOCK_TARGETS = ("attn.to_qkv_mlp_proj", "attn.to_out")


def _alternatives(names: tuple[str, ...]) -> str:
    return "|".join(name.replace(".", r"\.") for name in names)


TARGET_PATTERN = (
    rf"(transformer_blocks\.\d+\.({_alternatives(DOUBLE_BLOCK_TARGETS)}))"
    rf"|(single_transformer_blocks\.\d+\.({_alternatives(SINGLE_BLOCK_TARGETS)}))"
)


def reference_tokens(
    reference: Reference | None, *, device: torch.device | str
) -> tuple[Tensor, Tensor] | None:
    """An edit pair's reference latents as (tokens (B, N, 128), ids (B, N, 4)) to append after the
    noisy tokens, as `Flux2KleinPipeline.prepare_image_latents` builds them: each reference packed
    row by row on its own grid, reference i at time 10 + 10 i. None without edit pairs."""
    if reference is None:
        return None
    references = [reference] if isinstance(reference, Tensor) else list(reference)
    tokens = torch.cat([flux2.pack(latent) for latent in references], dim=1)
    return tokens.to(device), flux2.reference_ids(references).to(device)


@dataclass(frozen=True)
class KleinFiles:
    """A klein run's transformer, autoencoder and text encoder, and its tokenizer folder."""

    transformer: Path
    ae: Path
    text_encoder: Path
    tokenizer: Path


def load_qwen3_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """Qwen3's tokenizer with its chat template, from `folder` only."""
    if not (folder / "tokenizer_config.json").is_file():
        raise NotFoundError(
            f"Qwen3 tokenizer folder {folder} is missing: save Qwen3's tokenizer there (tokenizer.json, "
            "tokenizer_config.json with its chat template), e.g. with `fluxtrain dev tiny-models` for tests"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tokenizer.chat_template:
        raise InvalidInputError(
            f"Qwen3 tokenizer folder {folder} has no chat template (tokenizer_config.json)"
        )
    return tokenizer


def qwen3_config_from_shapes(sd: Mapping[str, torch.Tensor]) -> Qwen3Config:
    """Qwen3Config of a Qwen3 model state dict (keys without `model.`), read off its shapes."""
    attention = "layers.0.self_attn"
    try:
        vocab, hidden = sd["embed_tokens.weight"].shape
        head_dim = sd[f"{attention}.q_norm.weight"].shape[0]
        heads = sd[f"{attention}.q_proj.weight"].shape[0] // head_dim
        kv_heads = sd[f"{attention}.k_proj.weight"].shape[0] // head_dim
        intermediate = sd["layers.0.mlp.gate_proj.weight"].shape[0]
    except KeyError as exc:
        raise InvalidInputError(f"not a Qwen3 text encoder: {exc.args[0]} is missing") from exc
    return Qwen3Config(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(intermediate),
        num_hidden_layers=block_count(sd, "layers"),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        **QWEN3_DEFAULTS,
    )


def load_qwen3(path: Path, *, dtype: torch.dtype, device: torch.device | str) -> Qwen3Model:
    """The Qwen3 text encoder (without its LM head) from a single file or a model folder."""
    if path.is_dir():
        model = Qwen3Model.from_pretrained(
            _component_folder(path, "text_encoder"), torch_dtype=dtype, local_files_only=True
        )
    else:
        sd = strip_prefix(_read_single_file(path), QWEN3_PREFIXES)
        sd = _dequantize({k: v for k, v in sd.items() if not k.startswith("lm_head.")}, dtype)
        with init_empty_weights():
            model = Qwen3Model(qwen3_config_from_shapes(sd))
        _assign_weights(model, sd, path.name)
    model.requires_grad_(False)
    return model.to(device).eval()


def load_flux2_transformer(path: Path, *, dtype: torch.dtype) -> Flux2Transformer2DModel:
    """The FLUX.2 transformer from a single file (BFL or diffusers layout) or a diffusers folder,
    frozen, on the CPU."""
    if path.is_dir():
        model = Flux2Transformer2DModel.from_pretrained(
            _component_folder(path, "transformer"), torch_dtype=dtype, local_files_only=True
        )
    else:
        raw = strip_prefix(_read_single_file(path), TRANSFORMER_PREFIXES)
        config = infer_flux2_config(raw)
        sd = _dequantize(raw if DIFFUSERS_FLUX2_MARKER in raw else bfl_to_diffusers_flux2(raw), dtype)
        del raw
        with init_empty_weights():
            model = Flux2Transformer2DModel(**config)
        _assign_weights(model, sd, path.name)
    model.requires_grad_(False)
    return model.eval()


def load_flux2_autoencoder(
    path: Path, *, dtype: torch.dtype, device: torch.device | str
) -> AutoencoderKLFlux2:
    """The FLUX.2 autoencoder (with its latent BatchNorm statistics) from a BFL file or a folder."""
    if path.is_dir():
        model = AutoencoderKLFlux2.from_pretrained(
            _component_folder(path, "vae"), torch_dtype=dtype, local_files_only=True
        )
    else:
        bfl = _read_single_file(path)
        config = infer_flux2_vae_config(bfl)
        sd = bfl_to_diffusers_flux2_vae(bfl)
        del bfl
        tracked = sd.pop("bn.num_batches_tracked", torch.tensor(0))
        sd = {**_dequantize(sd, dtype), "bn.num_batches_tracked": tracked}
        with init_empty_weights():
            model = AutoencoderKLFlux2(**config)
        _assign_weights(model, sd, path.name)
    model.requires_grad_(False)
    return model.to(device).eval()


class KleinTextEncoder:
    """Qwen3 with its tokenizer: `hidden` features as `Flux2KleinPipeline.encode_prompt` computes them."""

    def __init__(self, model: Qwen3Model, tokenizer: PreTrainedTokenizerBase, family: ModelFamily) -> None:
        self.model, self.tokenizer, self.family = model, tokenizer, family

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`hidden` (B, 512, 3 x width) in bf16 on the CPU."""
        hidden = flux2.encode_klein_text(
            text_encoder=self.model, tokenizer=self.tokenizer, prompts=captions, family=self.family
        )
        return {"hidden": hidden.float().cpu().to(torch.bfloat16)}


class Klein:
    """FLUX.2 [klein] 4B or 9B (base or distilled: the same files and inputs)."""

    lora_targets: str = TARGET_PATTERN
    timestep_sampling: TimestepSampling = "flux2_shift"

    def __init__(self, name: ModelFamily) -> None:
        self.name = name

    def resolve_files(self, config: TrainConfig, models_root: Path) -> KleinFiles:
        """The transformer, autoencoder and text encoder as `/train` resolves them, each checked."""
        paths = {}
        for field in ("pretrained_model", "ae", "text_encoder"):
            value = getattr(config, field)
            paths[field] = resolve_model_path(models_root, field, value)
            check_model(field, paths[field], value)
        return KleinFiles(
            transformer=paths["pretrained_model"],
            ae=paths["ae"],
            text_encoder=paths["text_encoder"],
            tokenizer=models_root / "tokenizers" / "qwen3",
        )

    def open_cache(self, root: Path, files: KleinFiles, config: TrainConfig) -> FeatureCache:
        """Text entries keyed by the family, the text encoder and the tokenizer (its chat template)."""
        text_id = f"{self.name}:{file_identity(files.text_encoder)}:{file_identity(files.tokenizer)}"
        return FeatureCache(
            root, vae_id=file_identity(files.ae), text_id=text_id, max_length=flux2.MAX_TEXT_TOKENS
        )

    def load_autoencoder(self, files: KleinFiles, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        return load_flux2_autoencoder(files.ae, dtype=dtype, device=device)

    def encode_latents(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        return flux2.encode_latents(vae, pixels).float().cpu()

    def load_text_encoder(
        self, files: KleinFiles, *, dtype: torch.dtype, device: torch.device | str, max_length: int
    ) -> KleinTextEncoder:
        tokenizer = load_qwen3_tokenizer(files.tokenizer)
        return KleinTextEncoder(
            load_qwen3(files.text_encoder, dtype=dtype, device=device), tokenizer, self.name
        )

    def load_transformer(self, path: Path, *, dtype: torch.dtype) -> torch.nn.Module:
        return load_flux2_transformer(path, dtype=dtype)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return flux2.pack(latents)

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
        """The velocity of noisy latents (B, 128, h, w) as image tokens; klein takes no guidance. An
        edit pair's reference tokens follow the noisy ones, and the prediction is cut back to the
        noisy tokens, as the pipeline cuts it."""
        device = noisy.device
        hidden = text["hidden"].to(device, dtype)
        guidance_tensor = None
        if guidance is not None:
            guidance_tensor = torch.full((noisy.shape[0],), guidance, device=device, dtype=dtype)
        tokens, ids = flux2.pack(noisy), flux2.latent_ids(noisy)
        count = tokens.shape[1]
        appended = reference_tokens(reference, device=device)
        if appended is not None:
            tokens, ids = torch.cat([tokens, appended[0]], dim=1), torch.cat([ids, appended[1]], dim=1)
        return model(
            hidden_states=tokens.to(dtype),
            encoder_hidden_states=hidden,
            timestep=t.to(dtype),
            img_ids=ids,
            txt_ids=flux2.text_ids(hidden),
            guidance=guidance_tensor,
            return_dict=False,
        )[0][:, :count]

    @torch.no_grad()
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
    ) -> Image.Image:
        """`Flux2KleinPipeline`'s denoising loop (Euler, exponential shift mu from the token count and
        steps) without classifier-free guidance, then its decode, with an edit pair's reference
        tokens appended as the pipeline appends its `image`s. `guidance_scale` goes to the
        transformer only where the family has distilled guidance (`guidance_input`)."""
        factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2
        shape = (1, transformer.config.in_channels, height // factor, width // factor)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
        latents = flux2.pack(noise).to(device=device, dtype=dtype)
        img_ids = flux2.latent_ids(noise).to(device)
        hidden = text["hidden"].reshape(1, *text["hidden"].shape[-2:]).to(device=device, dtype=dtype)
        txt_ids = flux2.text_ids(hidden)
        count = latents.shape[1]
        guidance = self.guidance_input(guidance_scale, device=device)
        appended = reference_tokens(reference, device=device)
        if appended is not None:
            img_ids = torch.cat([img_ids, appended[1]], dim=1)
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
        )
        mu = flux2_mu(latents.shape[1], steps)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
        for t in scheduler.timesteps:
            tokens = latents if appended is None else torch.cat([latents, appended[0].to(dtype)], dim=1)
            prediction = transformer(
                hidden_states=tokens,
                encoder_hidden_states=hidden,
                timestep=(t / 1000).expand(1).to(dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0][:, :count]
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        grid = latents.float().permute(0, 2, 1).reshape(shape)
        vae_device = next(vae.parameters()).device
        decoded = flux2.denormalize_latents(vae, grid.to(device=vae_device, dtype=vae.dtype))
        pixels = vae.decode(decoded, return_dict=False)[0]
        array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)

    def guidance_input(self, guidance_scale: float, *, device: torch.device | str) -> Tensor | None:
        """What the transformer's `guidance` input gets while sampling: nothing, klein has no
        distilled guidance."""
        return None

    def module_rules(self, config: Mapping[str, Any]) -> list[ModuleRule]:
        return flux2_module_rules(
            num_double=int(config["num_layers"]),
            num_single=int(config["num_single_layers"]),
            guidance=bool(config["guidance_embeds"]),
        )

    def architecture(self, config: Mapping[str, Any]) -> tuple[str, str]:
        size = self.name.removeprefix("flux2-klein-")
        return "flux2", f"flux-2-klein-{size}/lora"
