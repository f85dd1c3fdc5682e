"""The kohya-style dataset TOML: its pydantic model and file form."""
