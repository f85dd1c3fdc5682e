"""Model families: FLUX.1 (and Kontext, a FLUX.1 dev file used for edits) and FLUX.2 [dev] / [klein].

`detect.py` tells a transformer's family from its keys and shapes (safetensors header or config.json),
never from its file name; it imports no model library, so the service can use it.
"""
