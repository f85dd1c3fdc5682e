"""Edit pairs in training: which family trains a dataset with control images, and the pair lint.

A dataset whose subsets name a `control_directory` trains an edit LoRA: FLUX.1 Kontext on a FLUX.1
dev file (chosen for it when the request names no family), FLUX.2 [klein] on a klein file (one to
four references per target), FLUX.2 [dev] on a dev file (one to ten); a family that takes no
pairs, or an edit family without them, is refused outright. The pair findings
(`datasets/pair_lint.py`, per subset with the dataset's own bucketing) join dataset lint's report:
`/train` refuses its errors (`datasets.lint_service.lint_run_dataset`), `POST /datasets/{name}/lint`
lists them, and the trainer's `set_up` checks them again for a run directory written by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from fluxtrain.dataset_config.schema import DatasetConfigFile, DatasetSpec
from fluxtrain.dataset_config.toml_file import load_dataset_config, read_dataset_toml
from fluxtrain.datasets.lint import LintFinding
from fluxtrain.datasets.pair_lint import lint_pairs
from fluxtrain.errors import InvalidInputError
from fluxtrain.training.buckets import BucketSpec, Size, choose_bucket
from fluxtrain.training.families.detect import FAMILY_TITLES, ModelFamily
from fluxtrain.training.model_checks import check_model_family

log = logging.getLogger(__name__)

MAX_REFERENCES: dict[str, int] = {
    "flux1-kontext": 1,
    "flux2-klein-4b": 4,
    "flux2-klein-9b": 4,
    "flux2-dev": 10,
}
"""Families that train on edit pairs, with the most control images one target may have: Kontext
takes one; FLUX.2 [klein] 4B and 9B four and FLUX.2 [dev] ten, BFL's documented limits (diffusers'
Flux2KleinPipeline and Flux2Pipeline cap nothing: each gives the image it is passed i the time
10 + 10 i)."""
EDIT_ONLY = frozenset({"flux1-kontext"})
"""Edit families that train nothing but pairs (klein trains plain datasets as well)."""


def reference_limits(family: ModelFamily | None) -> dict[str, int]:
    """The most references a target may have, by family title: the run's family's, or every edit
    family's for a dataset linted before its run's family is known."""
    if family is None:
        return {FAMILY_TITLES[name]: limit for name, limit in MAX_REFERENCES.items()}
    return {FAMILY_TITLES[family]: MAX_REFERENCES.get(family, 0)}


def has_controls(config: DatasetConfigFile) -> bool:
    return any(subset.control_dir is not None for dataset in config.datasets for subset in dataset.subsets)


def pair_family(
    transformer: Path, shown: str, *, requested: ModelFamily | None, config: DatasetConfigFile
) -> ModelFamily:
    """The run's family (`check_model_family`), Kontext for a FLUX.1 file when the dataset has controls."""
    family = check_model_family(transformer, shown, requested)
    if requested is None and family == "flux1" and has_controls(config):
        family = check_model_family(transformer, shown, "flux1-kontext")
    return family


def _control_bucketing(dataset: DatasetSpec) -> Callable[[int, int], Size] | None:
    if dataset.control_resolution is not None or dataset.no_resize_control:
        return None
    return partial(choose_bucket, BucketSpec.of(dataset))


def _refuse_unpaired(family: ModelFamily, name: str) -> None:
    if family in EDIT_ONLY:
        raise InvalidInputError(
            f"model_family '{family}' ({FAMILY_TITLES[family]}) trains on edit pairs, but dataset config "
            f"{name} names no control_directory: add control images (role 'control') and write the "
            "config again"
        )


def check_pair_family(config: DatasetConfigFile, *, family: ModelFamily) -> None:
    """A 422 when the family and the dataset disagree: edit pairs for a family without, or the reverse."""
    name = config.path.name
    if not has_controls(config):
        _refuse_unpaired(family, name)
    elif family not in MAX_REFERENCES:
        raise InvalidInputError(
            f"dataset config {name} has control images (control_directory), but model family '{family}' "
            f"({FAMILY_TITLES[family]}) trains no edit pairs; FLUX.1 dev files train them as 'flux1-kontext'"
        )


def pair_findings(config: DatasetConfigFile, *, family: ModelFamily | None) -> list[LintFinding]:
    """The pair findings of every subset of a dataset with controls (none without), for the run's
    family, or for every edit family with None (`reference_limits`)."""
    if not has_controls(config):
        return []
    name = config.path.name
    findings: list[LintFinding] = []
    for d_index, dataset in enumerate(config.datasets):
        for s_index, subset in enumerate(dataset.subsets):
            where = f"{name} datasets[{d_index}].subsets[{s_index}]"
            if subset.control_dir is None:
                findings.append(
                    LintFinding(
                        kind="control_dir_missing",
                        severity="error",
                        message=f"{where} names no control_directory",
                    )
                )
                continue
            if subset.flip_aug:
                findings.append(
                    LintFinding(
                        kind="control_flip_aug",
                        severity="error",
                        message=f"{where} sets flip_aug, which would mirror targets but not their controls; "
                        "set it to false for edit pairs",
                    )
                )
            findings += lint_pairs(
                image_dir=subset.image_dir,
                control_dir=subset.control_dir,
                bucket_of=_control_bucketing(dataset),
                references=reference_limits(family),
                where=where,
            )
    return findings


def lint_edit_pairs(config: DatasetConfigFile, *, family: ModelFamily) -> list[LintFinding]:
    """The trainer's check: the family, then one 422 naming every pair error; warnings are logged."""
    check_pair_family(config, family=family)
    findings = pair_findings(config, family=family)
    errors = [finding.message for finding in findings if finding.severity == "error"]
    if errors:
        raise InvalidInputError("edit pairs: " + "; ".join(errors))
    for finding in findings:
        log.warning("edit pairs: %s", finding.message)
    return findings


def check_run_family(
    toml: Path, transformer: Path, shown: str, *, requested: ModelFamily | None
) -> ModelFamily:
    """`/train`'s check: the run's family, matched with whether the dataset has controls.

    A dataset without a control_directory is not resolved here: what only matters once training
    starts (a resolution, the image folders) stays the trainer's to check."""
    document = read_dataset_toml(toml)
    named = any(subset.control_directory for dataset in document.datasets for subset in dataset.subsets)
    if not named:
        family = check_model_family(transformer, shown, requested)
        _refuse_unpaired(family, Path(toml).name)
        return family
    config = load_dataset_config(toml)
    family = pair_family(transformer, shown, requested=requested, config=config)
    check_pair_family(config, family=family)
    return family
