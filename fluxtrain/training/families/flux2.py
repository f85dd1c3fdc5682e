"""FLUX.2's text features, latents and position ids, computed as the diffusers pipelines compute them.

Text: the prompt rendered with the text encoder's chat template (klein: Qwen3, generation prompt,
thinking off), padded to 512 tokens, three hidden layers stacked on the feature axis (klein
9/18/27, dev 10/20/30) and no pooled vector. Latents: the autoencoder's mean, patchified 2x2 (32 ->
128 channels), normalised by its BatchNorm statistics, packed to tokens. Position ids have four axes
(time, y, x, sequence): text tokens count along the last, image tokens along y and x; reference
image i sits at time 10 + 10 i.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.families.detect import ModelFamily

MAX_TEXT_TOKENS = 512
TEXT_LAYERS: dict[str, tuple[int, ...]] = {
    "flux2-dev": (10, 20, 30),
    "flux2-klein-4b": (9, 18, 27),
    "flux2-klein-9b": (9, 18, 27),
}
KLEIN_FAMILIES = ("flux2-klein-4b", "flux2-klein-9b")
REFERENCE_TIME_SCALE = 10


def render_klein_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn of Qwen3's chat template, with the assistant's turn opened and
    thinking switched off, as `Flux2KleinPipeline` renders it."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        for prompt in prompts
    ]


def stack_hidden_layers(hidden_states: tuple[Tensor, ...], layers: tuple[int, ...]) -> Tensor:
    """(batch, tokens, len(layers) x width): the chosen hidden states side by side for every token."""
    stacked = torch.stack([hidden_states[k] for k in layers], dim=1)
    batch, count, tokens, width = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(batch, tokens, count * width)


@torch.no_grad()
def encode_klein_text(
    *,
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    family: ModelFamily = "flux2-klein-4b",
    max_tokens: int = MAX_TEXT_TOKENS,
) -> Tensor:
    """FLUX.2 [klein]'s text features of `prompts` from a Qwen3 causal LM: (batch, max_tokens, 3 x width)."""
    if family not in KLEIN_FAMILIES:
        raise InvalidInputError(f"{family} does not take Qwen3 text features (FLUX.2 [dev] takes Mistral's)")
    inputs = tokenizer(
        render_klein_prompts(tokenizer, prompts),
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=max_tokens,
    )
    return layer_features(text_encoder, inputs, TEXT_LAYERS[family])


def layer_features(text_encoder: nn.Module, inputs: Mapping[str, Tensor], layers: tuple[int, ...]) -> Tensor:
    """The hidden states `layers` of `text_encoder` on tokenized `inputs`, stacked as FLUX.2 takes them."""
    device = next(text_encoder.parameters()).device
    output = text_encoder(
        input_ids=inputs["input_ids"].to(device),
        attention_mask=inputs["attention_mask"].to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    return stack_hidden_layers(output.hidden_states, layers)


def text_ids(features: Tensor) -> Tensor:
    """(batch, tokens, 4) ids of text tokens: time, y and x 0, the token's index on the last axis."""
    batch, tokens, _ = features.shape
    ids = torch.zeros(tokens, 4, dtype=torch.long, device=features.device)
    ids[:, 3] = torch.arange(tokens, device=features.device)
    return ids.expand(batch, -1, -1)


def patchify(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch's values become channels (c, dy, dx order)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(batch, channels * 4, height // 2, width // 2)


def unpatchify(latents: Tensor) -> Tensor:
    """The inverse of `patchify`."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(batch, channels // 4, height * 2, width * 2)


def _bn_stats(vae: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        like.device, like.dtype
    )
    return mean, std


@torch.no_grad()
def encode_latents(vae: nn.Module, pixels: Tensor) -> Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> normalised, patchified latents (B, 128, H/16, W/16)."""
    latents = patchify(vae.encode(pixels).latent_dist.mode())
    mean, std = _bn_stats(vae, latents)
    return (latents - mean) / std


def denormalize_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Patchified latents back to what the autoencoder's decoder takes (B, 32, H/8, W/8)."""
    mean, std = _bn_stats(vae, latents)
    return unpatchify(latents * std + mean)


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h x w, C) tokens, row by row."""
    batch, channels, height, width = latents.shape
    return latents.reshape(batch, channels, height * width).permute(0, 2, 1)


def latent_ids(latents: Tensor, *, time: int = 0) -> Tensor:
    """(B, h x w, 4) ids of a latent grid's tokens: (time, y, x, 0), row by row."""
    batch, _, height, width = latents.shape
    grid = torch.cartesian_prod(
        torch.tensor([time]), torch.arange(height), torch.arange(width), torch.arange(1)
    ).to(latents.device)
    return grid.unsqueeze(0).expand(batch, -1, -1)


def reference_ids(references: list[Tensor]) -> Tensor:
    """(B, total tokens, 4) ids of reference latents: reference i at time 10 + 10 i, on its own grid."""
    return torch.cat(
        [latent_ids(ref, time=REFERENCE_TIME_SCALE * (i + 1)) for i, ref in enumerate(references)], dim=1
    )
