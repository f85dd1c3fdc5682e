"""Tiny randomly initialised FLUX.2 [klein] model files in their real layouts, for tests.

The real classes (Flux2Transformer2DModel, AutoencoderKLFlux2, Qwen3ForCausalLM) at toy sizes, saved
as the single files people download: the transformer in BFL layout (through our converter), the
autoencoder in BFL layout, the text encoder in Hugging Face layout (as ComfyUI's `qwen_3_4b.safetensors`),
plus a Qwen2-style byte-level BPE tokenizer with Qwen3's chat template built here, so nothing is
downloaded. The shapes keep what the pipelines rely on: 32 latent channels patchified 2x2 to 128,
4-axis rotary embeddings, and a 28-layer text encoder so klein's hidden layers 9/18/27 exist. The
transformer is 128 wide (8 heads of 16), as wide as its 128 input and output channels, so an adapter
on it can reach every output direction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import save as save_safetensors
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import Tensor
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

from fluxtrain.fsutil import atomic_write_bytes
from fluxtrain.training.convert_flux2 import (
    diffusers_to_bfl_flux2,
    diffusers_to_bfl_flux2_vae,
    flux2_rope_axes,
)
from fluxtrain.training.families.flux2 import patchify

TINY_QWEN3_HIDDEN = 16
TINY_QWEN3_LAYERS = 28
KLEIN_TEXT_LAYERS = (9, 18, 27)
FLUX2_LATENT_CHANNELS = 32
TINY_FLUX2_HEAD_DIM = 16
TINY_FLUX2_HEADS = 8
TINY_FLUX2_VAE_CHANNELS = (16, 32, 32, 32)
QWEN3_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
"""Qwen3's chat template for plain text turns: what the FLUX.2 [klein] pipeline renders a prompt with
(`add_generation_prompt=True, enable_thinking=False`)."""
_CORPUS = (
    "a photo of a dog sitting on the grass",
    "a cat and a dog in the snow, cinematic light",
    "portrait of a woman, studio lighting, 85mm",
    "user assistant think",
)


def tiny_qwen3_tokenizer(vocab_size: int = 400) -> Qwen2Tokenizer:
    """A byte-level BPE trained here on a few sentences, in Qwen2's tokenizer class, with Qwen3's
    special tokens (pad = <|endoftext|>) and chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN3_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN3_SPECIAL[1:])})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_config(vocab_size: int) -> Qwen3Config:
    """A Qwen3 text encoder deep enough for klein's stacked layers, a few thousand parameters wide."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TINY_QWEN3_HIDDEN,
        intermediate_size=2 * TINY_QWEN3_HIDDEN,
        num_hidden_layers=TINY_QWEN3_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=0,
    )


def tiny_flux2_transformer_config() -> dict[str, Any]:
    """Flux2Transformer2DModel kwargs of a tiny klein-like model (no guidance embedding), wired to
    the tiny autoencoder (128 patchified channels) and text encoder (3 stacked 16-wide layers)."""
    return {
        "patch_size": 1,
        "in_channels": 4 * FLUX2_LATENT_CHANNELS,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": TINY_FLUX2_HEAD_DIM,
        "num_attention_heads": TINY_FLUX2_HEADS,
        "joint_attention_dim": len(KLEIN_TEXT_LAYERS) * TINY_QWEN3_HIDDEN,
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": flux2_rope_axes(TINY_FLUX2_HEAD_DIM),
        "guidance_embeds": False,
    }


def tiny_flux2_vae_config() -> dict[str, Any]:
    """AutoencoderKLFlux2 kwargs: 8x downsampling, 32 latent channels and quant convs like the real
    one, toy widths."""
    levels = len(TINY_FLUX2_VAE_CHANNELS)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(TINY_FLUX2_VAE_CHANNELS),
        "layers_per_block": 1,
        "latent_channels": FLUX2_LATENT_CHANNELS,
        "norm_num_groups": 16,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "patch_size": (2, 2),
    }


def _save(sd: dict[str, Tensor], path: Path, dtype: torch.dtype) -> Path:
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    atomic_write_bytes(path, save_safetensors(tensors, metadata={"format": "pt"}))
    return path


def _calibration_images(count: int = 4, size: int = 64) -> Tensor:
    """Smooth random images in [-1, 1]: coarse noise upsampled, so they have structure at every scale."""
    coarse = torch.rand(count, 3, 4, 4) * 2 - 1
    fine = 0.3 * torch.nn.functional.interpolate(torch.rand(count, 3, 16, 16) * 2 - 1, size=size)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (smooth + fine).clamp(-1, 1)


@torch.no_grad()
def _tiny_vae() -> AutoencoderKLFlux2:
    """The autoencoder with its BatchNorm statistics measured on its own latents of a few images, as
    the real one's are: normalised latents then have unit spread, so the flow target holds as much
    image as noise (with arbitrary statistics it was mostly noise and no run could learn the image).
    Rounded so that last-bit differences of the convolutions on another machine do not change the file."""
    vae = AutoencoderKLFlux2(**tiny_flux2_vae_config()).eval()
    latents = patchify(vae.encode(_calibration_images()).latent_dist.mode())
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)).round(decimals=4))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)).round(decimals=4))
    return vae


def write_tiny_flux2_files(out_dir: Path) -> dict[str, Path]:
    """Write flux-2-klein-4b.safetensors, flux2-vae.safetensors, qwen_3_4b.safetensors and
    tokenizers/qwen3 into out_dir; returns them keyed pretrained_model, ae, text_encoder, tokenizer_qwen3."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_qwen3_tokenizer()
    tokenizer_dir = out_dir / "tokenizers" / "qwen3"
    tokenizer.save_pretrained(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = Flux2Transformer2DModel(**tiny_flux2_transformer_config())
        vae = _tiny_vae()
        text_encoder = Qwen3ForCausalLM(tiny_qwen3_config(len(tokenizer)))
    vae_sd = {k: v for k, v in vae.state_dict().items() if not k.endswith("num_batches_tracked")}
    text_sd = {k: v for k, v in text_encoder.state_dict().items() if k != "lm_head.weight"}
    return {
        "pretrained_model": _save(
            diffusers_to_bfl_flux2(transformer.state_dict()),
            out_dir / "flux-2-klein-4b.safetensors",
            torch.bfloat16,
        ),
        "ae": _save(diffusers_to_bfl_flux2_vae(vae_sd), out_dir / "flux2-vae.safetensors", torch.float32),
        "text_encoder": _save(text_sd, out_dir / "qwen_3_4b.safetensors", torch.bfloat16),
        "tokenizer_qwen3": tokenizer_dir,
    }
