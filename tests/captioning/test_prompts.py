from __future__ import annotations

import pytest

from fluxtrain.captioning.prompts import (
    DEFAULT_PROMPT,
    clean_caption,
    model_prompt,
    training_caption,
)
from fluxtrain.errors import InvalidInputError


def test_default_prompt_maps_to_the_most_detailed_task() -> None:
    assert model_prompt(DEFAULT_PROMPT) == "<MORE_DETAILED_CAPTION>"
    assert model_prompt(f"  {DEFAULT_PROMPT} ") == "<MORE_DETAILED_CAPTION>"
    assert model_prompt("") == "<MORE_DETAILED_CAPTION>"


@pytest.mark.parametrize("token", ["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"])
def test_a_caption_task_token_is_used_as_given(token: str) -> None:
    assert model_prompt(token) == token


def test_other_text_is_the_prompt() -> None:
    assert (
        model_prompt("Describe the main subject of this image") == "Describe the main subject of this image"
    )


def test_task_field_wins_over_prompt() -> None:
    assert model_prompt("Describe the main subject", "<CAPTION>") == "<CAPTION>"


@pytest.mark.parametrize("prompt", ["<OD>", "<CAPTION> of a cat", "find <OCR> text"])
def test_other_task_tokens_are_refused(prompt: str) -> None:
    with pytest.raises(InvalidInputError, match="task token"):
        model_prompt(prompt)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The image shows a stop sign on a street.", "a stop sign on a street."),
        ("In this image, we can see a cat on a sofa.", "a cat on a sofa."),
        ("In this image there are two dogs.", "two dogs."),
        ("The image is a close-up of a red apple.", "a close-up of a red apple."),
        ("This image depicts a lake at dusk.", "a lake at dusk."),
        ("This is an image of a car.", "a car."),
        ("The picture features, a bridge.", "a bridge."),
        ("A photo of a dog on a beach.", "A photo of a dog on a beach."),
        ("The imagery is colourful.", "The imagery is colourful."),
        ("The image shows", "The image shows"),
    ],
)
def test_stock_openings_are_trimmed(raw: str, expected: str) -> None:
    assert clean_caption(raw) == expected


def test_caption_becomes_one_clean_line() -> None:
    assert clean_caption("  a red\ncar\r\n on a\x11 road\u2028today ") == "a red car on a road today"


def test_trigger_word_comes_first() -> None:
    assert training_caption(" mycat ", "a cat on a sofa") == "mycat, a cat on a sofa"
