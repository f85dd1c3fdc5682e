"""Loading the four FLUX.1 models from single files offline, and a tiny FluxPipeline built from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.convert import bfl_to_diffusers_transformer, infer_transformer_config
from fluxtrain.training.model_files import (
    ModelFiles,
    load_autoencoder,
    load_clip,
    load_t5,
    load_transformer,
    make_scheduler,
    resolve_model_files,
    tokenizer_dir,
)


def _transformer_inputs(config: dict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens, text = 16, 5
    inputs = {
        "hidden_states": torch.randn(1, tokens, config["in_channels"], generator=gen),
        "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=gen),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
        )
        .reshape(3, -1)
        .T,
        "txt_ids": torch.zeros(text, 3),
    }
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def test_model_files_resolve_as_train_resolves_them(tiny_models: Path, tmp_path: Path) -> None:
    """The trainer's side of `model_paths`: relative values only, never climbing out, links followed."""

    def files(**fields: str) -> ModelFiles:
        return resolve_model_files(TrainConfig(output_name="x", **fields), tiny_models)

    found = files(ae="tokenizers/../ae.sft")
    assert found.ae == tiny_models / "ae.sft" and found.transformer == tiny_models / "flux1-dev.sft"
    assert found.t5_tokenizer == tokenizer_dir(tiny_models, "t5xxl") == tiny_models / "tokenizers" / "t5xxl"
    with pytest.raises(InvalidInputError, match="clip_l: .* must be a path relative to the models folder"):
        files(clip_l=str(tiny_models / "clip_l.safetensors"))
    with pytest.raises(InvalidInputError, match="ae: '../ae.sft' leaves the models folder"):
        files(ae="../ae.sft")
    with pytest.raises(NotFoundError) as err:
        files(pretrained_model="flux1-schnell.sft")
    assert "flux1-schnell.sft" in err.value.message and str(tiny_models) in err.value.message
    with pytest.raises(InvalidInputError):
        files(ae="")
    root = tmp_path / "models"
    shutil.copytree(tiny_models / "tokenizers", root / "tokenizers")
    for name in ("flux1-dev.sft", "ae.sft", "clip_l.safetensors", "t5xxl_fp16.safetensors"):
        (root / name).symlink_to(tiny_models / name)
    linked = resolve_model_files(TrainConfig(output_name="x"), root)
    assert linked.transformer == root / "flux1-dev.sft" and linked.transformer.resolve() == (
        tiny_models / "flux1-dev.sft"
    )


def test_single_file_transformer_matches_a_diffusers_folder(tiny_models: Path, tmp_path: Path) -> None:
    bfl = load_file(tiny_models / "flux1-dev.sft")
    config = infer_transformer_config(bfl)
    reference = FluxTransformer2DModel(**config)
    reference.load_state_dict(bfl_to_diffusers_transformer(bfl), strict=True)
    reference.save_pretrained(tmp_path / "pipeline" / "transformer")
    from_folder = FluxTransformer2DModel.from_pretrained(tmp_path / "pipeline" / "transformer")

    model = load_transformer(tiny_models / "flux1-dev.sft", dtype=torch.float32)
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    inputs = _transformer_inputs(config)
    with torch.no_grad():
        ours = model(**inputs).sample
        theirs = from_folder(**inputs).sample
    assert ours.shape == (1, 16, 64)
    assert torch.equal(ours, theirs)
    folder_model = load_transformer(tmp_path / "pipeline", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(folder_model(**inputs).sample, ours)


def test_schnell_transformer_and_bf16(tiny_schnell_models: Path) -> None:
    model = load_transformer(tiny_schnell_models / "flux1-dev.sft", dtype=torch.bfloat16)
    assert model.config.guidance_embeds is False and model.dtype == torch.bfloat16


def test_autoencoder_loads_with_flux_scaling(tiny_models: Path) -> None:
    vae = load_autoencoder(tiny_models / "ae.sft", dtype=torch.float32)
    assert vae.config.latent_channels == 16
    assert vae.config.scaling_factor == pytest.approx(0.3611) and vae.config.shift_factor == pytest.approx(
        0.1159
    )
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 32)).latent_dist.mode()
        assert latents.shape == (1, 16, 8, 4)  # FLUX's 8x downsampling
        assert vae.decode(latents).sample.shape == (1, 3, 64, 32)


