"""Tiny randomly initialised FLUX.2 [dev] model files in their real layouts, for tests.

The real classes at toy sizes: a guidance-embedded Flux2Transformer2DModel saved in BFL layout
(through our converter) as `flux2-dev.safetensors`, the tiny FLUX.2 autoencoder of `tiny_flux2`, and
the language model of a Mistral3ForConditionalGeneration saved as ComfyUI's
`mistral_3_small_flux2_bf16.safetensors` (`model.*` keys, no vision tower: FLUX.2 reads text only).
The tokenizer is a byte-level BPE built here with Mistral's control tokens and Mistral Small 3.1's
chat template (the tokenizer of the PixtralProcessor that `Flux2Pipeline` loads); nothing is
downloaded. The text encoder has 32 layers, so dev's hidden layers 10/20/30 exist and layer 30 is
not the final (normalised) one, as in the real 40-layer model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
)

from fluxtrain.training.convert_flux2 import diffusers_to_bfl_flux2
from fluxtrain.training.families.flux2_dev import (
    DEV_TEXT_LAYERS,
    MISTRAL_DEFAULTS,
    MISTRAL_HEAD_DIM,
    MISTRAL_TOKENIZER,
)
from fluxtrain.training.tiny_flux2 import _save, tiny_flux2_transformer_config, write_tiny_flux2_files

TINY_MISTRAL_HIDDEN = 16
TINY_MISTRAL_LAYERS = 32
MISTRAL_SPECIAL = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)
MISTRAL_CHAT_TEMPLATE = (
    "{%- set default_system_message = 'You are Mistral Small 3, a Large Language Model (LLM) created by "
    "Mistral AI.' %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- (message['content'] if message['content'] is string else message['content'][0]['text'])"
    " + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}{%- endfor %}"
)
"""Mistral Small 3.1's chat template (without its dated default system message): BOS, the system
turn in [SYSTEM_PROMPT] tags, user turns in [INST] tags, text and image blocks, no generation prompt."""
_CORPUS = (
    "a photo of a dog sitting on the grass",
    "a cat and a dog in the snow, cinematic light",
    "portrait of a woman, studio lighting, 85mm",
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object attribution and actions without speculation.",
)


def tiny_mistral_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on a few sentences with Mistral's control tokens, padding on
    the left with <pad>, with Mistral Small 3.1's chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(MISTRAL_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=131072,
        extra_special_tokens=list(MISTRAL_SPECIAL[3:]),
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def tiny_mistral3_config(vocab_size: int) -> Mistral3Config:
    """Mistral3ForConditionalGeneration's config at toy widths with Mistral Small 3.x's head width,
    rope theta and norm epsilon: a 32-layer language model and a one-layer vision tower (the
    pipeline's class holds one; FLUX.2 never runs it)."""
    text = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_MISTRAL_HIDDEN,
        intermediate_size=2 * TINY_MISTRAL_HIDDEN,
        num_hidden_layers=TINY_MISTRAL_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=MISTRAL_HEAD_DIM,
        sliding_window=None,
        **MISTRAL_DEFAULTS,
        pad_token_id=MISTRAL_SPECIAL.index("<pad>"),
        bos_token_id=MISTRAL_SPECIAL.index("<s>"),
        eos_token_id=MISTRAL_SPECIAL.index("</s>"),
    )
    vision = PixtralVisionConfig(
        hidden_size=TINY_MISTRAL_HIDDEN,
        intermediate_size=2 * TINY_MISTRAL_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=1,
        head_dim=TINY_MISTRAL_HIDDEN,
        patch_size=14,
        image_size=56,
    )
    return Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=MISTRAL_SPECIAL.index("[IMG]"),
        tie_word_embeddings=False,
    )


def tiny_flux2_dev_transformer_config() -> dict[str, Any]:
    """Flux2Transformer2DModel kwargs of a tiny dev-like model: the klein-sized tiny model with
    the guidance embedding dev has, taking three stacked 16-wide Mistral layers."""
    return {
        **tiny_flux2_transformer_config(),
        "joint_attention_dim": len(DEV_TEXT_LAYERS) * TINY_MISTRAL_HIDDEN,
        "guidance_embeds": True,
    }


def write_tiny_flux2_dev_files(out_dir: Path) -> dict[str, Path]:
    """Write flux2-dev.safetensors, mistral_3_small_flux2_bf16.safetensors and tokenizers/mistral3
    into out_dir (and the tiny FLUX.2 files, whose autoencoder dev shares, when flux2-vae.safetensors
    is absent); returns them keyed pretrained_model, ae, text_encoder, tokenizer_mistral3."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ae = out_dir / "flux2-vae.safetensors"
    if not ae.is_file():
        write_tiny_flux2_files(out_dir)
    tokenizer = tiny_mistral_tokenizer()
    tokenizer_dir = out_dir / "tokenizers" / MISTRAL_TOKENIZER
    tokenizer.save_pretrained(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = Flux2Transformer2DModel(**tiny_flux2_dev_transformer_config())
        text_encoder = Mistral3ForConditionalGeneration(tiny_mistral3_config(len(tokenizer)))
    prefix = "model.language_model."
    text_sd = {
        f"model.{k.removeprefix(prefix)}": v
        for k, v in text_encoder.state_dict().items()
        if k.startswith(prefix)
    }
    return {
        "pretrained_model": _save(
            diffusers_to_bfl_flux2(transformer.state_dict()),
            out_dir / "flux2-dev.safetensors",
            torch.bfloat16,
        ),
        "ae": ae,
        "text_encoder": _save(text_sd, out_dir / "mistral_3_small_flux2_bf16.safetensors", torch.bfloat16),
        "tokenizer_mistral3": tokenizer_dir,
    }
