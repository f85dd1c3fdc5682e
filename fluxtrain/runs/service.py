"""Run records: create (checked in full before anything exists), read, list and cancel."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ValidationError
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError

from fluxtrain.dataset_config.service import dataset_config_path
from fluxtrain.datasets.lint_service import lint_run_dataset
from fluxtrain.errors import ConflictError, InvalidInputError, NotFoundError
from fluxtrain.fsutil import atomic_write_json
from fluxtrain.model_paths import resolve_model_path
from fluxtrain.rundir import RunDir
from fluxtrain.runs.db import Database
from fluxtrain.runs.local_backend import visible_gpus
from fluxtrain.runs.schemas import request_fields
from fluxtrain.runs.status import run_dir
from fluxtrain.runs.table import RUN_STATUSES, TERMINAL_STATUSES, Run, utcnow
from fluxtrain.runs.webhooks import check_webhook
from fluxtrain.settings import Settings
from fluxtrain.training import memory
from fluxtrain.training.config import TrainConfig, check_dataset_for_training, refuse_cuda_only_options
from fluxtrain.training.data import count_images, held_out_count, run_images
from fluxtrain.training.edit_pairs import MAX_REFERENCES, check_run_family
from fluxtrain.training.families.detect import model_fields
from fluxtrain.training.families.mistral_files import check_mistral_text_encoder
from fluxtrain.training.model_checks import check_model

MAX_LIST_LIMIT = 1000


@lru_cache
def _local_gpus(setting: str) -> tuple[str, ...]:
    return tuple(visible_gpus(setting))


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()
    )


def resolve_config(*, settings: Settings, request: BaseModel) -> TrainConfig:
    """Turn a request into the run's config, or raise the 404/422 that explains why not."""
    fields = request_fields(request)
    dataset = getattr(request, "dataset", None) or fields["output_name"]
    toml = dataset_config_path(settings, dataset)
    if not toml.is_file():
        raise NotFoundError(f"dataset config '{toml.name}' not found in {settings.datasets_dir}")
    check_dataset_for_training(toml)
    validation_toml = _validation_dataset(settings, getattr(request, "validation_dataset", None))
    transformer = resolve_model_path(settings.models_root, "pretrained_model", fields["pretrained_model"])
    check_model("pretrained_model", transformer, fields["pretrained_model"])
    family = check_run_family(
        toml, transformer, fields["pretrained_model"], requested=fields.get("model_family")
    )
    for field in model_fields(family):
        check_model(field, resolve_model_path(settings.models_root, field, fields[field]), fields[field])
    if family == "flux2-dev":
        text_encoder = resolve_model_path(settings.models_root, "text_encoder", fields["text_encoder"])
        check_mistral_text_encoder(text_encoder, fields["text_encoder"])
    webhook = getattr(request, "webhook", None)
    if webhook:
        check_webhook(webhook, settings)
    try:
        config = TrainConfig.model_validate(
            {
                **fields,
                "dataset_config": str(toml.resolve()),
                "models_root": str(settings.models_root),
                "cache_dir": str(settings.cache_dir),
                "validation_dataset_config": str(validation_toml.resolve()) if validation_toml else None,
            }
        )
    except ValidationError as exc:
        raise InvalidInputError(_validation_message(exc)) from exc
    if family in MAX_REFERENCES:
        config = config.model_copy(update={"model_family": family})  # the trainer trains the pairs as linted
    if config.validation_split is not None:
        held_out_count(config.validation_split, count_images(toml))
    if settings.executor == "local":
        _check_local_host(settings, config, gpus=getattr(request, "gpus", 1))
        config = _fit_local_memory(settings, config)
    return config


def _validation_dataset(settings: Settings, name: str | None) -> Path | None:
    """The TOML of the request's `validation_dataset` (None without one), checked as the training one."""
    if name is None:
        return None
    toml = dataset_config_path(settings, name)
    if not toml.is_file():
        raise NotFoundError(f"validation_dataset config '{toml.name}' not found in {settings.datasets_dir}")
    check_dataset_for_training(toml)
    if count_images(toml) == 0:
        raise InvalidInputError(f"validation_dataset '{name}' lists no images")
    return toml


def _check_local_host(settings: Settings, config: TrainConfig, *, gpus: int) -> None:
    """The local executor runs the trainer on this host: its GPUs must fit the run.

    A Ray cluster's nodes are judged by the trainer there, never by this (perhaps GPU-less) host.
    """
    available = _local_gpus(settings.gpus)
    if not available:
        if gpus > 1:
            raise InvalidInputError(
                f"gpus: this host has no GPU; gpus must be 1 (the run trains in one CPU process), got {gpus}"
            )
        refuse_cuda_only_options(config, where="this host (FLUXTRAIN_EXECUTOR=local)")
    elif gpus > len(available):
        raise InvalidInputError(f"gpus: {gpus} asked for, this host has {len(available)}")


