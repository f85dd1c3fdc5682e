"""The FLUX.1 LoRA trainer; it runs in its own process on a run directory."""
