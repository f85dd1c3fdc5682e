"""Command options made from the API's own pydantic request models, and the commands' exit codes.

Every field becomes `--field-name` (defaulting to None, so what is not given keeps the model's
default), and the collected values are validated by the model itself, so defaults and bounds
live once. Every command exits 2 on bad input (a value the command or the service refuses) and
1 when the operation failed (a missing dataset, an unreachable service, a failed image).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError
from rich.console import Console
from rich.markup import escape

from fluxtrain.errors import FluxtrainError, InvalidInputError, TooLargeError
from fluxtrain.settings import Settings, get_settings, variable_name

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_CODES_HELP = "Exit status: 0 on success, 2 on bad input, 1 when the operation failed."
BAD_INPUT_ERRORS = (InvalidInputError, TooLargeError)

Model = TypeVar("Model", bound=BaseModel)


def _option_type(annotation: Any) -> Any:
    """The plain type typer parses a field's value as; pydantic does the rest of the checking."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _option_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _option_type(kinds[0]) if len(kinds) == 1 else str
    if origin is list:
        return list[str]
    if annotation in (bool, int, float):
        return annotation
    return str


def _help(field: FieldInfo) -> str | None:
    default = field.get_default(call_default_factory=True)
    if field.is_required():
        shown = escape(" [required]")
    else:
        shown = "" if default is None or default == [] else escape(f" [default: {default}]")
    return ((field.description or "") + shown).strip() or None


def option_name(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def model_parameters(
    model: type[BaseModel],
    *,
    skip: frozenset[str] = frozenset(),
    names: dict[str, tuple[str, ...]] | None = None,
) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of `model`, each defaulting to None."""
    names = names or {}
    parameters = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kind = _option_type(field.annotation)
        declared = names.get(name, (option_name(name),))
        if kind is bool:
            flag = declared[0].removeprefix("--")
            declared = (f"--{flag}/--no-{flag}", *declared[1:])
        option = typer.Option(None, *declared, help=_help(field), show_default=False)
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)
        )
    return parameters


def with_model_options(
    model: type[BaseModel],
    *,
    skip: frozenset[str] = frozenset(),
    names: dict[str, tuple[str, ...]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command `fn(..., fields: dict)` an option for every field of `model`.

    `fields` holds the options that were given, keyed by field name; the command's own
    parameters come first.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "fields"]
        generated = model_parameters(model, skip=skip | {p.name for p in own}, names=names)
        field_names = {p.name for p in generated}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            fields = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names}
            given = {k: v for k, v in fields.items() if v is not None and v != []}
            return command(**kwargs, fields=given)

        wrapper.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}
        del wrapper.__wrapped__
        return wrapper

    return decorate


def build_request(
    model: type[Model], values: dict[str, Any], *, labels: dict[str, str] | None = None
) -> Model:
    """Validate `values` with the request model; each problem is printed by its option, exit 2."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        console = Console(stderr=True)
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            label = (labels or {}).get(field) or (option_name(field) if field else "options")
            reason = error["msg"].removeprefix("Value error, ")
            console.print(f"[red]invalid {escape(label)}:[/red] {escape(reason)}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc


def load_settings() -> Settings:
    """The process's settings; a variable that does not validate is named, one line each, exit 2."""
    try:
        return get_settings()
    except ValidationError as exc:
        console = Console(stderr=True)
        for error in exc.errors():
            name = variable_name(str(error["loc"][0])) if error["loc"] else "settings"
            reason = error["msg"].removeprefix("Value error, ")
            console.print(f"[red]invalid {name}:[/red] {escape(reason)}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except SettingsError as exc:
        Console(stderr=True).print(f"[red]invalid settings:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc


def fail(exc: FluxtrainError) -> NoReturn:
    """Print a library error and exit: 2 when it refused an input, 1 when the operation failed."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(exc.message)}", highlight=False)
    raise typer.Exit(EXIT_BAD_INPUT if isinstance(exc, BAD_INPUT_ERRORS) else EXIT_FAILED) from exc


def documented(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the exit codes to a command's --help."""
    command.__doc__ = f"{(command.__doc__ or '').rstrip()}\n\n{EXIT_CODES_HELP}"
    return command