def _fit_local_memory(settings: Settings, config: TrainConfig) -> TrainConfig:
    """The memory pre-flight on this host's GPUs; memory_preset auto's choice goes into run.json.

    Judged against the smallest GPU's total memory: a queued run waits until a GPU is free, and the
    trainer judges the free memory of its own device again before loading anything.
    """
    if not _local_gpus(settings.gpus):
        return config
    return memory.check_run_memory(config, available_bytes=memory.smallest_gpu_bytes())[0]


def _request_hash(request: BaseModel) -> str:
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(db: Database, key: str, digest: str) -> Run | None:
    with db.session() as session:
        run = session.scalar(select(Run).where(Run.idempotency_key == key))
    if run is not None and run.request_hash != digest:
        raise ConflictError("Idempotency-Key was already used with a different request")
    return run


def create_run(
    *, settings: Settings, db: Database, request: BaseModel, idempotency_key: str | None = None
) -> Run:
    """Queue a run; the same Idempotency-Key with the same body gives back the first run."""
    digest = _request_hash(request)
    if idempotency_key:
        existing = _replay(db, idempotency_key, digest)
        if existing is not None:
            return existing
    config = resolve_config(settings=settings, request=request)
    lint = lint_run_dataset(settings=settings, config=config, gpus=getattr(request, "gpus", 1))
    if lint.errors:
        raise InvalidInputError(f"dataset {lint.dataset} cannot be trained: {lint.error_message()}")
    if config.validation_split is not None or config.validation_dataset_config is not None:
        run_images(config)
    run_id = uuid.uuid4().hex
    folder = run_dir(settings, run_id)
    folder.mkdir(parents=True)
    try:
        atomic_write_json(RunDir(folder).config, config.model_dump(mode="json"))
        atomic_write_json(RunDir(folder).lint_warnings, [w.model_dump() for w in lint.warning_findings()])
        run = Run(
            id=run_id,
            output_name=config.output_name,
            dataset=Path(str(config.dataset_config)).stem,
            status="queued",
            gpus=getattr(request, "gpus", 1),
            webhook=getattr(request, "webhook", None),
            created_at=utcnow(),
            attempts=0,
            idempotency_key=idempotency_key or None,
            request_hash=digest,
        )
        with db.session() as session:
            session.add(run)
    except IntegrityError:
        shutil.rmtree(folder, ignore_errors=True)
        existing = _replay(db, idempotency_key or "", digest)
        if existing is None:
            raise
        return existing
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return run


def get_run(*, db: Database, run_id: str) -> Run:
    """The run's row, or a 404 that names the id."""
    with db.session() as session:
        run = session.get(Run, run_id) if len(run_id) <= 64 else None
    if run is None:
        raise NotFoundError(f"run '{run_id}' does not exist")
    return run


def list_runs(*, db: Database, status: str | None = None, limit: int = 100) -> list[Run]:
    """Newest first, so a dashboard sees what was just started."""
    if status is not None and status not in RUN_STATUSES:
        raise InvalidInputError(f"status must be one of {', '.join(RUN_STATUSES)}")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidInputError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    query = select(Run).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
    if status is not None:
        # As /status shows them: a run its backend holds unstarted (a Ray job PENDING) is queued.
        held = and_(Run.status == "running", Run.backend_waiting.is_not(None))
        shown = {
            "queued": or_(Run.status == "queued", held),
            "running": and_(Run.status == "running", Run.backend_waiting.is_(None)),
        }
        query = query.where(shown.get(status, Run.status == status))
    with db.session() as session:
        return list(session.scalars(query))


def cancel_run(*, db: Database, run_id: str) -> Run:
    """Drop a queued run at once; ask the executor to stop a running one (SIGTERM, then SIGKILL)."""
    run = get_run(db=db, run_id=run_id)
    if run.status in TERMINAL_STATUSES:
        raise ConflictError(f"run '{run_id}' already {run.status}")
    with db.session() as session:
        dropped = session.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == "queued")
            .values(status="canceled", finished_at=utcnow())
        ).rowcount
        if not dropped:
            session.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == "running", Run.cancel_requested_at.is_(None))
                .values(cancel_requested_at=time.time())
            )
    return get_run(db=db, run_id=run_id)
