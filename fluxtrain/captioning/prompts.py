"""What Florence-2 is asked, and how its answer becomes a training caption.

The seed's free-text prompt is honoured: its default sentence selects Florence-2's most detailed
caption task, a caption task token is used as given, and any other text goes to the model as-is.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal, get_args

from fluxtrain.errors import InvalidInputError

DEFAULT_PROMPT = "Describe this image in detail."
CaptionTask = Literal["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"]
CAPTION_TASKS: tuple[str, ...] = get_args(CaptionTask)
DEFAULT_TASK: CaptionTask = "<MORE_DETAILED_CAPTION>"
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_NUM_BEAMS = 3

_TASK_TOKEN = re.compile(r"<[A-Z_]+>")
_WHITESPACE = re.compile(r"\s+")
_SUBJECT = r"(?:the|this)\s+(?:image|picture|photo(?:graph)?)"
_STOCK_OPENING = re.compile(
    rf"""^(?:
        {_SUBJECT}\s+(?:shows|depicts|features|captures|displays|contains|presents|is\s+of|is)\b
      | in\s+{_SUBJECT}\s*,?(?:\s*(?:we|you|i)\s+can\s+see\b|\s*there\s+(?:is|are)\b)?
      | this\s+is\s+(?:an?\s+)?(?:image|picture|photo(?:graph)?)\s+of\b
    )\s*[,:]?\s*""",
    re.IGNORECASE | re.VERBOSE,
)


def model_prompt(prompt: str, task: CaptionTask | None = None) -> str:
    """The text Florence-2 receives: a task token, or the caller's own question."""
    if task is not None:
        return task
    text = prompt.strip()
    if not text or text == DEFAULT_PROMPT:
        return DEFAULT_TASK
    if text in CAPTION_TASKS:
        return text
    tokens = _TASK_TOKEN.findall(text)
    if tokens:
        raise InvalidInputError(
            f"prompt contains the Florence-2 task token {tokens[0]}; use exactly one of "
            f"{', '.join(CAPTION_TASKS)} on its own, or plain text"
        )
    return text


def clean_caption(text: str) -> str:
    """One line that reads as a description, without Florence-2's 'The image shows' opening."""
    visible = "".join(ch if unicodedata.category(ch) != "Cc" else " " for ch in text)
    line = _WHITESPACE.sub(" ", visible).strip()
    trimmed = _STOCK_OPENING.sub("", line, count=1).strip()
    return trimmed or line


def training_caption(trigger_word: str, caption: str) -> str:
    """The caption file's line: the trigger word first, so the LoRA binds to it."""
    return f"{trigger_word.strip()}, {caption}"
