"""Names that arrive in requests, the paths they may map to, and the trigger word.

A name is one path segment of letters, digits, '-', '_' and '.', without a leading dot, at most
100 characters: it can never climb out of, or hide inside, the folder it is joined to. A trigger
word is one line of text that captioning writes first in every caption and the dataset config
ties to every image: the same rule for both. A value sent in an HTTP header (the API key, an
idempotency key) is printable ASCII.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from fluxtrain.errors import InvalidInputError

MAX_NAME_LENGTH = 100
MAX_TRIGGER_WORD_LENGTH = 200
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


def check_trigger_word(value: str) -> str:
    """The trigger word stripped of surrounding blanks, else ValueError saying why not."""
    value = value.strip()
    if not value:
        raise ValueError("trigger_word must not be empty")
    if len(value) > MAX_TRIGGER_WORD_LENGTH:
        raise ValueError(f"trigger_word must be at most {MAX_TRIGGER_WORD_LENGTH} characters")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise ValueError("trigger_word must not contain control characters such as line breaks")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("trigger_word must be valid Unicode text") from exc
    return value


TriggerWord = Annotated[str, AfterValidator(check_trigger_word)]


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


def header_safe(value: str) -> bool:
    """Whether `value` can be sent as an HTTP header value as it is: printable ASCII only."""
    return value.isascii() and value.isprintable()
