import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from fluxtrain.captioning.request import CaptionRequest
from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.errors import InvalidInputError
from fluxtrain.names import MAX_NAME_LENGTH, SafeName, check_name, safe_join


class Named(BaseModel):
    name: SafeName


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "a/b", "a\\b", "a b", "x" * 101, "é", "a\x00"])
def test_bad_names_are_refused_by_the_function_the_model_and_the_schema(bad: str) -> None:
    with pytest.raises(ValueError):
        check_name(bad)
    with pytest.raises(ValidationError):
        Named(name=bad)
    schema = Named.model_json_schema()["properties"]["name"]
    documented = re.fullmatch(schema["pattern"], bad) and len(bad) <= schema["maxLength"]
    assert not documented


@pytest.mark.parametrize("good", ["a", "my_dataset-1.v2", "x" * MAX_NAME_LENGTH, "1"])
def test_good_names_pass_everywhere(good: str) -> None:
    assert check_name(good) == good
    assert Named(name=good).name == good
    assert re.fullmatch(Named.model_json_schema()["properties"]["name"]["pattern"], good)


def test_safe_join_stays_inside_its_root(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "ok") == (tmp_path / "ok").resolve()
    with pytest.raises(InvalidInputError):
        safe_join(tmp_path, "..")


@pytest.mark.parametrize("value", ["", "   ", "two\nlines", "tab\tword", "x" * 201, "del\x7f"])
def test_captioning_and_the_dataset_config_refuse_the_same_trigger_words(value: str) -> None:
    with pytest.raises(ValidationError, match="trigger_word"):
        CaptionRequest(output_name="cats", trigger_word=value)
    with pytest.raises(ValidationError, match="trigger_word"):
        DatasetConfig(output_name="cats", trigger_word=value)


def test_a_trigger_word_is_stripped_alike() -> None:
    assert CaptionRequest(output_name="c", trigger_word=" zqx ").trigger_word == "zqx"
    assert DatasetConfig(output_name="c", trigger_word=" zqx ").trigger_word == "zqx"
