"""Seconds per LoRA training step, peak memory and model FLOPs utilisation of a FLUX transformer.

On a GPU it builds the full-size FLUX.1-dev architecture with random weights (same FLOPs as the
real model, nothing to download); on the CPU the tiny test model. Each configuration trains a
rank-16 LoRA (the trainer's targets, optimizer, bf16 autocast and fp8_base order: adapter first,
then float8 storage) at batch 1 on random latents and 512 text tokens: 1024x1024 is 4096 image
tokens, 512x512 is 1024.
MFU = 2 x forward FLOPs (forward plus the input-gradient backward; recomputation not counted) over
step time x the GPU's dense bf16 peak. Forward FLOPs are counted from the architecture (every
linear layer and both attention matmuls, `flux_forward_flops`), so the figure does not depend on
which attention kernel runs; the LoRA's own FLOPs (under 1% at rank 16) are left out. With
gradient checkpointing every block's forward runs a second time in the backward pass: `hfu`
(hardware FLOPs utilisation) counts that recomputation, `mfu` does not. s/step is the median of
the timed steps after the warm-up. The model is built once per precision and reused for every
resolution and checkpointing setting; an out-of-memory step is reported as such (`--json`: one
object a line, as each row is measured). Each row also shows `fluxtrain.training.memory`'s estimate:
`est GiB` is its allocated part (weights, LoRA with gradients and AdamW state, activations), to
read against the measured peak allocated beside it; `est total` (`estimate_total_gib`) adds the
CUDA context and the allocator's margin, to read against the peak reserved.
`--family flux2-klein-4b|flux2-klein-9b|flux2-dev` does the same for FLUX.2 (full size on a GPU:
the released block counts and widths, 128 latent channels, no guidance but dev's constant 4.0; the
tiny klein model on the CPU), with klein's LoRA targets (dev's are the same modules), 512 text
tokens and 4-axis ids; its FLOPs are counted by `flux2_forward_flops` and its memory by the
estimate's `Flux2Shape`. `--family flux1-kontext` is
FLUX.1-dev (the tiny guided model on the CPU) with one reference image's tokens appended after the
noisy ones, ids on the target's grid with first axis 1, as the Kontext family trains: twice the
image tokens through every block, the loss on the target's half only (`kontext_inputs`).

    python bench/train_step.py --family flux2-klein-4b --resolutions 1024 --fp8-base on
    python bench/train_step.py --family flux2-dev --resolutions 1024 --fp8-base on --checkpointing on
    python bench/train_step.py --family flux1-kontext --resolutions 1024 --fp8-base on --checkpointing on
    python bench/train_step.py                     # 512 and 1024, fp8_base and checkpointing on/off
    python bench/train_step.py --resolutions 1024 --steps 10 --peak-tflops 989
    python bench/train_step.py --fp8-base on --checkpointing on --json
    python bench/train_step.py --resolutions 1024 --profile-out profile.txt   # + the first row's profile
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

from fluxtrain.training.config import TrainConfig
from fluxtrain.training.families import flux2
from fluxtrain.training.families.detect import released_flux2_config
from fluxtrain.training.families.klein import TARGET_PATTERN as KLEIN_TARGETS
from fluxtrain.training.flow import image_ids, text_ids
from fluxtrain.training.lora import TARGET_PATTERN, add_lora
from fluxtrain.training.memory import StepSize, estimate_memory, family_shape
from fluxtrain.training.model_files import shipped_config
from fluxtrain.training.optim import build_optimizer
from fluxtrain.training.tiny import tiny_transformer_config
from fluxtrain.training.tiny_flux2 import tiny_flux2_transformer_config

TEXT_TOKENS = 512
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by device-name substring.
DENSE_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "RTX 4090": 165.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def gpu_peak_tflops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_BF16_TFLOPS.items() if key in name), None)


def build_transformer(device: torch.device) -> FluxTransformer2DModel:
    """Random-weight FLUX.1-dev on a GPU, the tiny model on the CPU; built in bf16 on the device."""
    if device.type == "cuda":
        config = {k: v for k, v in shipped_config("transformer_dev").items() if not k.startswith("_")}
    else:
        config = tiny_transformer_config()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            return FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)


def build_flux2_transformer(family: str, device: torch.device) -> Flux2Transformer2DModel:
    """Random-weight FLUX.2 of the released size on a GPU, the tiny klein model (with dev's guidance
    embedding for dev) on the CPU; bf16."""
    if device.type == "cuda":
        config = released_flux2_config(family)
    else:
        config = {
            **tiny_flux2_transformer_config(),
            "guidance_embeds": released_flux2_config(family)["guidance_embeds"],
        }
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            return Flux2Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)


def flux2_forward_flops_parts(
    config: Mapping[str, Any], *, image_tokens: int, text_tokens: int
) -> tuple[int, int]:
    """(embeddings, modulations and final layer; the blocks) FLOPs of one batch-1 Flux2Transformer2DModel
    forward: no biases, one modulation per stream, SwiGLU MLPs of mlp_ratio x d (the input projection
    twice as wide), single blocks' fused qkv + MLP input and fused attention + MLP output."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(config["mlp_ratio"] * d)
    n, t = image_tokens, text_tokens
    joint = n + t

    def linear(rows: int, fan_in: int, fan_out: int) -> int:
        return 2 * rows * fan_in * fan_out

    attention = 2 * linear(joint, d, joint)
    embedders = 2 if config["guidance_embeds"] else 1  # the timestep's and [dev]'s guidance's
    outside = embedders * (linear(1, config["timestep_guidance_channels"], d) + linear(1, d, d))
    outside += 2 * linear(1, d, 6 * d) + linear(1, d, 3 * d)  # the shared modulations
    outside += linear(n, config["in_channels"], d) + linear(t, config["joint_attention_dim"], d)
    outside += linear(1, d, 2 * d) + linear(n, d, config["in_channels"])
    double = sum(4 * linear(rows, d, d) + linear(rows, d, 2 * mlp) + linear(rows, mlp, d) for rows in (n, t))
    double += attention
    single = linear(joint, d, 3 * d + 2 * mlp) + linear(joint, d + mlp, d) + attention
    return outside, config["num_layers"] * double + config["num_single_layers"] * single


