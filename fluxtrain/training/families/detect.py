"""Which family a transformer belongs to, from its keys and tensor shapes or its diffusers config.

FLUX.1 has `double_blocks.*` (diffusers: `transformer_blocks.*`) and 64 input channels. FLUX.2 has
one modulation per stream (`single_stream_modulation.lin`); its three releases differ in the text
features they take (`txt_in` width: three stacked hidden layers of their text encoder) and in their
block counts, as `FLUX2_VARIANTS` lists them (diffusers' `convert_flux2_to_diffusers.py` configs).
A FLUX.2 file of another size (a test model, a pruned one) is classed by the same features: guidance
embedding -> [dev]; else as many double blocks as 9B has -> [klein] 9B; else [klein] 4B.
Kontext cannot be told from a FLUX.1 dev file: the request names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from fluxtrain.errors import InvalidInputError
from fluxtrain.model_paths import MODEL_FIELDS

ModelFamily = Literal["flux1", "flux1-kontext", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b"]
MODEL_FAMILIES: tuple[str, ...] = get_args(ModelFamily)
FLUX2_MODEL_FIELDS = ("pretrained_model", "text_encoder", "ae")
FLUX1_IN_CHANNELS = 64
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class Flux2Variant:
    """A released FLUX.2 transformer's shape signature and the text encoder it takes."""

    family: ModelFamily
    title: str
    joint_attention_dim: int
    num_layers: int
    num_single_layers: int
    hidden: int
    guidance: bool
    text_encoder: str


FLUX2_VARIANTS = (
    Flux2Variant("flux2-dev", "FLUX.2 [dev]", 15360, 8, 48, 6144, True, "Mistral Small 3.x 24B"),
    Flux2Variant("flux2-klein-4b", "FLUX.2 [klein] 4B", 7680, 5, 20, 3072, False, "Qwen3-4B"),
    Flux2Variant("flux2-klein-9b", "FLUX.2 [klein] 9B", 12288, 8, 24, 4096, False, "Qwen3-8B"),
)


def released_flux2_config(family: ModelFamily) -> dict[str, Any]:
    """Flux2Transformer2DModel kwargs of a released FLUX.2 size (its blocks, widths, guidance
    embedding; the rest diffusers' defaults), for benchmarks at full size with random weights."""
    variant = next(v for v in FLUX2_VARIANTS if v.family == family)
    return {
        "num_layers": variant.num_layers,
        "num_single_layers": variant.num_single_layers,
        "num_attention_heads": variant.hidden // 128,
        "attention_head_dim": 128,
        "joint_attention_dim": variant.joint_attention_dim,
        "guidance_embeds": variant.guidance,
    }


FAMILY_TITLES: dict[str, str] = {
    "flux1": "FLUX.1",
    "flux1-kontext": "FLUX.1 Kontext",
    **{v.family: v.title for v in FLUX2_VARIANTS},
}


@dataclass(frozen=True)
class DetectedTransformer:
    """What a transformer file or folder is: its family, its key layout, and whether it is guided.

    `guidance` is None where a diffusers config does not say; `full_size` tells the released
    shapes from other sizes (tiny test models) for FLUX.2.
    """

    family: ModelFamily
    layout: Literal["bfl", "diffusers"]
    guidance: bool | None
    full_size: bool = True

    @property
    def title(self) -> str:
        """The family as people write it, e.g. 'FLUX.2 [klein] 4B'."""
        return FAMILY_TITLES[self.family]


