"""Seconds of the LoRA load check (`training/lora_check.py`) on a FLUX.1-dev-sized LoRA.

The FLUX.1-dev architecture is built on the meta device, so its 12 B frozen weights take no
memory; only the adapter (random, as if trained) and the base weight of the Linear the check
runs whole are real. The LoRA is written in each layout and export dtype as the trainer writes
it, then checked; the check reads the file back from disk, so the figure includes that read.

    python bench/lora_check.py                      # rank 16, diffusers and kohya, bf16
    python bench/lora_check.py --rank 64 --dtype float32 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from fluxtrain.training.export import save_lora
from fluxtrain.training.lora import add_lora, lora_state_dict
from fluxtrain.training.lora_check import check_lora_file, lora_layers
from fluxtrain.training.model_files import shipped_config

# The Linear each layout's check runs whole: the first module of the file's first pair (by name).
PROBED = ("single_transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_out.0")


def _materialize(model: torch.nn.Module, name: str, values: torch.Tensor) -> None:
    """Swap a meta parameter for a real one (a meta tensor's data cannot be set in place)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    setattr(module, attr, torch.nn.Parameter(values, requires_grad=getattr(module, attr).requires_grad))


def dev_transformer_with_lora(rank: int) -> torch.nn.Module:
    """FLUX.1-dev on the meta device with a real rank-`rank` adapter whose B is non-zero."""
    config = {k: v for k, v in shipped_config("transformer_dev").items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config)
    add_lora(transformer, rank=rank, alpha=float(rank), dtype=torch.float32)
    generator = torch.Generator("cpu").manual_seed(0)
    for name, param in list(transformer.named_parameters()):
        if "lora_" in name:
            values = torch.randn(param.shape, generator=generator) * (0.01 if "lora_B" in name else 1.0)
            _materialize(transformer, name, values)
    for name in PROBED:
        weight = torch.randn(
            lora_layers(transformer)[name].get_base_layer().weight.shape, generator=generator
        )
        _materialize(transformer, f"{name}.base_layer.weight", weight.to(torch.bfloat16))
        _materialize(
            transformer, f"{name}.base_layer.bias", torch.zeros(weight.shape[0], dtype=torch.bfloat16)
        )
    return transformer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared, busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    transformer = dev_transformer_with_lora(args.rank)
    print(f"built FLUX.1-dev (meta) with a rank-{args.rank} LoRA in {time.perf_counter() - started:.1f} s")
    metadata = {"ss_network_dim": str(args.rank)}
    with tempfile.TemporaryDirectory() as folder:
        for save_format in ("diffusers", "kohya"):
            path = Path(folder) / f"{save_format}.safetensors"
            options = {"save_format": save_format, "rank": args.rank, "dtype": dtype}
            started = time.perf_counter()
            lora = lora_state_dict(transformer)
            save_lora(
                path, lora, alpha=float(args.rank), metadata=metadata, config=transformer.config, **options
            )
            written = time.perf_counter() - started
            started = time.perf_counter()
            check_lora_file(path, transformer, metadata=metadata, **options)
            checked = time.perf_counter() - started
            size = path.stat().st_size / 2**20
            timing = f"write {written:5.2f} s  check {checked:5.2f} s"
            print(f"{save_format:9s} {args.dtype} {size:6.1f} MiB  {timing}")


if __name__ == "__main__":
    main()
