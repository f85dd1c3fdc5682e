import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

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
