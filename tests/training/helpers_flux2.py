"""A pretrained tiny FLUX.2 base ([klein] or [dev]) for the LoRA overfit tests.

A LoRA adapts a trained model; it cannot make a random one learn. In the randomly initialised tiny
klein transformer everything a LoRA leaves frozen (rightly: the issue says never the modulation) is
random too: the time embedding feeds modulation whose gates are ~0.035, so each block adds ~3% of
the residual, and the output layer sits behind a LayerNorm whose frozen modulation fixes each
token's output norm. Measured on the two-image overfit (fixed evaluation, end / start): a LoRA of
rank 8 to 32 at learning rates 3e-3 to 3e-2 stays at 0.89 to 0.92 after 60 to 300 steps, and so
does a full fine-tune of every block weight (a superset of any LoRA: 0.86 to 0.88 in 200 steps,
with the gates scaled up 20x too); unfreezing the modulation, the output layer or the embedders as
well is what moves it (0.60, 0.67, 0.71). So the tests first pretrain the tiny transformer in full,
briefly, on a few generated images with their own captions, as a base model is, and train the LoRA
on that: 2.83 -> 0.73 (0.26) in 160 steps. The tiny [dev] transformer (klein's with a guidance
embedding) is the same story: a LoRA on the random one plateaus near 0.8 of its start; on a base
pretrained 400 steps it goes 2.68 -> 0.87 (0.32) in 160 steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from transformers import Mistral3ForConditionalGeneration

from fluxtrain.training import flow
from fluxtrain.training.convert_flux2 import diffusers_to_bfl_flux2
from fluxtrain.training.families.detect import ModelFamily
from fluxtrain.training.families.family import family_for
from fluxtrain.training.families.flux2_dev import load_mistral_tokenizer
from fluxtrain.training.families.klein import (
    Klein,
    KleinFiles,
    load_flux2_autoencoder,
    load_flux2_transformer,
    load_qwen3,
    load_qwen3_tokenizer,
)
from fluxtrain.training.tiny_flux2_dev import tiny_mistral3_config
from tests.training import helpers_runs

FILES = {
    "flux2-klein-4b": ("flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "qwen3"),
    "flux2-dev": ("flux2-dev.safetensors", "mistral_3_small_flux2_bf16.safetensors", "mistral3"),
}
"""Per family: the tiny transformer, text encoder and tokenizer folder (`tiny_flux2*.py`)."""
AUTOENCODER = "flux2-vae.safetensors"


def run_files(family_name: ModelFamily) -> dict[str, str]:
    """The `/train` model fields naming the tiny files of `family_name`."""
    transformer, text_encoder, _ = FILES[family_name]
    return {"pretrained_model": transformer, "ae": AUTOENCODER, "text_encoder": text_encoder}


GUIDANCE = 1.0
"""The trainer's default `guidance_scale`, given to a transformer with a guidance embedding ([dev])."""
PRETRAIN_STEPS = {"flux2-klein-4b": 250, "flux2-dev": 400}
"""[dev] needs more: after 250 steps its LoRA plateaus at 0.53 of the start, after 400 it reaches 0.32."""
PRETRAIN_LR = 2e-3
CAPTIONS = ("a red sky at night", "blue water, yellow sand", "a green field", "grey clouds over hills")


