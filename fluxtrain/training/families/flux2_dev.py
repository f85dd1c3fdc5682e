"""FLUX.2 [dev] as a `Family`: klein's transformer, autoencoder, latents, ids and LoRA targets, with
Mistral Small 3.x text features and a distilled guidance constant.

Text (as `Flux2Pipeline._get_mistral_3_small_prompt_embeds`): each prompt as a user turn after
BFL's system message, rendered by the tokenizer's chat template without a generation prompt,
padded to 512 tokens, hidden layers 10/20/30 stacked. Only the language model is loaded (the
pipeline's Mistral3ForConditionalGeneration runs nothing else on text), and only its first 30
layers without the final norm: `hidden_states[30]` is the raw output of layer 29 in the full
40-layer model, so the result is the same, a quarter cheaper, and ComfyUI's 30-layer pruned file
(`final_norm` off) loads too. Files: the text encoder (`text_encoder` field) as a Hugging Face
folder (Mistral3 or Mistral, sharded or not) or one file (ComfyUI's
`mistral_3_small_flux2_bf16.safetensors` / `_fp8`), bf16 or fp8; its tokenizer and chat template
(the FLUX.2-dev repository's `tokenizer/` folder) from `FS_PATH/tokenizers/mistral3`. Guidance: the
run's `guidance_scale` as a constant, through the transformer's guidance embedding. Edit pairs are
klein's (each reference packed after the noisy tokens at time 10 + 10 i): `Flux2Pipeline` appends
its `image`s the same way.
Shapes cannot say the attention head width, rope theta or norm epsilon: Mistral Small 3.x's are used
for a single file; a folder's config.json says them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, MistralConfig, MistralModel, PreTrainedTokenizerBase

from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.families import flux2
from fluxtrain.training.families.detect import block_count
from fluxtrain.training.families.klein import Klein, KleinFiles
from fluxtrain.training.families.mistral_files import (
    DEEPEST_TEXT_LAYER,
    check_mistral_text_encoder,
    language_model_index,
)
from fluxtrain.training.model_files import _assign_weights, _component_folder, _dequantize

DEV_TEXT_LAYERS = flux2.TEXT_LAYERS["flux2-dev"]
ENCODER_LAYERS = DEEPEST_TEXT_LAYER
"""Layers run: hidden state k is the input of layer k, so layer 30 and above never matter."""
MISTRAL_TOKENIZER = "mistral3"
MISTRAL_HEAD_DIM = 128
MISTRAL_DEFAULTS = {"rope_theta": 1_000_000_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object\nattribution and actions without speculation."
)
"""BFL's system message for FLUX.2 [dev] prompts (flux2 `system_messages.py`), as diffusers has it."""


def load_mistral_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """Mistral's tokenizer with its chat template, from `folder` only: the tokenizer of the
    PixtralProcessor folder `Flux2Pipeline` loads, which is all a text prompt runs through (so no
    image processor, nor torchvision, is needed)."""
    if not (folder / "tokenizer_config.json").is_file():
        raise NotFoundError(
            f"Mistral tokenizer folder {folder} is missing: save FLUX.2 [dev]'s tokenizer there (the "
            "FLUX.2-dev repository's tokenizer/ folder: tokenizer.json, tokenizer_config.json and its chat "
            "template), e.g. with `fluxtrain dev tiny-models` for tests"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tokenizer.chat_template:
        raise InvalidInputError(
            f"Mistral tokenizer folder {folder} has no chat template (chat_template.jinja or "
            "tokenizer_config.json)"
        )
    return tokenizer


def format_prompts(prompts: list[str]) -> list[list[dict[str, Any]]]:
    """Each prompt as the pipeline's conversation: BFL's system turn, then the prompt as a user
    turn, both as text blocks; `[IMG]` is removed from prompts as the pipeline removes it."""
    return [
        [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
        ]
        for prompt in prompts
    ]


@torch.no_grad()
def encode_dev_text(
    *,
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_tokens: int = flux2.MAX_TEXT_TOKENS,
) -> Tensor:
    """FLUX.2 [dev]'s text features of `prompts` from Mistral: (batch, max_tokens, 3 x width)."""
    inputs = tokenizer.apply_chat_template(
        format_prompts(prompts),
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=max_tokens,
    )
    return flux2.layer_features(text_encoder, inputs, DEV_TEXT_LAYERS)


def read_language_model(path: Path, shown: str) -> dict[str, Tensor]:
    """The language model's tensors of a Mistral file or shard folder, keys without their prefix,
    checked first (`check_mistral_text_encoder`); nothing else in the files is read."""
    check_mistral_text_encoder(path, shown)
    sd = {}
    for file, names in language_model_index(path, shown).items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            sd.update({name: handle.get_tensor(key) for key, name in names.items()})
    return sd


def mistral_config_from_shapes(sd: Mapping[str, Tensor]) -> MistralConfig:
    """MistralConfig of a Mistral language model state dict (keys without `model.`), off its shapes."""
    attention = "layers.0.self_attn"
    try:
        vocab, hidden = sd["embed_tokens.weight"].shape
        heads = sd[f"{attention}.q_proj.weight"].shape[0] // MISTRAL_HEAD_DIM
        kv_heads = sd[f"{attention}.k_proj.weight"].shape[0] // MISTRAL_HEAD_DIM
        intermediate = sd["layers.0.mlp.gate_proj.weight"].shape[0]
    except KeyError as exc:
        raise InvalidInputError(f"is not a Mistral text encoder: {exc.args[0]} is missing") from exc
    return MistralConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(intermediate),
        num_hidden_layers=block_count(sd, "layers"),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv_heads),
        head_dim=MISTRAL_HEAD_DIM,
        sliding_window=None,
        **MISTRAL_DEFAULTS,
    )


