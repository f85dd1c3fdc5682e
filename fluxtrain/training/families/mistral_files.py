"""FLUX.2 [dev]'s Mistral text encoder on disk: which tensors are the language model's, and whether
a file or folder holds one deep enough, from safetensors headers only.

Imports no model library, so `/train` can refuse a wrong text encoder (klein's Qwen3, a file too
shallow for hidden layer 30) before a run exists, with the message the trainer gives.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from safetensors import safe_open

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.families.detect import block_count

DEEPEST_TEXT_LAYER = 30
"""The deepest of dev's stacked hidden layers (10/20/30): the input of layer 30, so layers 0-29 run."""
MISTRAL_PREFIXES = (
    "model.language_model.",  # Mistral3ForConditionalGeneration, transformers 5
    "language_model.model.",  # Mistral3ForConditionalGeneration, transformers 4 (the FLUX.2-dev repo)
    "text_encoders.mistral3_24b.transformer.model.",  # a ComfyUI checkpoint's text encoder
    "model.",  # MistralForCausalLM, ComfyUI's text encoder files
)
SINGLE_FILE_SUFFIXES = (".sft", ".safetensors")


def shard_files(path: Path, shown: str) -> list[Path]:
    """The safetensors files of a text encoder: the file itself, or every one in its folder
    (a model folder, or a pipeline folder's text_encoder/)."""
    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise InvalidInputError(f"text_encoder: folder '{shown}' holds no .safetensors files")
        return files
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise InvalidInputError(f"text_encoder: '{shown}' must be a .safetensors file or a model folder")
    return [path]


def language_model_index(path: Path, shown: str) -> dict[Path, dict[str, str]]:
    """For each file, its language-model tensors as {key in the file: key without the prefix};
    the vision tower, projector and LM head are left out."""
    files = shard_files(path, shown)
    with ExitStack() as stack:
        try:
            keys = {
                file: list(stack.enter_context(safe_open(str(file), framework="pt")).keys())  # noqa: SIM118
                for file in files
            }
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for any bad header
            raise InvalidInputError(
                f"text_encoder: '{shown}' is not a readable safetensors file: {exc}"
            ) from exc
    every = [key for names in keys.values() for key in names]
    if any(".self_attn.q_norm." in key for key in every):
        raise InvalidInputError(
            f"text_encoder: '{shown}' is a Qwen3 text encoder (FLUX.2 [klein]'s); FLUX.2 [dev] takes "
            "Mistral Small 3.x, e.g. mistral_3_small_flux2_bf16.safetensors"
        )
    prefix = next((p for p in MISTRAL_PREFIXES if any(k.startswith(p) for k in every)), "")
    return {
        file: {
            key: key.removeprefix(prefix)
            for key in names
            if key.startswith(prefix) and not key.removeprefix(prefix).startswith("lm_head.")
        }
        for file, names in keys.items()
    }


def check_mistral_text_encoder(path: Path, shown: str) -> None:
    """A 422 unless the headers hold a Mistral language model with at least 30 layers (a Qwen3
    file or a too shallow one is named); no weight is read."""
    index = language_model_index(path, shown)
    layers = block_count([key for names in index.values() for key in names.values()], "layers")
    if layers < DEEPEST_TEXT_LAYER:
        raise InvalidInputError(
            f"text_encoder: '{shown}' has {layers} Mistral layers; FLUX.2 [dev] reads hidden layer "
            f"{DEEPEST_TEXT_LAYER}, so it needs at least {DEEPEST_TEXT_LAYER}"
        )
