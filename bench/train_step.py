"""Seconds per LoRA training step, peak memory and model FLOPs utilisation of the FLUX.1 transformer.

On a GPU it builds the full-size FLUX.1-dev architecture with random weights (same FLOPs as the
real model, nothing to download); on the CPU the tiny test model. Each configuration trains a
rank-16 LoRA (the trainer's targets and optimizer) at batch 1 on random latents and text states.
MFU = 2 x forward FLOPs (forward plus the input-gradient backward; recomputation not counted),
counted by torch's FlopCounterMode, over step time x the GPU's dense bf16 peak.

    python bench/train_step.py                     # 512 and 1024, fp8_base and checkpointing on/off
    python bench/train_step.py --resolutions 1024 --steps 10 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import time

import torch
from diffusers import FluxTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from fluxtrain.training.flow import image_ids, text_ids
from fluxtrain.training.lora import add_lora
from fluxtrain.training.model_files import shipped_config
from fluxtrain.training.optim import build_optimizer
from fluxtrain.training.tiny import tiny_transformer_config

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by device-name substring.
DENSE_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def gpu_peak_tflops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_BF16_TFLOPS.items() if key in name), None)


def build_transformer(device: torch.device, *, fp8: bool) -> FluxTransformer2DModel:
    """Random-weight FLUX.1-dev on a GPU (built in bf16 on the device), the tiny model on the CPU."""
    if device.type == "cuda":
        config = {k: v for k, v in shipped_config("transformer_dev").items() if not k.startswith("_")}
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with device:
                model = FluxTransformer2DModel(**config)
        finally:
            torch.set_default_dtype(previous)
        if fp8:
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        return model
    return FluxTransformer2DModel(**tiny_transformer_config())


def inputs(model: FluxTransformer2DModel, resolution: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random packed latents and text states of one 1 x resolution^2 image with 512 T5 tokens."""
    side = resolution // 8
    tokens = (side // 2) ** 2
    config = model.config
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 512, config.joint_attention_dim, device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=device, dtype=dtype),
        "timestep": torch.rand(1, device=device, dtype=dtype),
        "img_ids": image_ids(side, side, device=device, dtype=dtype),
        "txt_ids": text_ids(512, device=device, dtype=dtype),
        "guidance": torch.ones(1, device=device, dtype=dtype) if config.guidance_embeds else None,
        "return_dict": False,
    }


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(model, params, optimizer, batch: dict, *, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of a full step (forward, backward, optimizer) after `warmup` steps."""
    target = torch.randn_like(batch["hidden_states"])
    for index in range(warmup + steps):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        prediction = model(**batch)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def forward_flops(model, batch: dict) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = args.peak_tflops or (gpu_peak_tflops(device) if cuda else None)
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU x{torch.get_num_threads()} threads"
    fp8_options = (False, True) if cuda else (False,)
    if not args.json:
        print(f"# {machine}, {'FLUX.1-dev size' if cuda else 'tiny model'}, rank {args.rank}, batch 1")
        print(f"{'res':>5} {'fp8':>5} {'ckpt':>5} {'s/step':>8} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for fp8 in fp8_options:
        model = build_transformer(device, fp8=fp8)
        params = add_lora(model, rank=args.rank, alpha=1.0, dtype=torch.float32)
        model.train()
        optimizer = build_optimizer(params, name="adamw", learning_rate=1e-4)
        for resolution, checkpointing in itertools.product(args.resolutions, (False, True)):
            if checkpointing:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()
            batch = inputs(model, resolution, device, dtype)
            flops = forward_flops(model, batch)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = measure(
                    model, params, optimizer, batch, steps=args.steps, warmup=args.warmup, device=device
                )
            except torch.OutOfMemoryError:
                seconds = float("nan")
            achieved = 2 * flops / seconds / 1e12
            row = {
                "machine": machine,
                "resolution": resolution,
                "fp8_base": fp8,
                "gradient_checkpointing": checkpointing,
                "seconds_per_step": round(seconds, 4),
                "peak_memory_gib": round(peak_memory_gib(device), 2),
                "forward_tflop": round(flops / 1e12, 3),
                "achieved_tflops": round(achieved, 3),
                "mfu": round(achieved / peak, 4) if peak else None,
            }
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                print(
                    f"{resolution:>5} {str(fp8):>5} {str(checkpointing):>5} {seconds:>8.4f} "
                    f"{row['peak_memory_gib']:>9.2f} {achieved:>8.3f} {mfu:>6}",
                    flush=True,
                )
        del model, params, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
