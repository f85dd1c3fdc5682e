"""Caption benchmark: images/s at batch 1 against the default batch, through fluxtrain's captioner.

CPU: the tiny Florence-2 of `fluxtrain dev tiny-models`. CUDA (when present): Florence-2-large's
real-size architecture (DaViT vision tower, 12+12-layer BART, 768 px, 577 image tokens, 51k vocab)
with random weights, its config built here, nothing downloaded. Random weights never emit
end-of-sequence (the special tokens' output rows are zeroed), so every image costs exactly
`--max-new-tokens` steps and the batch comparison is fair. Each run captions the same synthetic
photo-like JPEGs through `Florence2Captioner` (decode/preprocess prefetch, generate, decode).

    .venv/bin/python bench/caption.py [--images 16] [--max-new-tokens 32] [--num-beams 3] \\
        [--batch-sizes 1 2 8] [--no-cuda] [--no-tiny] [--json]

`--json` prints one object a line as each measurement ends (with `x_batch_1`, its speed over
batch 1 of the same model) and no table, for bench/gpu_check.py to read as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Florence2ForConditionalGeneration

from fluxtrain.captioning.captioner import Florence2Captioner, GenerationOptions
from fluxtrain.captioning.florence import (
    CaptionModel,
    default_batch_size,
    get_caption_model,
    release_caption_models,
)
from fluxtrain.captioning.tiny import (
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    florence2_config,
    florence2_generation_config,
    florence2_processor,
    silence_special_tokens,
    tiny_tokenizer,
    write_tiny_florence2,
)
from fluxtrain.settings import Settings

LARGE_IMAGE_SIZE = 768
LARGE_IMAGE_TOKENS = (LARGE_IMAGE_SIZE // 32) ** 2 + 1
LARGE_VOCAB = 51329


@dataclass
class Measurement:
    model: str
    device: str
    batch_size: int
    images: int
    seconds: float
    images_per_s: float


def write_photos(folder: Path, count: int) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields plus noise) of a few landscape and portrait sizes."""
    rng = np.random.default_rng(7)
    sizes = [(1024, 768), (768, 1024), (1200, 800), (900, 900)]
    paths = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack(
            [
                127 + 100 * np.sin(x / (60 + 7 * index) + c) * np.cos(y / (80 + 3 * index) - c)
                for c in (0.0, 1.3, 2.6)
            ],
            axis=-1,
        )
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{index:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def write_large_florence2(out_dir: Path) -> Path:
    """Florence-2-large's architecture with random fp16 weights and the tiny tokenizer (no download)."""
    target = out_dir / "florence2-large-random"
    tokenizer = tiny_tokenizer()
    processor = florence2_processor(tokenizer, image_size=LARGE_IMAGE_SIZE, image_tokens=LARGE_IMAGE_TOKENS)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = florence2_config(
        vocab_size=LARGE_VOCAB,
        image_token_id=image_token_id,
        text={
            "d_model": 1024,
            "encoder_layers": 12,
            "decoder_layers": 12,
            "encoder_attention_heads": 16,
            "decoder_attention_heads": 16,
            "encoder_ffn_dim": 4096,
            "decoder_ffn_dim": 4096,
            "max_position_embeddings": 4096,
        },
        vision={
            "depths": [1, 1, 9, 1],
            "embed_dim": [256, 512, 1024, 2048],
            "num_heads": [8, 16, 32, 64],
            "num_groups": [8, 16, 32, 64],
            "window_size": 12,
            "projection_dim": 1024,
        },
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Florence2ForConditionalGeneration(config).eval()
    unused = [*range(len(SPECIAL_TOKENS)), image_token_id, *range(len(tokenizer), LARGE_VOCAB)]
    silence_special_tokens(model, unused)
    model.generation_config = florence2_generation_config()
    model.to(torch.float16).save_pretrained(target)
    processor.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return target


def measure(
    loaded: CaptionModel, label: str, photos: list[Path], batch_size: int, options: GenerationOptions
) -> Measurement:
    captioner = Florence2Captioner(loaded, batch_size=batch_size, max_image_pixels=100_000_000)
    for _ in captioner.caption(photos[:batch_size], options):
        pass
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    captioned = 0
    for outcome in captioner.caption(photos, options):
        captioned += len(outcome.captions)
        assert not outcome.failed, outcome.failed
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Measurement(label, str(loaded.device), batch_size, captioned, seconds, captioned / seconds)


def run(
    model_dir: Path, label: str, device: str, photos: list[Path], args: argparse.Namespace
) -> list[Measurement]:
    settings = Settings(caption_model=str(model_dir), caption_device=device, _env_file=None)
    loaded = get_caption_model(settings)
    sizes = args.batch_sizes or sorted({1, default_batch_size(settings, loaded.device)})
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    results: list[Measurement] = []
    for size in sizes:
        results.append(measure(loaded, label, photos, size, options))
        if args.json:
            print(json.dumps({**asdict(results[-1]), "x_batch_1": speedup(results, results[-1])}), flush=True)
    release_caption_models()
    return results


def speedup(results: list[Measurement], result: Measurement) -> float | None:
    """Images/s over batch 1's of the same model, when batch 1 was measured."""
    baseline = next((r for r in results if r.model == result.model and r.batch_size == 1), None)
    return round(result.images_per_s / baseline.images_per_s, 3) if baseline else None


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(results: list[Measurement]) -> None:
    for result in results:
        print(json.dumps(asdict(result)))
    header = ("model", "device", "batch", "images", "seconds", "images/s", "x batch 1")
    print("\n{:<28}{:<8}{:>6}{:>8}{:>10}{:>10}{:>11}".format(*header))
    for result in results:
        ratio = speedup(results, result)
        print(
            f"{result.model:<28}{result.device:<8}{result.batch_size:>6}{result.images:>8}"
            f"{result.seconds:>10.2f}{result.images_per_s:>10.2f}"
            + (f"{ratio:>10.2f}x" if ratio is not None else f"{'n/a':>11}")
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16, help="images per measurement")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="*", help="default: 1 and the device's default")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the real-size CUDA run")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny model on the CPU")
    parser.add_argument("--json", action="store_true", help="one JSON object a line as each ends, no table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    if not args.json:
        print(
            f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, GPU: {gpu}"
        )
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="fluxtrain-bench-caption-") as tmp:
        root = Path(tmp)
        photos = write_photos(root, args.images)
        if not args.no_tiny:
            results += run(write_tiny_florence2(root), "tiny-florence2", "cpu", photos, args)
        if torch.cuda.is_available() and not args.no_cuda:
            results += run(write_large_florence2(root), "florence2-large-random", "cuda", photos, args)
    if not args.json:
        report(results)


if __name__ == "__main__":
    main()
