"""The load check every LoRA file passes before a run may succeed.

The file is read back from disk with our own reader of the layout it was written in (diffusers
`transformer.<module>.lora_A/B.weight` with the scale folded into B, or kohya
`lora_unet_<BFL module>.lora_down/up.weight` + `.alpha`, fused groups stacked; see `export.py`)
and judged against the transformer that was trained, in memory (no second copy is loaded):

- every tensor belongs to a pair that maps onto LoRA-targeted Linear layers of that model, with
  A (down) rank x in_features, B (up) out_features x rank, alpha a positive scalar, in the export
  dtype, all finite; every targeted layer is covered exactly once;
- the metadata holds every key `export.lora_metadata` wrote for this run, with the same value;
- applying it does what the trained adapter does: on a fixed input, each pair's update
  `scale * B @ A @ x` from the file matches the in-memory adapter's within the export dtype's
  rounding. Where the adapter has trained away from zero the file must change the output
  (a file whose B is all zero then fails); where it has not (a step-0 file, or a first step whose
  warm-up learning rate is 0: peft starts B at zero) the file must be the identity too, which is
  judged the same way. The first targeted Linear is also run whole (base weight, then base +
  the file's update) to report how much the file moves a real layer's output.

The cost is one pass over the LoRA's own tensors plus one Linear: seconds for FLUX.1-dev.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fluxtrain.rundir import rejected_lora
from fluxtrain.training.convert import ModuleRule, kohya_lora_name, transformer_module_rules
from fluxtrain.training.lora import ADAPTER_NAME

log = logging.getLogger("fluxtrain.training")

PROBE_ROWS = 4
PROBE_SEED = 0
# Relative error allowed between the file's update and the trained one, by the file's dtype.
UPDATE_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_DIFFUSERS_KEY = re.compile(r"^transformer\.(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet_.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_BFL_KEY = re.compile(r"^diffusion_model\.(.+)\.lora_([AB])\.weight$")


class LoraCheckError(RuntimeError):
    """A LoRA file that does not load onto the model it was trained on; names the file and tensor."""


@dataclass(frozen=True)
class LoraPair:
    """One low-rank update as the file holds it: `scale * up @ down` on `modules` (fused in order)."""

    key: str  # the tensor name prefix in the file
    modules: tuple[str, ...]  # diffusers module names of the transformer
    down: Tensor
    up: Tensor
    scale: float


def _fail(path: Path, tensor: str, problem: str) -> LoraCheckError:
    return LoraCheckError(f"LoRA file {path.name} does not load: {tensor}: {problem}")


def read_diffusers_pairs(path: Path, tensors: Mapping[str, Tensor], modules: Set[str]) -> list[LoraPair]:
    """The pairs of a diffusers-layout file on `modules`; the alpha / rank scale is folded into lora_B."""
    halves: dict[str, dict[str, Tensor]] = {}
    for key in sorted(tensors):
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            raise _fail(path, key, "not a diffusers LoRA tensor name (transformer.<module>.lora_A/B.weight)")
        if match.group(1) not in modules:
            raise _fail(path, key, f"{match.group(1)} is not a LoRA-trained Linear of this model")
        halves.setdefault(match.group(1), {})[match.group(2)] = tensors[key]
    pairs = []
    for module, weights in halves.items():
        for half in ("A", "B"):
            if half not in weights:
                raise _fail(
                    path, f"transformer.{module}.lora_{half}.weight", "missing (its pair is in the file)"
                )
        pairs.append(LoraPair(f"transformer.{module}", (module,), weights["A"], weights["B"], 1.0))
    return pairs


def read_bfl_pairs(
    path: Path, tensors: Mapping[str, Tensor], modules: Set[str], rules: list[ModuleRule]
) -> list[LoraPair]:
    """The pairs of a BFL-layout file (`diffusion_model.<BFL module>.lora_A/B.weight`, scale folded)."""
    modules_by_name = {rule.bfl: rule.diffusers for rule in rules}
    halves: dict[str, dict[str, Tensor]] = {}
    for key in sorted(tensors):
        match = _BFL_KEY.match(key)
        if match is None or match.group(1) not in modules_by_name:
            raise _fail(path, key, "not a BFL LoRA tensor of a transformer module of this model")
        outside = [module for module in modules_by_name[match.group(1)] if module not in modules]
        if outside:
            raise _fail(path, key, f"{outside[0]} is not a LoRA-trained Linear of this model")
        halves.setdefault(match.group(1), {})[match.group(2)] = tensors[key]
    pairs = []
    for name, weights in halves.items():
        for half in ("A", "B"):
            if half not in weights:
                raise _fail(
                    path, f"diffusion_model.{name}.lora_{half}.weight", "missing (its pair is in the file)"
                )
        pairs.append(
            LoraPair(f"diffusion_model.{name}", modules_by_name[name], weights["A"], weights["B"], 1.0)
        )
    return pairs


def read_kohya_pairs(
    path: Path,
    tensors: Mapping[str, Tensor],
    modules: Set[str],
    config: Mapping[str, object],
    rules: list[ModuleRule] | None = None,
) -> list[LoraPair]:
    """The pairs of a kohya-layout file on `modules` (BFL names, fused groups as one pair, alpha / rank).

    `config` is the transformer's, for its block counts; `rules` the family's (FLUX.1's by default)."""
    if rules is None:
        rules = transformer_module_rules(
            num_double=int(config["num_layers"]),  # type: ignore[call-overload]
            num_single=int(config["num_single_layers"]),  # type: ignore[call-overload]
            guidance=bool(config["guidance_embeds"]),
        )
    modules_by_name = {kohya_lora_name(rule.bfl): rule.diffusers for rule in rules}
    parts: dict[str, dict[str, Tensor]] = {}
    for key in sorted(tensors):
        match = _KOHYA_KEY.match(key)
        if match is None or match.group(1) not in modules_by_name:
            raise _fail(path, key, "not a kohya LoRA tensor of a FLUX.1 transformer module of this model")
        outside = [module for module in modules_by_name[match.group(1)] if module not in modules]
        if outside:
            raise _fail(path, key, f"{outside[0]} is not a LoRA-trained Linear of this model")
        parts.setdefault(match.group(1), {})[match.group(2)] = tensors[key]
    pairs = []
    for name, found in parts.items():
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            if part not in found:
                raise _fail(path, f"{name}.{part}", "missing (the rest of its group is in the file)")
        alpha, down = found["alpha"], found["lora_down.weight"]
        if alpha.ndim != 0:
            raise _fail(path, f"{name}.alpha", f"must be one number, holds shape {list(alpha.shape)}")
        if not torch.isfinite(alpha) or float(alpha) <= 0:
            raise _fail(path, f"{name}.alpha", f"must be a positive number, is {float(alpha)}")
        scale = float(alpha) / down.shape[0] if down.ndim == 2 and down.shape[0] else 0.0
        pairs.append(LoraPair(name, modules_by_name[name], down, found["lora_up.weight"], scale))
    return pairs


def lora_layers(transformer: torch.nn.Module) -> dict[str, LoraLayer]:
    """The transformer's LoRA-trained Linear layers (peft's wrappers) by module name."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
    }


def _check_shapes(path: Path, pair: LoraPair, layers: dict[str, LoraLayer], *, rank: int) -> None:
    bases = [layers[module].get_base_layer() for module in pair.modules]
    in_features = {base.in_features for base in bases}
    if len(in_features) != 1:
        raise _fail(path, pair.key, f"fuses modules of different input sizes {sorted(in_features)}")
    group_rank = rank * len(pair.modules)
    out_features = sum(base.out_features for base in bases)
    down_name, up_name = (
        (f"{pair.key}.lora_A.weight", f"{pair.key}.lora_B.weight")
        if pair.key.startswith(("transformer.", "diffusion_model."))
        else (f"{pair.key}.lora_down.weight", f"{pair.key}.lora_up.weight")
    )
    for name, tensor, expected in (
        (down_name, pair.down, (group_rank, in_features.pop())),
        (up_name, pair.up, (out_features, group_rank)),
    ):
        if tuple(tensor.shape) != expected:
            raise _fail(path, name, f"shape {list(tensor.shape)}, the model needs {list(expected)}")
        if not bool(torch.isfinite(tensor).all()):
            raise _fail(path, name, "holds NaN or infinite values")


def _probe(in_features: int) -> Tensor:
    generator = torch.Generator("cpu").manual_seed(PROBE_SEED + in_features)
    return torch.randn(PROBE_ROWS, in_features, generator=generator)


def _trained_update(layer: LoraLayer, x: Tensor) -> Tensor:
    a = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu()
    b = layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu()
    return (x @ a.T) @ b.T * float(layer.scaling[ADAPTER_NAME])


def _check_update(path: Path, pair: LoraPair, layers: dict[str, LoraLayer], *, rtol: float) -> None:
    x = _probe(pair.down.shape[1])
    from_file = (x @ pair.down.T) @ pair.up.T * pair.scale
    trained = torch.cat([_trained_update(layers[module], x) for module in pair.modules], dim=1)
    if not bool(torch.isfinite(from_file).all()):
        raise _fail(path, pair.key, "its update is not finite on a fixed input")
    size = float(trained.norm())
    error = float((from_file - trained).norm())
    if error <= rtol * size:
        return
    if float(from_file.norm()) == 0:
        problem = "changes nothing (B is all zero) where the trained adapter changes the output"
    elif size == 0:
        problem = "changes the output where the trained adapter is still the identity"
    else:
        problem = f"its update differs from the trained adapter's by {error / size:.3g} (relative)"
    raise _fail(path, pair.key, problem)


def _layer_change(pair: LoraPair, layers: dict[str, LoraLayer]) -> tuple[str, float]:
    """The first module's whole output on a fixed input: base Linear, then base + the file's update."""
    module = pair.modules[0]
    base = layers[module].get_base_layer()
    rows = base.out_features
    x = _probe(base.in_features)
    weight = base.weight.detach().cpu().float()
    bias = None if base.bias is None else base.bias.detach().cpu().float()
    before = torch.nn.functional.linear(x, weight, bias)
    after = before + ((x @ pair.down.T) @ pair.up[:rows].T) * pair.scale
    return module, float((after - before).abs().max())


def check_lora_file(
    path: Path,
    transformer: torch.nn.Module,
    *,
    save_format: str,
    rank: int,
    dtype: torch.dtype,
    metadata: Mapping[str, str],
    rules: list[ModuleRule] | None = None,
) -> None:
    """Read `path` back and check it against the trained `transformer`; raises LoraCheckError.

    `rules` are the model family's BFL <-> diffusers modules (FLUX.1's by default), for kohya and bfl files.

    A file that fails is moved to a hidden name (`rundir.rejected_lora`): kept for a look, but
    never listed, uploaded or taken for the run's final LoRA.
    """
    try:
        _check(
            path, transformer, save_format=save_format, rank=rank, dtype=dtype, metadata=metadata, rules=rules
        )
    except LoraCheckError as exc:
        kept = rejected_lora(path)
        path.replace(kept)
        raise LoraCheckError(f"{exc}; kept as {kept.name}") from None


def _check(
    path: Path,
    transformer: torch.nn.Module,
    *,
    save_format: str,
    rank: int,
    dtype: torch.dtype,
    metadata: Mapping[str, str],
    rules: list[ModuleRule] | None = None,
) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            found_metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (OSError, SafetensorError) as exc:
        raise LoraCheckError(f"LoRA file {path.name} does not load: {exc}") from exc
    for key, value in metadata.items():
        if key not in found_metadata:
            raise _fail(path, f"metadata {key}", "missing")
        if found_metadata[key] != value:
            raise _fail(path, f"metadata {key}", f"is {found_metadata[key]!r}, the run wrote {value!r}")
    for key in sorted(tensors):
        if tensors[key].dtype != dtype:
            raise _fail(path, key, f"dtype {tensors[key].dtype}, the run exports {dtype}")
    tensors = {key: tensor.float() for key, tensor in tensors.items()}  # once: the checks run in float32
    layers = lora_layers(transformer)
    if save_format == "kohya":
        pairs = read_kohya_pairs(path, tensors, layers.keys(), transformer.config, rules)  # type: ignore[arg-type]
    elif save_format == "bfl":
        if rules is None:
            rules = transformer_module_rules(
                num_double=int(transformer.config["num_layers"]),  # type: ignore[index]
                num_single=int(transformer.config["num_single_layers"]),  # type: ignore[index]
                guidance=bool(transformer.config["guidance_embeds"]),  # type: ignore[index]
            )
        pairs = read_bfl_pairs(path, tensors, layers.keys(), rules)
    else:
        pairs = read_diffusers_pairs(path, tensors, layers.keys())
    covered: set[str] = set()
    for pair in pairs:
        for module in pair.modules:
            if module in covered:
                raise _fail(path, pair.key, f"{module} has a second LoRA in the file")
            covered.add(module)
        _check_shapes(path, pair, layers, rank=rank)
    missing = sorted(set(layers) - covered)
    if missing:
        raise _fail(path, missing[0], f"trained but absent from the file ({len(missing)} modules missing)")
    rtol = UPDATE_RTOL.get(dtype, UPDATE_RTOL[torch.bfloat16])
    for pair in pairs:
        _check_update(path, pair, layers, rtol=rtol)
    module, change = _layer_change(pairs[0], layers)
    log.info(
        "LoRA check: %s loads (%d pairs); it moves %s's output by up to %.3g",
        path.name,
        len(pairs),
        module,
        change,
    )
