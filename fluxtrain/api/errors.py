"""One place that turns domain errors into HTTP answers."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from fluxtrain.errors import (
    ConflictError,
    FluxtrainError,
    InvalidInputError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
)

STATUS_BY_ERROR: dict[type[FluxtrainError], int] = {
    NotFoundError: 404,
    ConflictError: 409,
    TooLargeError: 413,
    InvalidInputError: 422,
    UnavailableError: 503,
}


def status_for(exc: FluxtrainError) -> int:
    for kind, code in STATUS_BY_ERROR.items():
        if isinstance(exc, kind):
            return code
    return 400


async def _handle(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FluxtrainError)
    return JSONResponse(status_code=status_for(exc), content={"detail": exc.message})


class AsciiJSONResponse(JSONResponse):
    """Escapes non-ASCII: a 422 echoes the input, which may hold lone surrogates UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


async def _handle_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return AsciiJSONResponse(status_code=422, content={"detail": jsonable_encoder(exc.errors())})


async def _handle_database_down(_: Request, exc: Exception) -> JSONResponse:
    """The run database stopped answering (a PostgreSQL restart, a network cut): retry later, not a 500."""
    from fluxtrain.runs.db import unreachable_reason

    detail = f"the run database is unreachable right now, try again shortly: {unreachable_reason(exc)}"
    return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": "5"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FluxtrainError, _handle)
    app.add_exception_handler(OperationalError, _handle_database_down)
    app.add_exception_handler(InterfaceError, _handle_database_down)
    app.add_exception_handler(RequestValidationError, _handle_validation)