def _pretraining_images(size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1], one per caption: coarse noise upsampled."""
    coarse = torch.rand(len(CAPTIONS), 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def write_pretrained_flux2(
    source: Path,
    dest: Path,
    *,
    family_name: ModelFamily = "flux2-klein-4b",
    size: int = 64,
) -> Path:
    """`dest` as a models root like `source` (the tiny files of `family_name`) whose transformer has
    been trained in full for PRETRAIN_STEPS[family_name] steps of the trainer's flow loss and
    timestep sampling; the other files are linked, so features cached for `source` stay valid."""
    family: Klein = family_for(family_name)  # type: ignore[assignment]
    transformer, text_encoder, tokenizer = FILES[family_name]
    files = KleinFiles(
        transformer=source / transformer,
        ae=source / AUTOENCODER,
        text_encoder=source / text_encoder,
        tokenizer=source / "tokenizers" / tokenizer,
    )
    generator = torch.Generator().manual_seed(0)
    pixels = _pretraining_images(size, generator)
    vae = family.load_autoencoder(files, dtype=torch.float32, device="cpu")
    latents = family.encode_latents(vae, pixels)
    text = family.load_text_encoder(files, dtype=torch.float32, device="cpu", max_length=512).encode(
        list(CAPTIONS)
    )
    hidden = text["hidden"].float()
    model = family.load_transformer(files.transformer, dtype=torch.float32).train()
    guidance = GUIDANCE if model.config.guidance_embeds else None
    params = list(model.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=PRETRAIN_LR)
    tokens = family.pack(latents[:1]).shape[1]
    for step in range(PRETRAIN_STEPS[family_name]):
        x0 = latents[step % len(CAPTIONS)][None]
        noise = torch.randn(x0.shape, generator=generator)
        t = flow.sample_timesteps(
            1, method="flux2_shift", shift=1.0, sigmoid_scale=1.0, generator=generator, image_tokens=tokens
        )
        prediction = family.predict_velocity(
            model,
            flow.noisy_latents(x0, noise, t),
            t,
            {"hidden": hidden[step % len(CAPTIONS)][None]},
            guidance=guidance,
            dtype=torch.float32,
        )
        flow.flow_loss(prediction, family.pack(x0), family.pack(noise)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != transformer:
            (dest / entry.name).symlink_to(entry)
    tensors = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in diffusers_to_bfl_flux2(model.state_dict()).items()
    }
    save_file(tensors, dest / transformer)
    return dest


def _edits(image: Image.Image, references: int) -> list[Image.Image]:
    """A target's references: its colour-inverted mirror image, then (for two) its upside-down one."""
    rgb = image.convert("RGB")
    return [ImageOps.mirror(ImageOps.invert(rgb)), ImageOps.flip(rgb)][:references]


def make_edit_pairs(root: Path, *, references: int, size: int = 64) -> Path:
    """`helpers_runs.make_dataset`'s two targets with `references` controls each (`a.jpg`, or `a_0`,
    `a_1`), the TOML naming the control folder."""
    toml = helpers_runs.make_dataset(root, size=size)
    control = root / "images" / "control"
    control.mkdir()
    for stem in ("a", "b"):
        with Image.open(root / "images" / f"{stem}.jpg") as image:
            edits = _edits(image, references)
        names = [f"{stem}.jpg"] if references == 1 else [f"{stem}_{i}.jpg" for i in range(references)]
        for name, edit in zip(names, edits, strict=True):
            edit.save(control / name, quality=95)
    toml.write_text(
        toml.read_text(encoding="utf-8") + f'  control_directory = "{control}"\n', encoding="utf-8"
    )
    return toml


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The FLUX.2 pipelines' own scheduler."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )


def klein_pipeline(models: Path) -> Flux2KleinPipeline:
    """The tiny klein pipeline, loaded as the trainer loads its files."""
    transformer, text_encoder, tokenizer = FILES["flux2-klein-4b"]
    return Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=load_flux2_autoencoder(models / AUTOENCODER, dtype=torch.float32, device="cpu"),
        text_encoder=load_qwen3(models / text_encoder, dtype=torch.float32, device="cpu"),
        tokenizer=load_qwen3_tokenizer(models / "tokenizers" / tokenizer),
        transformer=load_flux2_transformer(models / transformer, dtype=torch.float32),
    )


def mistral3(models: Path) -> Mistral3ForConditionalGeneration:
    """The [dev] pipeline's text encoder class holding the tiny file's language model (its untouched
    vision tower is never run on text)."""
    tokenizer = load_mistral_tokenizer(models / "tokenizers" / FILES["flux2-dev"][2])
    model = Mistral3ForConditionalGeneration(tiny_mistral3_config(len(tokenizer)))
    language = {
        f"model.language_model.{k.removeprefix('model.')}": v.float()
        for k, v in load_file(models / FILES["flux2-dev"][1]).items()
    }
    result = model.load_state_dict(language, strict=False)
    assert not result.unexpected_keys
    assert all(
        k.startswith(("model.vision_tower.", "model.multi_modal_projector.", "lm_head."))
        for k in result.missing_keys
    )
    return model.eval()


def dev_pipeline(models: Path) -> Flux2Pipeline:
    """The diffusers FLUX.2 [dev] pipeline assembled from the tiny files through our converters."""
    transformer, _, tokenizer = FILES["flux2-dev"]
    return Flux2Pipeline(
        scheduler=_scheduler(),
        vae=load_flux2_autoencoder(models / AUTOENCODER, dtype=torch.float32, device="cpu"),
        text_encoder=mistral3(models),
        tokenizer=load_mistral_tokenizer(models / "tokenizers" / tokenizer),
        transformer=load_flux2_transformer(models / transformer, dtype=torch.float32),
    )