def flux2_forward_flops(config: Mapping[str, Any], *, image_tokens: int, text_tokens: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one batch-1 forward pass of Flux2Transformer2DModel."""
    return sum(flux2_forward_flops_parts(config, image_tokens=image_tokens, text_tokens=text_tokens))


def flux2_inputs(model: Flux2Transformer2DModel, resolution: int, device: torch.device) -> dict:
    """Random patchified latents (128 channels, resolution / 16 per side) and 512 text tokens, bf16."""
    side, config, dtype = resolution // 16, model.config, torch.bfloat16
    grid = torch.zeros(1, config.in_channels, side, side, device=device)
    hidden = torch.randn(1, TEXT_TOKENS, config.joint_attention_dim, device=device, dtype=dtype)
    return {
        "hidden_states": torch.randn(1, side * side, config.in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": hidden,
        "timestep": torch.rand(1, device=device, dtype=dtype),
        "img_ids": flux2.latent_ids(grid),
        "txt_ids": flux2.text_ids(hidden),
        "guidance": torch.full((1,), 4.0, device=device, dtype=dtype) if config.guidance_embeds else None,
        "return_dict": False,
    }


def flux_forward_flops(config: Mapping[str, Any], *, image_tokens: int, text_tokens: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one batch-1 forward pass of FluxTransformer2DModel."""
    outside, blocks = _forward_flops_parts(config, image_tokens=image_tokens, text_tokens=text_tokens)
    return outside + blocks


def recomputed_forward_flops(config: Mapping[str, Any], *, image_tokens: int, text_tokens: int) -> int:
    """FLOPs that gradient checkpointing runs again in the backward pass: every block's forward."""
    return _forward_flops_parts(config, image_tokens=image_tokens, text_tokens=text_tokens)[1]


def _forward_flops_parts(
    config: Mapping[str, Any], *, image_tokens: int, text_tokens: int
) -> tuple[int, int]:
    """(embeddings and final layer, the double and single blocks) FLOPs of one batch-1 forward."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * d
    n, t = image_tokens, text_tokens
    joint = n + t

    def linear(rows: int, fan_in: int, fan_out: int) -> int:
        return 2 * rows * fan_in * fan_out

    attention = 2 * linear(joint, d, joint)  # Q K^T and the weighted sum of V
    embed = linear(1, 256, d) + linear(1, d, d)  # timestep
    embed += linear(1, config["pooled_projection_dim"], d) + linear(1, d, d)
    if config["guidance_embeds"]:
        embed += linear(1, 256, d) + linear(1, d, d)
    embed += linear(n, config["in_channels"], d) + linear(t, config["joint_attention_dim"], d)
    double = 2 * linear(1, d, 6 * d)  # AdaLayerNormZero of both streams
    double += sum(4 * linear(rows, d, d) + linear(rows, d, mlp) + linear(rows, mlp, d) for rows in (n, t))
    double += attention
    single = linear(1, d, 3 * d) + 3 * linear(joint, d, d) + linear(joint, d, mlp)
    single += linear(joint, d + mlp, d) + attention
    final = linear(1, d, 2 * d) + linear(n, d, config["patch_size"] ** 2 * config["in_channels"])
    return embed + final, config["num_layers"] * double + config["num_single_layers"] * single


def inputs(model: FluxTransformer2DModel, resolution: int, device: torch.device) -> dict:
    """Random packed latents and text states of one resolution^2 image with 512 T5 tokens, in bf16."""
    side = resolution // 8
    tokens = (side // 2) ** 2
    config, dtype = model.config, torch.bfloat16
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(
            1, TEXT_TOKENS, config.joint_attention_dim, device=device, dtype=dtype
        ),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=device, dtype=dtype),
        "timestep": torch.rand(1, device=device, dtype=dtype),
        "img_ids": image_ids(side, side, device=device, dtype=dtype),
        "txt_ids": text_ids(TEXT_TOKENS, device=device, dtype=dtype),
        "guidance": torch.ones(1, device=device, dtype=dtype) if config.guidance_embeds else None,
        "return_dict": False,
    }


def kontext_inputs(model: FluxTransformer2DModel, resolution: int, device: torch.device) -> dict:
    """`inputs` with one resolution^2 reference image's tokens appended after the noisy ones, its ids
    on the same grid with first axis 1 (`flow.predict_velocity`'s Kontext layout)."""
    batch = inputs(model, resolution, device)
    reference_ids = batch["img_ids"].clone()
    reference_ids[:, 0] = 1
    reference = torch.randn_like(batch["hidden_states"])
    return {
        **batch,
        "hidden_states": torch.cat([batch["hidden_states"], reference], dim=1),
        "img_ids": torch.cat([batch["img_ids"], reference_ids]),
    }


def peak_memory_gib(device: torch.device) -> tuple[float, float | None]:
    """Peak allocated and peak reserved GPU memory (what a card must hold), or the CPU's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None


def memory_estimate(
    model, *, family: str, resolution: int, image_tokens: int, fp8: bool, checkpointing: bool, rank: int
):
    """fluxtrain.training.memory's estimate of this row (batch 1, bf16, AdamW, the bench's rank);
    `image_tokens` counts a Kontext reference's too, as the estimate's `step_size` does."""
    config = TrainConfig(
        output_name="bench",
        network_dim=rank,
        fp8_base=fp8,
        gradient_checkpointing=checkpointing,
        mixed_precision="bf16",
    )
    step = StepSize(
        batch_size=1, image_tokens=image_tokens, text_tokens=TEXT_TOKENS, resolution=(resolution, resolution)
    )
    return estimate_memory(family_shape(family, model.config), config, step)


def measure(
    model, params, optimizer, batch: dict, *, steps: int, warmup: int, device: torch.device, targets: int
) -> float:
    """Median seconds of a full step (forward, backward, optimizer) over `steps` after `warmup` steps;
    the loss is taken on the first `targets` tokens (all but a Kontext reference's).

    The device is synchronised around each step, which costs one host sync a step (well under 1%
    of a full-size step) and times each step on its own.
    """
    target = torch.randn_like(batch["hidden_states"][:, :targets])
    timed = []
    for index in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_step(model, params, optimizer, batch, target, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            timed.append(time.perf_counter() - started)
    return statistics.median(timed)


def train_step(model, params, optimizer, batch: dict, target: torch.Tensor, *, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        prediction = model(**batch)[0][:, : target.shape[1]]
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def write_profile(
    path: Path, model, params, optimizer, batch: dict, *, device: torch.device, targets: int
) -> None:
    """One more step of the first configuration under torch.profiler: its costliest operators, as text.

    Written once, after that row is timed, so that a figure that misses its target can be read
    against where the step's time went (host syncs, fp32 copies, the attention kernel, float8
    dequantisation) without another GPU session.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    target = torch.randn_like(batch["hidden_states"][:, :targets])
    with profile(activities=activities) as prof:
        train_step(model, params, optimizer, batch, target, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60) + "\n")