def strip_prefix(sd: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The entries under the first of `prefixes` that any key carries, without it; else all entries."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def block_count(keys: Any, prefix: str) -> int:
    """How many `prefix.N.` blocks the keys hold (highest N plus one)."""
    found = set()
    for key in keys:
        if key.startswith(f"{prefix}."):
            index = key[len(prefix) + 1 :].split(".", 1)[0]
            if index.isdigit():
                found.add(int(index))
    return max(found) + 1 if found else 0


def classify_flux2(
    *, joint_attention_dim: int, num_layers: int, num_single_layers: int, hidden: int, guidance: bool
) -> tuple[ModelFamily, bool]:
    """The FLUX.2 family of these sizes, and whether they are a release's full size."""
    signature = (joint_attention_dim, num_layers, num_single_layers, hidden, guidance)
    for variant in FLUX2_VARIANTS:
        released = (variant.joint_attention_dim, variant.num_layers, variant.num_single_layers)
        if signature == (*released, variant.hidden, variant.guidance):
            return variant.family, True
    if guidance:
        return "flux2-dev", False
    nine_b = next(v for v in FLUX2_VARIANTS if v.family == "flux2-klein-9b")
    return ("flux2-klein-9b" if num_layers >= nine_b.num_layers else "flux2-klein-4b"), False


def _flux2_from_shapes(
    sd: Mapping[str, Sequence[int]], layout: Literal["bfl", "diffusers"]
) -> DetectedTransformer:
    bfl = layout == "bfl"
    txt, img = ("txt_in.weight", "img_in.weight") if bfl else ("context_embedder.weight", "x_embedder.weight")
    guidance_key = (
        "guidance_in.in_layer.weight" if bfl else "time_guidance_embed.guidance_embedder.linear_1.weight"
    )
    if txt not in sd or img not in sd:
        raise InvalidInputError(f"is a FLUX.2 transformer without {txt if txt not in sd else img}")
    guidance = guidance_key in sd
    family, full = classify_flux2(
        joint_attention_dim=int(sd[txt][1]),
        num_layers=block_count(sd, "double_blocks" if bfl else "transformer_blocks"),
        num_single_layers=block_count(sd, "single_blocks" if bfl else "single_transformer_blocks"),
        hidden=int(sd[img][0]),
        guidance=guidance,
    )
    return DetectedTransformer(family, layout, guidance, full)


def _refuse_flux1_channels(in_channels: int | None) -> None:
    if in_channels is not None and in_channels != FLUX1_IN_CHANNELS:
        raise InvalidInputError(
            f"is a FLUX.1 transformer with {in_channels} input channels (Fill, Depth or Canny take extra "
            f"image channels); only the {FLUX1_IN_CHANNELS}-channel dev, schnell and Kontext files train"
        )


def detect_from_shapes(shapes: Mapping[str, Sequence[int]]) -> DetectedTransformer:
    """The family of a transformer state dict given as {key: shape}; InvalidInputError if none fits.

    BFL keys (optionally under `model.diffusion_model.` / `diffusion_model.`, as ComfyUI saves
    them) and diffusers keys are both recognised.
    """
    sd = strip_prefix(shapes, TRANSFORMER_PREFIXES)
    if "single_stream_modulation.lin.weight" in sd:
        return _flux2_from_shapes(sd, "bfl")
    if "single_stream_modulation.linear.weight" in sd:
        return _flux2_from_shapes(sd, "diffusers")
    if any(k.startswith("double_blocks.") for k in sd):
        _refuse_flux1_channels(int(sd["img_in.weight"][1]) if "img_in.weight" in sd else None)
        return DetectedTransformer("flux1", "bfl", "guidance_in.in_layer.weight" in sd)
    if any(k.startswith("transformer_blocks.") for k in sd):
        _refuse_flux1_channels(int(sd["x_embedder.weight"][1]) if "x_embedder.weight" in sd else None)
        guided = "time_text_embed.guidance_embedder.linear_1.weight" in sd
        return DetectedTransformer("flux1", "diffusers", guided)
    sample = ", ".join(list(sd)[:3]) or "no tensors"
    raise InvalidInputError(
        f"holds no FLUX transformer weights (no double_blocks.* or transformer_blocks.* keys; found {sample})"
    )


def detect_from_config(config: Mapping[str, Any]) -> DetectedTransformer:
    """The family of a diffusers transformer folder from its config.json (class defaults fill gaps)."""
    class_name = config.get("_class_name")
    if class_name == "Flux2Transformer2DModel":
        guidance = bool(config.get("guidance_embeds", True))
        family, full = classify_flux2(
            joint_attention_dim=int(config.get("joint_attention_dim", 15360)),
            num_layers=int(config.get("num_layers", 8)),
            num_single_layers=int(config.get("num_single_layers", 48)),
            hidden=int(config.get("num_attention_heads", 48)) * int(config.get("attention_head_dim", 128)),
            guidance=guidance,
        )
        return DetectedTransformer(family, "diffusers", guidance, full)
    if isinstance(class_name, str) and class_name.startswith("Flux") and "Transformer" in class_name:
        _refuse_flux1_channels(config.get("in_channels"))
        guidance = config.get("guidance_embeds")
        return DetectedTransformer("flux1", "diffusers", None if guidance is None else bool(guidance))
    raise InvalidInputError(
        f"is not a FLUX transformer: config.json names class {class_name!r}, not FluxTransformer2DModel "
        "or Flux2Transformer2DModel"
    )


def check_requested_family(
    requested: ModelFamily | None, detected: DetectedTransformer, shown: str
) -> ModelFamily:
    """The run's family: the request's if the file is of it (a 422 naming both if not), else the file's."""
    if requested is None or requested == detected.family:
        return detected.family
    if requested == "flux1-kontext" and detected.family == "flux1":
        if detected.guidance is False:
            raise InvalidInputError(
                f"model_family: 'flux1-kontext' needs a FLUX.1 dev-architecture (guidance-distilled) file, "
                f"but pretrained_model '{shown}' is a FLUX.1 transformer without guidance (schnell)"
            )
        return requested
    raise InvalidInputError(
        f"model_family: '{requested}' ({FAMILY_TITLES[requested]}) was asked for, but pretrained_model "
        f"'{shown}' is a {detected.title} transformer ('{detected.family}')"
    )


def model_fields(family: ModelFamily) -> tuple[str, ...]:
    """The request's model path fields a run of `family` loads."""
    return FLUX2_MODEL_FIELDS if family.startswith("flux2") else MODEL_FIELDS