def _folder_config(path: Path) -> MistralConfig | None:
    """The language model's config of a model folder (Mistral3's text_config), None for a file."""
    folder = _component_folder(path, "text_encoder")
    if not path.is_dir() or not (folder / "config.json").is_file():
        return None
    return AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config()


def _encoder_weight(key: str) -> bool:
    """Whether the 30-layer encoder keeps the tensor: not the final norm, no layer from 30 on."""
    if key == "norm.weight":
        return False
    return not (key.startswith("layers.") and int(key.split(".")[1]) >= ENCODER_LAYERS)


def load_mistral(path: Path, *, dtype: torch.dtype, device: torch.device | str) -> MistralModel:
    """Mistral's first 30 layers, without the final norm, from a single file or a model folder."""
    sd = read_language_model(path, path.name)
    try:
        config = _folder_config(path) or mistral_config_from_shapes(sd)
    except InvalidInputError as exc:
        raise InvalidInputError(f"text_encoder: '{path.name}' {exc.message}") from exc
    kept = _dequantize({key: tensor for key, tensor in sd.items() if _encoder_weight(key)}, dtype)
    del sd
    config.num_hidden_layers = ENCODER_LAYERS
    with init_empty_weights():
        model = MistralModel(config)
    model.norm = nn.Identity()
    _assign_weights(model, kept, path.name)
    model.requires_grad_(False)
    return model.to(device).eval()


class DevTextEncoder:
    """Mistral with its tokenizer: `hidden` features as `Flux2Pipeline.encode_prompt` computes them."""

    def __init__(self, model: MistralModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`hidden` (B, 512, 3 x width) in bf16 on the CPU."""
        hidden = encode_dev_text(text_encoder=self.model, tokenizer=self.tokenizer, prompts=captions)
        return {"hidden": hidden.float().cpu().to(torch.bfloat16)}


class Flux2Dev(Klein):
    """FLUX.2 [dev]: klein's transformer inputs plus the guidance embedding, Mistral text features."""

    def resolve_files(self, config: TrainConfig, models_root: Path) -> KleinFiles:
        """klein's files, the text encoder checked to be Mistral, the tokenizer from tokenizers/mistral3."""
        files = super().resolve_files(config, models_root)
        check_mistral_text_encoder(files.text_encoder, config.text_encoder)
        return replace(files, tokenizer=models_root / "tokenizers" / MISTRAL_TOKENIZER)

    def load_text_encoder(
        self, files: KleinFiles, *, dtype: torch.dtype, device: torch.device | str, max_length: int
    ) -> DevTextEncoder:
        tokenizer = load_mistral_tokenizer(files.tokenizer)
        return DevTextEncoder(load_mistral(files.text_encoder, dtype=dtype, device=device), tokenizer)

    def guidance_input(self, guidance_scale: float, *, device: torch.device | str) -> torch.Tensor | None:
        """`Flux2Pipeline`'s distilled guidance: the scale as a constant."""
        return torch.full((1,), guidance_scale, device=device, dtype=torch.float32)

    def architecture(self, config: Mapping[str, Any]) -> tuple[str, str]:
        return "flux2", "flux-2-dev/lora"