def test_text_encoders_load_with_local_tokenizers(tiny_models: Path) -> None:
    clip, clip_tok = load_clip(
        tiny_models / "clip_l.safetensors",
        tokenizer_dir=tokenizer_dir(tiny_models, "clip_l"),
        dtype=torch.float32,
    )
    ids = clip_tok(["a photo of the dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == clip_tok.bos_token_id
    with torch.no_grad():
        pooled = clip(ids).pooler_output
    assert pooled.shape == (1, 32) and torch.isfinite(pooled).all()

    t5, t5_tok = load_t5(tiny_models / "t5xxl_fp16.safetensors", tokenizer_dir=None, dtype=torch.bfloat16)
    assert t5.dtype == torch.bfloat16 and t5.shared.weight is t5.encoder.embed_tokens.weight
    ids = t5_tok(["a photo of the cat"], return_tensors="pt").input_ids
    assert ids[0, -1] == t5_tok.eos_token_id
    with torch.no_grad():
        assert t5(ids).last_hidden_state.shape == (1, ids.shape[1], 32)


def test_scaled_fp8_t5_is_dequantized(tiny_models: Path, tmp_path: Path) -> None:
    sd = load_file(tiny_models / "t5xxl_fp16.safetensors")
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for key, tensor in sd.items():
        if (
            key.endswith(".weight")
            and tensor.ndim == 2
            and "relative_attention_bias" not in key
            and key != "shared.weight"
        ):
            scale = tensor.float().abs().max() / 448
            scaled[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            scaled[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = tensor
    save_file(scaled, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    tokenizers = tokenizer_dir(tiny_models, "t5xxl")
    ref, tok = load_t5(tiny_models / "t5xxl_fp16.safetensors", tokenizer_dir=tokenizers, dtype=torch.float32)
    fp8, _ = load_t5(
        tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", tokenizer_dir=tokenizers, dtype=torch.float32
    )
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert fp8.get_parameter(q).dtype == torch.float32
    assert torch.allclose(fp8.get_parameter(q), ref.get_parameter(q), rtol=0.07, atol=1e-3)
    ids = tok(["a dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).last_hidden_state.flatten(), fp8(ids).last_hidden_state.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98


def test_missing_tokenizer_folder_is_named(tiny_models: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_models / "clip_l.safetensors", tmp_path / "clip_l.safetensors")
    with pytest.raises(NotFoundError) as err:
        load_clip(tmp_path / "clip_l.safetensors", tokenizer_dir=None, dtype=torch.float32)
    assert str(tmp_path / "tokenizers" / "clip_l") in err.value.message
    missing = tmp_path / "nowhere" / "t5xxl"
    with pytest.raises(NotFoundError, match=str(missing)):
        load_t5(tiny_models / "t5xxl_fp16.safetensors", tokenizer_dir=missing, dtype=torch.float32)


def test_wrong_files_are_refused(tiny_models: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a FLUX.1 transformer"):
        load_transformer(tiny_models / "ae.sft", dtype=torch.float32)
    (tmp_path / "broken.sft").write_bytes(b"not safetensors")
    with pytest.raises(InvalidInputError, match="broken.sft"):
        load_autoencoder(tmp_path / "broken.sft", dtype=torch.float32)
    with pytest.raises(InvalidInputError, match="not a T5 encoder"):
        load_t5(
            tiny_models / "clip_l.safetensors",
            tokenizer_dir=tokenizer_dir(tiny_models, "t5xxl"),
            dtype=torch.float32,
        )


def test_tiny_files_make_a_working_flux_pipeline_and_folders_load(tiny_models: Path, tmp_path: Path) -> None:
    dtype = torch.float32
    clip, clip_tok = load_clip(tiny_models / "clip_l.safetensors", tokenizer_dir=None, dtype=dtype)
    t5, t5_tok = load_t5(tiny_models / "t5xxl_fp16.safetensors", tokenizer_dir=None, dtype=dtype)
    pipe = FluxPipeline(
        scheduler=make_scheduler(),
        vae=load_autoencoder(tiny_models / "ae.sft", dtype=dtype),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=load_transformer(tiny_models / "flux1-dev.sft", dtype=dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of a dog",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3) and (image >= 0).all() and (image <= 1).all()
    assert image.std() > 0

    pipe.save_pretrained(tmp_path / "pipeline")
    folder = tmp_path / "pipeline"
    clip2, tok2 = load_clip(folder, tokenizer_dir=None, dtype=dtype)
    t5_2, _ = load_t5(folder / "text_encoder_2", tokenizer_dir=None, dtype=dtype)
    vae2 = load_autoencoder(folder, dtype=dtype)
    assert tok2.get_vocab() == clip_tok.get_vocab()
    assert torch.equal(clip2.embeddings.token_embedding.weight, clip.embeddings.token_embedding.weight)
    assert torch.equal(t5_2.shared.weight, t5.shared.weight)
    assert vae2.config.shift_factor == pytest.approx(0.1159)
