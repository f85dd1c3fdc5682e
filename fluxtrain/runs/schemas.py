"""Request and response models of the run endpoints.

`TrainRequest` is built from the trainer's `TrainConfig`, so the trainer's fields, defaults and
bounds stay defined once; only the resolved paths the service fills in are left out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from fluxtrain.datasets.lint import LintFinding
from fluxtrain.names import SafeName
from fluxtrain.runs.table import as_utc
from fluxtrain.training.config import TrainConfig

RunStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
SERVICE_FILLED = frozenset(
    {"dataset_config", "models_root", "cache_dir", "validation_dataset_config", "memory_preset_chosen"}
)
MAX_WEBHOOK_LENGTH = 2000
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
"""A timestamp given out in UTC with an explicit offset (ISO 8601, `Z`)."""


class _RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: SafeName | None = Field(
        None, description="Dataset whose `datasets/<name>.toml` is used; defaults to output_name."
    )
    validation_dataset: SafeName | None = Field(
        None,
        description="Dataset whose `datasets/<name>.toml` holds the held-out validation images "
        "(instead of validation_split); never trained on.",
    )
    gpus: int = Field(1, ge=1, le=64, description="GPUs the run needs (ignored on a CPU-only host).")
    webhook: str | None = Field(
        None,
        max_length=MAX_WEBHOOK_LENGTH,
        description="http(s) URL that gets a POST with the run's status when it starts and ends.",
    )


TrainRequest: type[BaseModel] = create_model(
    "TrainRequest",
    __base__=_RunOptions,
    __doc__="The seed's TrainRequest fields plus every trainer option; all but output_name optional.",
    **{
        name: (field.annotation, field)
        for name, field in TrainConfig.model_fields.items()
        if name not in SERVICE_FILLED
    },
)


class TrainStarted(BaseModel):
    message: str = "Training started"
    run_id: str


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: int = 0
    total_epochs: int | None = None
    loss: float | None = None
    it_per_s: float | None = None
    eta_seconds: float | None = None
    validation_loss: float | None = Field(
        None, description="The latest validation loss of the LoRA being trained (not the base model's)."
    )


class OutputFile(BaseModel):
    name: str
    path: str
    epoch: int | None = None
    url: str | None = None


class RunStatusOut(BaseModel):
    run_id: str
    status: RunStatus
    logs: list[str]
    progress: Progress
    outputs: list[OutputFile]
    error: str | None = None
    waiting: str | None = Field(
        None, description="Why a queued run has not started yet, while its launch is being retried."
    )
    warnings: list[LintFinding] = Field(
        default_factory=list, description="What the dataset lint warned of when the run was created."
    )
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    best_checkpoint: str | None = Field(
        None, description="File name of the LoRA file with the lowest validation loss, once the run finished."
    )


class RunList(BaseModel):
    runs: list[RunStatusOut]


class LogLines(BaseModel):
    run_id: str
    lines: list[str]
    next_offset: int = Field(description="Byte offset to ask for next, to follow the log.")


class Artifact(BaseModel):
    name: str
    kind: Literal["lora", "sample", "contact_sheet"]
    size: int
    url: str | None = None


class ArtifactList(BaseModel):
    run_id: str
    files: list[Artifact]


def request_fields(request: BaseModel) -> dict[str, Any]:
    """The trainer's part of a request, ready for `TrainConfig`."""
    return request.model_dump(exclude=set(_RunOptions.model_fields), exclude_unset=False)
