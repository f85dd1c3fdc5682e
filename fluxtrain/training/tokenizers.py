"""Tokenizers of the text encoders: where they live under the models root and how they load.

Kept apart from `model_files` (which imports the diffusers and transformers model classes) so that
the service's dataset lint counts T5 tokens with the trainer's own tokenizer rule without paying for
those imports on its first request.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fluxtrain.errors import NotFoundError

TOKENIZER_HUB_IDS = {"clip_l": "openai/clip-vit-large-patch14", "t5xxl": "google/t5-v1_1-xxl"}


def tokenizer_dir(models_root: Path, kind: str) -> Path:
    """Where the tokenizer of a text encoder lives under the models root: tokenizers/{clip_l,t5xxl}."""
    return models_root / "tokenizers" / kind


def _network_available() -> bool:
    offline_flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if any(flag not in ("", "0") for flag in offline_flags):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


def load_tokenizer(kind: str, folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder`; else the hub's where there is a network; else NotFoundError."""
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hub_id = TOKENIZER_HUB_IDS[kind]
    if _network_available():
        try:
            return AutoTokenizer.from_pretrained(hub_id)
        except OSError as exc:
            raise NotFoundError(
                f"{kind} tokenizer folder {folder} is missing and {hub_id} failed: {exc}"
            ) from exc
    raise NotFoundError(
        f"{kind} tokenizer folder {folder} is missing (no network to fetch {hub_id}); "
        f"save the tokenizer there, e.g. with `fluxtrain dev tiny-models` for tests"
    )
