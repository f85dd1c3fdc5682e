"""One place that turns domain errors into HTTP answers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FluxtrainError, _handle)
