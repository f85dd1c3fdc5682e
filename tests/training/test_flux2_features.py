"""FLUX.2 [klein] features and latents equal the diffusers pipeline's own, on the tiny files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen3ForCausalLM

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.convert_flux2 import (
    bfl_to_diffusers_flux2,
    bfl_to_diffusers_flux2_vae,
    infer_flux2_config,
    infer_flux2_vae_config,
)
from fluxtrain.training.families import flux2
from fluxtrain.training.tiny_flux2 import TINY_QWEN3_HIDDEN, tiny_qwen3_config


@pytest.fixture(scope="module")
def pipeline(tiny_flux2_models: Path) -> Flux2KleinPipeline:
    """The diffusers klein pipeline assembled from the tiny files through our converters."""
    tokenizer = AutoTokenizer.from_pretrained(
        tiny_flux2_models / "tokenizers" / "qwen3", local_files_only=True
    )
    text_encoder = Qwen3ForCausalLM(tiny_qwen3_config(len(tokenizer)))
    text_encoder.load_state_dict(load_file(tiny_flux2_models / "qwen_3_4b.safetensors"), strict=False)
    text_encoder.tie_weights()
    bfl = load_file(tiny_flux2_models / "flux-2-klein-4b.safetensors")
    transformer = Flux2Transformer2DModel(**infer_flux2_config(bfl))
    transformer.load_state_dict(bfl_to_diffusers_flux2(bfl))
    bfl_vae = load_file(tiny_flux2_models / "flux2-vae.safetensors")
    vae = AutoencoderKLFlux2(**infer_flux2_vae_config(bfl_vae))
    vae.load_state_dict(bfl_to_diffusers_flux2_vae(bfl_vae))
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )


def test_text_features_and_ids_equal_the_pipelines(pipeline: Flux2KleinPipeline) -> None:
    prompts = ["a photo of a dog", "a cat and a dog in the snow"]
    with torch.no_grad():
        expected, expected_ids = pipeline.encode_prompt(prompts, device=torch.device("cpu"))
    ours = flux2.encode_klein_text(
        text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, prompts=prompts
    )
    assert ours.shape == (2, flux2.MAX_TEXT_TOKENS, 3 * TINY_QWEN3_HIDDEN)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert torch.equal(flux2.text_ids(ours), expected_ids)
    assert not torch.equal(ours[0], ours[1])
    with pytest.raises(InvalidInputError, match="flux2-dev does not take Qwen3 text features"):
        flux2.encode_klein_text(
            text_encoder=pipeline.text_encoder,
            tokenizer=pipeline.tokenizer,
            prompts=prompts,
            family="flux2-dev",
        )


def test_latents_and_ids_equal_the_pipelines(pipeline: Flux2KleinPipeline) -> None:
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        expected = pipeline._encode_vae_image(pixels, generator=None)
    ours = flux2.encode_latents(pipeline.vae, pixels)
    assert ours.shape == (2, 128, 4, 3)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert torch.equal(flux2.pack(ours), pipeline._pack_latents(expected))
    assert torch.equal(flux2.latent_ids(ours), pipeline._prepare_latent_ids(expected))
    references = [ours[:1], flux2.encode_latents(pipeline.vae, pixels[:1, :, :32, :32])]
    assert torch.equal(flux2.reference_ids(references), pipeline._prepare_image_ids(references))
    raw = pipeline.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(flux2.denormalize_latents(pipeline.vae, ours), raw, rtol=1e-5, atol=1e-5)
    assert torch.equal(flux2.unpatchify(flux2.patchify(raw)), raw)
