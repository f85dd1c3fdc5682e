"""The web page: plain HTML, CSS and JavaScript modules under `static/`, served by the service."""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
