"""Model families: FLUX.1 (and Kontext, a FLUX.1 dev file used for edits) and FLUX.2 [dev] / [klein].

`detect.py` tells a transformer's family from its keys and shapes (safetensors header or config.json),
never from its file name, and imports no model library, so the service can use it; `flux2.py` computes
FLUX.2's text features, latents and position ids as the diffusers pipelines do.
"""
