"""The kohya-style dataset TOML: its pydantic model, its file form and the service that writes it."""
