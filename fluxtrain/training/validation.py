"""Validation loss: how well the current LoRA predicts held-out images, as one reproducible number.

For each held-out image x0 (its cached latent, unflipped) with its caption's cached text features
c, and each fixed t in VALIDATION_TIMESTEPS, the trainer's own flow-matching loss is taken:

    x_t = (1 - t) x0 + t e,    L_t = mean((f(x_t, t, c) - (e - x0))^2)

and the figure is the mean over timesteps of each timestep's mean over images (every image
weighs the same whatever its bucket). The training loss wobbles mostly because every step draws
its own t and noise e; here both are fixed, so only the weights move the number:
- t = 0.25 / 0.5 / 0.75 / 1.0 (ai-toolkit's set) spans detail (low t) to composition (t = 1,
  pure noise, where the velocity e - x0 asks for the image from the caption alone). t = 0 is left
  out: there the input is x0 itself and the target's noise part cannot be known, so the loss is
  about var(e) = 1 whatever the model and says nothing.
- e is drawn once per image from a generator seeded by (seed, the image's sha256) and kept, so
  the same held-out set sees the same noise at every validation, in every process and on resume.
Forward passes run one (image, t) at a time under `torch.no_grad()`, in eval mode, with the
training step's autocast and compute dtype and no encoder (the caches hold every input), so the
same weights give the same float to the last bit on the same machine. The base model's figure
(step 0) is taken with the adapter disabled: peft's layers then return the frozen layer's output
alone, whatever the LoRA's weights are.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from fluxtrain.training import flow
from fluxtrain.training.cache import FeatureCache, LatentKey, load_references
from fluxtrain.training.data import TrainingData
from fluxtrain.training.families.family import Family, Reference, family_for

VALIDATION_TIMESTEPS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class ValidationResult:
    loss: float
    losses: dict[str, float]  # timestep as text ("0.25") -> mean loss over the images
    images: int


@dataclass(frozen=True)
class _HeldOutImage:
    latent: torch.Tensor  # (1, C, H, W)
    noise: torch.Tensor  # (1, C, H, W), drawn once
    text: dict[str, torch.Tensor]  # the caption's features, batched (1, ...), exactly as cached
    reference: Reference | None  # the edit pair's reference latents (1, C, h, w); None without edit pairs


def noise_generator(seed: int, image_sha256: str) -> torch.Generator:
    """The CPU generator of one held-out image's fixed noise."""
    digest = hashlib.sha256(f"{seed}:validation:{image_sha256}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class ValidationLoss:
    """The held-out images' fixed inputs, read from the caches once, and the loss of a model on them."""

    def __init__(
        self, held_out: TrainingData, cache: FeatureCache, *, seed: int, family: Family | None = None
    ) -> None:
        self.family = family if family is not None else family_for("flux1")
        self.images: list[_HeldOutImage] = []
        for index, image in enumerate(held_out.images):
            latent = cache.load_latent(LatentKey(image.sha256, image.bucket, False))[None]
            reference = load_references(cache, held_out, [index])
            text = {name: value[None] for name, value in cache.load_text_features(image.captions[0]).items()}
            noise = torch.randn(latent.shape, generator=noise_generator(seed, image.sha256))
            self.images.append(_HeldOutImage(latent, noise, text, reference))

    @torch.no_grad()
    def measure(
        self,
        transformer: torch.nn.Module,
        *,
        base: bool,
        guidance: float | None,
        dtype: torch.dtype,
        autocast: Callable[[], AbstractContextManager[None]],
    ) -> ValidationResult:
        """The loss of `transformer` (of its base model alone with `base`) on every held-out image."""
        device = next(transformer.parameters()).device
        training = transformer.training
        transformer.eval()
        if base:
            transformer.disable_adapters()
        try:
            losses = {
                str(t): self._mean_loss(transformer, t, guidance, dtype, autocast, device)
                for t in VALIDATION_TIMESTEPS
            }
        finally:
            if base:
                transformer.enable_adapters()
            transformer.train(training)
        return ValidationResult(
            loss=statistics.fmean(losses.values()), losses=losses, images=len(self.images)
        )

    def _mean_loss(
        self,
        transformer: torch.nn.Module,
        t_value: float,
        guidance: float | None,
        dtype: torch.dtype,
        autocast: Callable[[], AbstractContextManager[None]],
        device: torch.device,
    ) -> float:
        per_image = []
        for image in self.images:
            x0, noise = image.latent.to(device), image.noise.to(device)
            t = torch.full((1,), t_value, device=device)
            with autocast():
                prediction = self.family.predict_velocity(
                    transformer,
                    flow.noisy_latents(x0, noise, t),
                    t,
                    image.text,
                    guidance=guidance,
                    dtype=dtype,
                    reference=image.reference,
                )
            per_image.append(float(flow.flow_loss(prediction, self.family.pack(x0), self.family.pack(noise))))
        return statistics.fmean(per_image)
