"""Domain errors raised by every layer; the API maps each kind to one HTTP status."""


class FluxtrainError(Exception):
    """Base of every error that carries a message meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(FluxtrainError):
    """A named thing (dataset, image, run, model file) does not exist."""


class InvalidInputError(FluxtrainError):
    """The request is well-formed but its values cannot be used."""


class ConflictError(FluxtrainError):
    """The request clashes with the current state (a run already finished, say)."""


class TooLargeError(FluxtrainError):
    """A body, upload or archive exceeds its configured bound."""


class UnavailableError(FluxtrainError):
    """A dependency (a model, a backend) is not available right now."""
