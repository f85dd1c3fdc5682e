"""A tiny, randomly initialised Florence-2 of the real classes, written without any download.

Tests, CI and the demo caption with it through exactly the code path the real model takes: the
same config and model classes, a real `Florence2Processor` (CLIP image processor plus a BART-style
byte-level BPE tokenizer trained here on a few sentences), saved with `save_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BartTokenizer,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    GenerationConfig,
)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS_ID, PAD_ID, EOS_ID = 0, 1, 2
TINY_IMAGE_SIZE = 32
# DaViT reduces 32 px by its strides 4 and 2 to a 4x4 grid, plus one pooled token.
TINY_IMAGE_TOKENS = 4 * 4 + 1
_CORPUS = (
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "The image shows a cat sitting on a red sofa next to a window.",
    "A portrait of a person smiling, with mountains and a lake in the background.",
)
_PARSE_TASKS = (
    "ocr",
    "phrase_grounding",
    "pure_text",
    "description_with_bboxes",
    "description_with_polygons",
    "polygons",
    "bboxes",
    "description_with_bboxes_or_polygons",
)


def tiny_tokenizer(vocab_size: int = 400) -> BartTokenizer:
    """A byte-level BPE in BART's layout (<s>=0, <pad>=1, </s>=2), plus Florence-2's image token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in trained["merges"]]
    return BartTokenizer(
        vocab=trained["vocab"], merges=merges, extra_special_tokens={"image_token": IMAGE_TOKEN}
    )


def florence2_processor(
    tokenizer: BartTokenizer, *, image_size: int, image_tokens: int
) -> Florence2Processor:
    """Florence-2's processor: square resize, ImageNet normalisation, `image_tokens` placeholders."""
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=image_tokens,
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config={task: {} for task in _PARSE_TASKS},
    )


def florence2_generation_config() -> GenerationConfig:
    """Florence-2's own generation defaults: BART ids, a forced <s> first, no repeated trigrams."""
    return GenerationConfig(
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=EOS_ID,
        forced_bos_token_id=BOS_ID,
        forced_eos_token_id=EOS_ID,
        no_repeat_ngram_size=3,
        num_beams=3,
    )


def silence_special_tokens(model: Florence2ForConditionalGeneration, token_ids: list[int]) -> None:
    """Zero the (tied) output rows of these ids, so random weights spell out words instead of stopping."""
    with torch.no_grad():
        model.get_output_embeddings().weight[token_ids] = 0


def florence2_config(
    *, vocab_size: int, image_token_id: int, text: dict[str, Any], vision: dict[str, Any]
) -> Florence2Config:
    """A Florence-2 config wired to the local tokenizer's special ids; callers choose the sizes
    (the tiny test model here, Florence-2-large's in bench/caption.py)."""
    return Florence2Config(
        text_config={
            "model_type": "bart",
            "vocab_size": vocab_size,
            **text,
            "bos_token_id": BOS_ID,
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "decoder_start_token_id": EOS_ID,
            "forced_eos_token_id": EOS_ID,
        },
        vision_config={**vision, "drop_path_rate": 0.0},
        image_token_id=image_token_id,
    )


def write_tiny_florence2(out_dir: Path) -> Path:
    """Write the tiny model and processor into `out_dir/florence2`; the same files on every call."""
    target = out_dir / "florence2"
    tokenizer = tiny_tokenizer()
    processor = florence2_processor(tokenizer, image_size=TINY_IMAGE_SIZE, image_tokens=TINY_IMAGE_TOKENS)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = florence2_config(
        vocab_size=len(tokenizer),
        image_token_id=image_token_id,
        text={
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 1100,
        },
        vision={
            "depths": [1, 1],
            "patch_size": [7, 3],
            "patch_stride": [4, 2],
            "patch_padding": [3, 1],
            "patch_prenorm": [False, True],
            "embed_dim": [16, 32],
            "num_heads": [1, 2],
            "num_groups": [1, 2],
            "window_size": 4,
            "projection_dim": 32,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Florence2ForConditionalGeneration(config).eval()
    silence_special_tokens(model, [*range(len(SPECIAL_TOKENS)), image_token_id])
    model.generation_config = florence2_generation_config()
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
