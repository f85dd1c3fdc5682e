"""The tiny Florence-2 is a real, loadable, deterministic checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image
from transformers import AutoProcessor, Florence2ForConditionalGeneration

from fluxtrain.captioning.tiny import TINY_IMAGE_TOKENS, write_tiny_florence2


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_the_same_files_every_time(tiny_florence2: Path, tmp_path: Path) -> None:
    again = write_tiny_florence2(tmp_path)
    assert again == tmp_path / "florence2"
    assert _digests(again) == _digests(tiny_florence2)
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(
        _digests(again)
    )


def test_loads_with_the_native_classes_and_captions(tiny_florence2: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_florence2)
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_florence2).eval()
    inputs = processor(images=Image.new("RGB", (40, 30), (9, 99, 199)), text="<CAPTION>", return_tensors="pt")
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == TINY_IMAGE_TOKENS
    generated = model.generate(**inputs, max_new_tokens=5, num_beams=1)
    text = processor.batch_decode(generated, skip_special_tokens=True)[0]
    assert text.strip()
    assert (
        processor.tokenizer.decode(processor.tokenizer("a cat")["input_ids"], skip_special_tokens=True)
        == "a cat"
    )
