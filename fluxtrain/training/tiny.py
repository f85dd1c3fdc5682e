"""Tiny randomly initialised FLUX.1 model files in the seed's real layouts, for tests and the demo.

The real classes (FluxTransformer2DModel, AutoencoderKL, CLIPTextModel, T5EncoderModel) at toy
sizes, saved as the four single files the seed names, plus locally built tokenizers, so a folder
written here works as $MODELS_ROOT with the default file names and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save as save_safetensors
from tokenizers import pre_tokenizers
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from fluxtrain.fsutil import atomic_write_bytes
from fluxtrain.training.convert import (
    diffusers_to_bfl_transformer,
    diffusers_to_bfl_vae,
    rope_axes_for_head_dim,
)

TINY_TEXT_DIM = 32
TINY_HEAD_DIM = 16
TINY_HEADS = 2
LATENT_CHANNELS = 16
TINY_VAE_CHANNELS = (16, 32, 32, 32)
"""Four levels like FLUX's autoencoder (three downsamplings: 8x), so a tiny model sees the real
model's token counts: a 512 px image is 64x64 latents, 32x32 = 1,024 tokens after 2x2 packing."""
TINY_VAE_GROUPS = 16

CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_CLIP_MERGES = ("t h", "th e</w>", "a n", "an d</w>", "o n", "i n", "e r", "o f</w>")
_T5_PUNCTUATION = ".,!?'-:;()"


def _save(sd: dict[str, Tensor], path: Path, dtype: torch.dtype) -> Path:
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    atomic_write_bytes(path, save_safetensors(tensors, metadata={"format": "pt"}))
    return path


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, ...]]]:
    """A byte-level BPE vocab shaped like CLIP's: bytes, bytes ending a word, merges, then the specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [f"{c}</w>" for c in alphabet]
    tokens += [merge.replace(" ", "") for merge in _CLIP_MERGES]
    tokens += list(CLIP_SPECIAL)
    return {tok: i for i, tok in enumerate(tokens)}, [tuple(m.split(" ")) for m in _CLIP_MERGES]


def _t5_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocab shaped like T5's: <pad>, </s>, <unk>, then word-start and inner pieces."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{c}", -3.0) for c in letters]
    pieces += [(c, -4.0) for c in letters + _T5_PUNCTUATION]
    pieces += [(f"▁{w}", -1.0) for w in ("a", "the", "photo", "of", "dog", "cat", "and", "in")]
    return pieces


def write_tiny_tokenizers(out_dir: Path) -> dict[str, Path]:
    """Build CLIP-L-style and T5-style tokenizers locally and save them under out_dir/tokenizers."""
    clip_dir = out_dir / "tokenizers" / "clip_l"
    t5_dir = out_dir / "tokenizers" / "t5xxl"
    vocab, merges = _clip_vocab()
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(clip_dir)
    T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512).save_pretrained(t5_dir)
    return {"tokenizer_clip_l": clip_dir, "tokenizer_t5xxl": t5_dir}


def tiny_transformer_config(*, guidance: bool = True) -> dict:
    """FluxTransformer2DModel kwargs of the tiny model; consistent with the tiny encoders and VAE."""
    return {
        "patch_size": 1,
        "in_channels": 4 * LATENT_CHANNELS,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": TINY_HEAD_DIM,
        "num_attention_heads": TINY_HEADS,
        "joint_attention_dim": TINY_TEXT_DIM,
        "pooled_projection_dim": TINY_TEXT_DIM,
        "guidance_embeds": guidance,
        "axes_dims_rope": rope_axes_for_head_dim(TINY_HEAD_DIM),
    }


def tiny_vae_config() -> dict:
    """AutoencoderKL kwargs of the tiny FLUX-like autoencoder: 8x downsampling and 16 latent channels
    like the real one, no quant convs, toy widths."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(TINY_VAE_CHANNELS),
        "up_block_types": ["UpDecoderBlock2D"] * len(TINY_VAE_CHANNELS),
        "block_out_channels": list(TINY_VAE_CHANNELS),
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": TINY_VAE_GROUPS,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    }


def write_tiny_flux_files(out_dir: Path, *, guidance: bool = True) -> dict[str, Path]:
    """Write flux1-dev.sft, ae.sft, clip_l.safetensors, t5xxl_fp16.safetensors and tokenizers into out_dir.

    Returns the paths keyed by the run.json field each one fills (pretrained_model, ae, clip_l,
    t5xxl) and by tokenizer_clip_l / tokenizer_t5xxl. `guidance=False` writes a schnell-like
    transformer without guidance_in.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_tiny_tokenizers(out_dir)
    clip_vocab_size = len(_clip_vocab()[0])
    t5_vocab_size = len(_t5_vocab())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**tiny_transformer_config(guidance=guidance))
        vae = AutoencoderKL(**tiny_vae_config())
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=clip_vocab_size,
                hidden_size=TINY_TEXT_DIM,
                intermediate_size=2 * TINY_TEXT_DIM,
                num_hidden_layers=2,
                num_attention_heads=TINY_TEXT_DIM // 16,
                max_position_embeddings=77,
                projection_dim=TINY_TEXT_DIM,
                hidden_act="quick_gelu",
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=t5_vocab_size,
                d_model=TINY_TEXT_DIM,
                d_kv=8,
                num_heads=4,
                d_ff=2 * TINY_TEXT_DIM,
                num_layers=2,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128,
            )
        )
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    paths["pretrained_model"] = _save(
        diffusers_to_bfl_transformer(transformer.state_dict()), out_dir / "flux1-dev.sft", torch.bfloat16
    )
    paths["ae"] = _save(diffusers_to_bfl_vae(vae.state_dict()), out_dir / "ae.sft", torch.float32)
    clip_sd = {f"text_model.{k}": v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    paths["clip_l"] = _save(clip_sd, out_dir / "clip_l.safetensors", torch.float16)
    paths["t5xxl"] = _save(t5_sd, out_dir / "t5xxl_fp16.safetensors", torch.float16)
    return paths
