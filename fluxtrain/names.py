"""Names that arrive in requests, and the paths they may map to.

A name is one path segment of letters, digits, '-', '_' and '.', without a leading dot, at most
100 characters: it can never climb out of, or hide inside, the folder it is joined to.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from fluxtrain.errors import InvalidInputError

MAX_NAME_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_name(name: str, *, what: str = "name") -> str:
    """Return `name` unchanged when it is a safe single path segment, else raise ValueError."""
    if not name:
        raise ValueError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_NAME_LENGTH} characters")
    if name.startswith("."):
        raise ValueError(f"{what} must not start with a dot")
    if "/" in name or "\\" in name:
        raise ValueError(f"{what} must not contain a slash or backslash")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what} may only contain letters, digits, '-', '_' and '.'")
    return name


# The schema documents the rule for clients; validation stays in check_name for its clearer messages.
SafeName = Annotated[
    str,
    AfterValidator(check_name),
    Field(
        json_schema_extra={
            "pattern": r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$",
            "minLength": 1,
            "maxLength": MAX_NAME_LENGTH,
        }
    ),
]


def safe_join(root: Path, name: str, *, what: str = "name") -> Path:
    """Join a request name to `root`, refusing anything that would leave it."""
    try:
        check_name(name, what=what)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise InvalidInputError(f"{what} escapes its folder")
    return path
