"""Test helpers: a two-image dataset with its kohya TOML, and run directories around it.

Test modules import it as `from tests.training import helpers_runs` (pytest's importlib mode names
test modules `tests.training.<name>` and makes their folders importable as namespace packages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TRIGGER = "zqx"


def make_dataset(root: Path, *, size: int = 64, captions: bool = True, **toml_options: Any) -> Path:
    """Two distinct images (one captioned, one not when `captions` is False) and their TOML."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:size, 0:size]
    stripes = np.stack([(xs // 8 % 2) * 255, np.full_like(xs, 40), (ys * 255 // size)], axis=-1)
    blob = np.stack(
        [
            255 - ys * 255 // size,
            (((xs - size / 2) ** 2 + (ys - size / 2) ** 2) < (size / 3) ** 2) * 255,
            np.full_like(xs, 200),
        ],
        axis=-1,
    )
    Image.fromarray(stripes.astype(np.uint8)).save(image_dir / "a.jpg", quality=95)
    Image.fromarray(blob.astype(np.uint8)).save(image_dir / "b.jpg", quality=95)
    (image_dir / "a.txt").write_text(f"{TRIGGER}, red and blue stripes", encoding="utf-8")
    if captions:
        (image_dir / "b.txt").write_text(f"{TRIGGER}, a green disc", encoding="utf-8")
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in toml_options.items())
    toml = root / "dataset.toml"
    toml.write_text(
        '[general]\nshuffle_caption = false\ncaption_extension = ".txt"\nkeep_tokens = 1\n\n'
        f"[[datasets]]\nresolution = {size}\nbatch_size = 1\n{extra}\n"
        f'  [[datasets.subsets]]\n  image_dir = "{image_dir}"\n  class_tokens = "{TRIGGER}"\n'
        "  num_repeats = 1\n",
        encoding="utf-8",
    )
    return toml


def make_run(run_dir: Path, *, models: Path, toml: Path, cache: Path, **fields: Any) -> Path:
    """A run directory holding run.json as the runs layer writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "output_name": "tiny",
        "dataset_config": str(toml),
        "models_root": str(models),
        "cache_dir": str(cache),
        "mixed_precision": "no",
        "network_dim": 4,
        "network_alpha": 4.0,
        "learning_rate": 1e-3,
        "gradient_checkpointing": False,
        **fields,
    }
    (run_dir / "run.json").write_text(json.dumps(config), encoding="utf-8")
    return run_dir


def tiny_pipeline(models: Path, transformer: Any = None) -> Any:
    """A FluxPipeline of the tiny model files, loaded as the trainer loads them."""
    import torch
    from diffusers import FluxPipeline

    from fluxtrain.training import model_files
    from fluxtrain.training.sampling import flux_scheduler

    dtype = torch.float32
    transformer = transformer or model_files.load_transformer(models / "flux1-dev.sft", dtype=dtype)
    clip, clip_tok = model_files.load_clip(
        models / "clip_l.safetensors", tokenizer_dir=models / "tokenizers" / "clip_l", dtype=dtype
    )
    t5, t5_tok = model_files.load_t5(
        models / "t5xxl_fp16.safetensors", tokenizer_dir=models / "tokenizers" / "t5xxl", dtype=dtype
    )
    return FluxPipeline(
        scheduler=flux_scheduler(guidance_distilled=transformer.config.guidance_embeds),
        vae=model_files.load_autoencoder(models / "ae.sft", dtype=dtype),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def render(pipe: Any, prompt: str = f"{TRIGGER}, a green disc") -> Any:
    """A deterministic 2-step 64x64 image from the pipeline as a numpy array."""
    import torch

    return pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images[0]


def write_wide_models(source: Path, dest: Path, *, guidance: bool = False) -> Path:
    """The tiny model folder with a wider transformer (hidden 128 > 64 latent channels), schnell-like
    unless `guidance` (dev-like, as Kontext needs).

    The shared tiny transformer's hidden size (32) is below the packed latent width (64), so no
    adapter on it can express the velocity target; the overfit test needs a model that can.
    """
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from fluxtrain.training.convert import diffusers_to_bfl_transformer, rope_axes_for_head_dim
    from fluxtrain.training.tiny import tiny_transformer_config

    dest.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != "flux1-dev.sft":
            (dest / entry.name).symlink_to(entry)
    config = {
        **tiny_transformer_config(guidance=guidance),
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "axes_dims_rope": rope_axes_for_head_dim(32),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**config)
    tensors = {k: v.contiguous() for k, v in diffusers_to_bfl_transformer(transformer.state_dict()).items()}
    save_file(tensors, dest / "flux1-dev.sft")
    return dest


def step_events(run_dir: Path) -> list[dict[str, Any]]:
    from fluxtrain.rundir import read_events

    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"]


def read_events_of(run_dir: Path) -> list[dict[str, Any]]:
    from fluxtrain.rundir import read_events

    return read_events(run_dir / "events.jsonl")
