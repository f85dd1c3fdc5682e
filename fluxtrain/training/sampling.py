"""Sample images from the current weights, with prompt embeddings computed before training.

The denoising loop is FluxPipeline's (FlowMatchEulerDiscreteScheduler with FLUX.1's
resolution-dependent shift for dev, none for schnell) written out, so it runs on the training
transformer whatever its storage dtype and needs no text encoder: the prompts' T5 and CLIP
outputs come from the feature cache. `render_samples` renders through the run's model family
(`Family.generate`); `generate` here is FLUX.1's. An edit-pair (Kontext) run renders with the
first training image's reference latent appended, as FluxKontextPipeline does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils.memory import clear_device_cache
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from fluxtrain.rundir import RunDir
from fluxtrain.training.buckets import Size
from fluxtrain.training.cache import FeatureCache
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.flow import image_ids, pack_latents, text_ids, unpack_latents

if TYPE_CHECKING:
    from fluxtrain.training.families.family import Family, Reference


def flux_scheduler(*, guidance_distilled: bool) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler config FLUX.1-dev (dynamic shift) or schnell (no shift) ships with."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if guidance_distilled else 1.0,
        use_dynamic_shifting=guidance_distilled,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


@torch.no_grad()
def generate(
    transformer: torch.nn.Module,
    vae,
    *,
    t5: torch.Tensor,
    pooled: torch.Tensor,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    reference: torch.Tensor | None = None,
) -> Image.Image:
    """Denoise one image from `seed` with the given prompt embedding (and Kontext reference latent
    (1, C, h, w)) and decode it."""
    guidance_distilled = transformer.config.guidance_embeds
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lat_h, lat_w = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    channels = transformer.config.in_channels // 4
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(1, channels, lat_h, lat_w, generator=generator)
    latents = pack_latents(noise).to(device=device, dtype=dtype)
    scheduler = flux_scheduler(guidance_distilled=guidance_distilled)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(latents.shape[1]) if guidance_distilled else None
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    img_ids = image_ids(lat_h, lat_w, device=device, dtype=dtype)
    reference_tokens = None
    if reference is not None:
        reference_tokens = pack_latents(reference).to(device=device, dtype=dtype)
        reference_ids = image_ids(*reference.shape[-2:], device=device, dtype=dtype)
        reference_ids[:, 0] = 1
        img_ids = torch.cat([img_ids, reference_ids])
    txt_ids = text_ids(t5.shape[-2], device=device, dtype=dtype)
    encoder_states = t5.reshape(1, *t5.shape[-2:]).to(device=device, dtype=dtype)
    pooled = pooled.reshape(1, -1).to(device=device, dtype=dtype)
    guidance = torch.full((1,), guidance_scale, device=device, dtype=dtype) if guidance_distilled else None
    for t in scheduler.timesteps:
        tokens = latents if reference_tokens is None else torch.cat([latents, reference_tokens], dim=1)
        prediction = transformer(
            hidden_states=tokens,
            encoder_hidden_states=encoder_states,
            pooled_projections=pooled,
            timestep=(t / 1000).expand(1).to(dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0][:, : latents.shape[1]]
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
    unpacked = unpack_latents(latents.float(), lat_h, lat_w)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    unpacked = unpacked / vae.config.scaling_factor + shift
    vae_device = next(vae.parameters()).device
    pixels = vae.decode(unpacked.to(device=vae_device, dtype=vae.dtype), return_dict=False)[0]
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def render_samples(
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    *,
    config: TrainConfig,
    cache: FeatureCache,
    resolution: Size,
    step: int,
    run: RunDir,
    accelerator: Accelerator,
    dtype: torch.dtype,
    family: Family,
    reference: Reference | None = None,
) -> Iterator[tuple[Path, str]]:
    """Render every sample prompt with the current weights, yielding (file, prompt) as each is saved.

    The autoencoder visits the device only for the renders; the transformer is left in training mode.
    """
    device = accelerator.device
    vae.to(device)
    width, height = resolution
    for index, prompt in enumerate(config.sample_prompts):
        with accelerator.autocast():
            image = family.generate(
                transformer,
                vae,
                text=cache.load_text_features(prompt),
                width=width,
                height=height,
                steps=config.sample_steps,
                guidance_scale=config.sample_guidance_scale,
                seed=config.seed + index,
                device=device,
                dtype=dtype,
                reference=reference,
            )
        path = run.sample(config.output_name, step=step, index=index)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        yield path, prompt
    vae.to("cpu")
    transformer.train()
    clear_device_cache(garbage_collection=True)