def switch(value: str) -> tuple[bool, ...]:
    """`--fp8-base` / `--checkpointing` values: off, on or both (off first)."""
    return {"off": (False,), "on": (True,), "both": (False, True)}[value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (their median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fp8-base", choices=("off", "on", "both"), default="both")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--family",
        choices=("flux1", "flux1-kontext", "flux2-klein-4b", "flux2-klein-9b", "flux2-dev"),
        default="flux1",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    parser.add_argument(
        "--profile-out", type=Path, help="write a torch.profiler table of the first row's step"
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    peak = args.peak_tflops or (gpu_peak_tflops(device) if cuda else None)
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU x{torch.get_num_threads()} threads"
    klein = args.family.startswith("flux2-")
    size = {
        "flux1": "FLUX.1-dev",
        "flux1-kontext": "FLUX.1-dev + 1 reference (Kontext)",
        "flux2-klein-4b": "FLUX.2 [klein] 4B",
        "flux2-klein-9b": "FLUX.2 [klein] 9B",
        "flux2-dev": "FLUX.2 [dev]",
    }
    if not args.json:
        built = f"{size[args.family]} size" if cuda else "tiny model"
        print(f"# {machine}, {built}, rank {args.rank}, batch 1, bf16")
        print(
            f"{'res':>5} {'fp8':>5} {'ckpt':>5} {'s/step':>8} {'peak GiB':>9} {'est GiB':>8} "
            f"{'reserved':>9} {'est total':>9} {'TFLOP/s':>8} {'MFU':>6} {'HFU':>6}"
        )
    profiled = False
    for fp8 in switch(args.fp8_base):
        model = build_flux2_transformer(args.family, device) if klein else build_transformer(device)
        targets = KLEIN_TARGETS if klein else TARGET_PATTERN
        params = add_lora(
            model, rank=args.rank, alpha=1.0, dtype=torch.float32, fp8_base=fp8, targets=targets
        )
        model.train()
        optimizer = build_optimizer(params, name="adamw", learning_rate=1e-4)
        for resolution, checkpointing in itertools.product(args.resolutions, switch(args.checkpointing)):
            if checkpointing:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()
            build = flux2_inputs if klein else kontext_inputs if args.family == "flux1-kontext" else inputs
            batch = build(model, resolution, device)
            targets = (resolution // 16) ** 2  # the noisy image's tokens; the rest is the reference
            tokens = {"image_tokens": batch["hidden_states"].shape[1], "text_tokens": TEXT_TOKENS}
            if klein:
                flops = flux2_forward_flops(model.config, **tokens)
                recomputed = flux2_forward_flops_parts(model.config, **tokens)[1] if checkpointing else 0
            else:
                flops = flux_forward_flops(model.config, **tokens)
                recomputed = recomputed_forward_flops(model.config, **tokens) if checkpointing else 0
            hardware_flops = 2 * flops + recomputed
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = measure(
                    model,
                    params,
                    optimizer,
                    batch,
                    steps=args.steps,
                    warmup=args.warmup,
                    device=device,
                    targets=targets,
                )
            except torch.OutOfMemoryError:
                seconds = float("nan")
                optimizer.zero_grad(set_to_none=True)
            achieved = 2 * flops / seconds / 1e12
            hardware = hardware_flops / seconds / 1e12
            allocated, reserved = peak_memory_gib(device)
            measured = seconds == seconds  # NaN after an out-of-memory error
            estimate = memory_estimate(
                model,
                family=args.family,
                resolution=resolution,
                image_tokens=tokens["image_tokens"],
                fp8=fp8,
                checkpointing=checkpointing,
                rank=args.rank,
            )
            estimated = (estimate.total - estimate.overhead) / 2**30
            row = {
                "machine": machine,
                "family": args.family,
                "resolution": resolution,
                "fp8_base": fp8,
                "gradient_checkpointing": checkpointing,
                "seconds_per_step": round(seconds, 4) if measured else None,
                "peak_memory_gib": round(allocated, 2),
                "peak_reserved_gib": round(reserved, 2) if reserved is not None else None,
                "forward_tflop": round(flops / 1e12, 4),
                "achieved_tflops": round(achieved, 3) if measured else None,
                "hardware_tflops": round(hardware, 3) if measured else None,
                "peak_tflops": peak,
                "mfu": round(achieved / peak, 4) if peak and measured else None,
                "hfu": round(hardware / peak, 4) if peak and measured else None,
                "steps": args.steps,
                "warmup": args.warmup,
                "rank": args.rank,
                "out_of_memory": not measured,
                "image_tokens": tokens["image_tokens"],
                "estimate_gib": round(estimated, 2),
                "estimate_total_gib": round(estimate.total / 2**30, 2),
                "estimate": estimate.gib(),
            }
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                hfu = f"{row['hfu']:.1%}" if row["hfu"] is not None else "n/a"
                held = f"{reserved:>9.2f}" if reserved is not None else f"{'n/a':>9}"
                print(
                    f"{resolution:>5} {str(fp8):>5} {str(checkpointing):>5} {seconds:>8.4f} "
                    f"{allocated:>9.2f} {estimated:>8.2f} {held} {estimate.total / 2**30:>9.2f} "
                    f"{achieved:>8.3f} {mfu:>6} {hfu:>6}" + ("  (out of memory)" if not measured else ""),
                    flush=True,
                )
            if args.profile_out and measured and not profiled:
                write_profile(
                    args.profile_out, model, params, optimizer, batch, device=device, targets=targets
                )
                profiled = True
        del model, params, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
