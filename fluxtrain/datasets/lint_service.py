"""Where lint's inputs come from: the dataset's TOML (or /create-dataset-config's defaults), the
run's length, and the T5 tokenizer and token limit the trainer would use."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, create_model

from fluxtrain.dataset_config.request import MAX_RESOLUTION, MIN_RESOLUTION, RESOLUTION_STEP, DatasetConfig
from fluxtrain.dataset_config.schema import resolve_document
from fluxtrain.dataset_config.service import build_dataset_toml, dataset_config_path
from fluxtrain.dataset_config.toml_file import load_dataset_config
from fluxtrain.datasets.lint import (
    LintFinding,
    LintOptions,
    LintReport,
    LintSubset,
    TokenCounter,
    lint_subsets,
    subsets_of,
)
from fluxtrain.datasets.store import dataset_dir
from fluxtrain.errors import FluxtrainError, NotFoundError
from fluxtrain.model_paths import resolve_model_path
from fluxtrain.names import TriggerWord
from fluxtrain.settings import Settings
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.edit_pairs import pair_findings

# The trainer's T5 sequence length (training/setup.py): guidance-distilled dev 512, schnell 256.
T5_MAX_LENGTH = {True: 512, False: 256}
_RUN_FIELDS = ("pretrained_model", "enable_bucket", "max_train_steps", "max_train_epochs")


class _LintOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trigger_word: TriggerWord | None = Field(
        None, description="Word every caption should contain; defaults to the TOML's class tokens."
    )
    resolution: int | None = Field(
        None,
        ge=MIN_RESOLUTION,
        le=MAX_RESOLUTION,
        multiple_of=RESOLUTION_STEP,
        description="Training side in pixels instead of the dataset TOML's.",
    )


LintRequest: type[BaseModel] = create_model(
    "LintRequest",
    __base__=_LintOptions,
    __doc__="Body of `POST /datasets/{name}/lint`: the run being planned; every field optional.",
    **{
        name: (TrainConfig.model_fields[name].annotation, TrainConfig.model_fields[name])
        for name in _RUN_FIELDS
    },
)


@lru_cache(maxsize=8)
def _tokenizer(folder: str, _stamp: int) -> TokenCounter:
    from fluxtrain.training.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("t5xxl", Path(folder))
    return lambda captions: [len(ids) for ids in tokenizer(captions, verbose=False)["input_ids"]]


def _token_options(models_root: Path, pretrained_model: str, **run: object) -> LintOptions:
    """The run's options with the T5 limit of its transformer (dev's when the file is not there; a
    path out of the models folder or a file that is no transformer is refused) and a counter of the
    tokenizer the trainer would load."""
    from fluxtrain.training.model_checks import transformer_has_guidance
    from fluxtrain.training.tokenizers import tokenizer_dir

    try:
        path = resolve_model_path(models_root, "pretrained_model", pretrained_model)
    except NotFoundError:
        guided = True
    else:
        guided = transformer_has_guidance(path, pretrained_model)
    folder = tokenizer_dir(models_root, "t5xxl")
    try:
        stamp = folder.stat().st_mtime_ns if folder.is_dir() else 0
        counter = _tokenizer(str(folder), stamp)
    except FluxtrainError as exc:
        return LintOptions(**run, token_limit=T5_MAX_LENGTH[guided], tokenizer_problem=exc.message)
    except (OSError, ValueError) as exc:
        problem = f"the t5xxl tokenizer in {folder} cannot be loaded: {exc}"
        return LintOptions(**run, token_limit=T5_MAX_LENGTH[guided], tokenizer_problem=problem)
    return LintOptions(**run, token_limit=T5_MAX_LENGTH[guided], count_tokens=counter)


def _default_subsets(folder: Path, request: BaseModel) -> list[LintSubset]:
    """The subset /create-dataset-config would write for the folder, with its defaults."""
    # The trigger word only becomes the subset's class tokens, which are set from the request below.
    values = {"output_name": folder.name, "trigger_word": request.trigger_word or folder.name}
    if request.resolution is not None:
        values["resolution"] = request.resolution
    document = build_dataset_toml(request=DatasetConfig.model_validate(values), image_dir=folder)
    config = resolve_document(document, path=folder.with_name(f"{folder.name}.toml"))
    subsets = subsets_of(config, dataset_folder=folder, enable_bucket=request.enable_bucket)
    return [replace(subset, class_tokens=request.trigger_word) for subset in subsets]


def lint_dataset(*, settings: Settings, name: str, request: BaseModel) -> LintReport:
    """Lint dataset `name` with its TOML's settings (else /create-dataset-config's defaults)."""
    folder = dataset_dir(settings, name)
    toml = dataset_config_path(settings, name)
    if toml.is_file():
        config = load_dataset_config(toml)
        if request.resolution is not None:
            config = config.model_copy(
                update={
                    "datasets": [
                        d.model_copy(update={"resolution": (request.resolution, request.resolution)})
                        for d in config.datasets
                    ]
                }
            )
        subsets = subsets_of(config, dataset_folder=folder, enable_bucket=request.enable_bucket)
    else:
        subsets = _default_subsets(folder, request)
    options = _token_options(
        settings.models_root,
        request.pretrained_model,
        trigger_word=request.trigger_word,
        max_train_steps=request.max_train_steps,
        max_train_epochs=request.max_train_epochs,
    )
    shown = str(toml) if toml.is_file() else None
    report = lint_subsets(subsets, dataset=name, config=shown, options=options)
    if not toml.is_file():
        return report
    return _with_pairs(report, pair_findings(config, family=None))


def lint_run_dataset(*, settings: Settings, config: TrainConfig, gpus: int = 1) -> LintReport:
    """Lint the images a run's TOML names, as the trainer will read them (before a run exists)."""
    toml = Path(str(config.dataset_config))
    resolved = load_dataset_config(toml)
    subsets = subsets_of(resolved, dataset_folder=toml.with_suffix(""), enable_bucket=config.enable_bucket)
    options = _token_options(
        settings.models_root,
        config.pretrained_model,
        max_train_steps=config.max_train_steps,
        max_train_epochs=config.max_train_epochs,
        gpus=gpus,
    )
    report = lint_subsets(subsets, dataset=toml.stem, config=str(toml), options=options)
    return _with_pairs(report, pair_findings(resolved, family=config.model_family or "flux1"))


def _with_pairs(report: LintReport, findings: list[LintFinding]) -> LintReport:
    """The report with the edit-pair findings (`training.edit_pairs`) added, errors first."""
    merged = sorted([*report.findings, *findings], key=lambda finding: finding.severity != "error")
    return report.model_copy(update={"findings": merged})
