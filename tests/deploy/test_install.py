"""The settings the seed names work after `make install`; the README says which need an extra."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def recipe(target: str) -> str:
    makefile = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert match, f"Makefile has no recipe for {target}"
    return match.group(1)


def test_make_install_brings_the_cloud_extra_and_install_ray_the_ray_extra() -> None:
    assert "pip install -q -e '.[cloud]'" in recipe("$(VENV)/.installed")
    assert re.search(r"pip install -q -e '\.\[[a-z,]*\bray\b[a-z,]*\]'", recipe("$(VENV)/.installed-ray"))
    assert re.search(r"^install-ray: \$\(VENV\)/\.installed-ray$", (REPO / "Makefile").read_text(), re.M)


def test_readme_names_real_extras_for_the_settings_that_need_them() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|(.*)$", readme, re.M)
    needed = {name: set(re.findall(r"extra `([a-z]+)`", row)) for name, row in rows}
    assert needed["CLOUD_STORAGE_TYPE"] == {"cloud"} and needed["FLUXTRAIN_STORAGE_URL"] == {"cloud"}
    assert needed["FLUXTRAIN_EXECUTOR"] == {"ray"} and needed["FLUXTRAIN_RAY_ADDRESS"] == {"ray"}
    assert set().union(*needed.values()) <= set(extras)
