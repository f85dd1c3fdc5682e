"""Edit-pair lint: what is wrong with a folder of targets and its control folder, before a run exists.

Findings are dataset lint's (`datasets.lint.LintFinding`), each naming its files. Errors (the
run could not train these pairs as asked): a target without a control, more references than every
family asked about takes, a control whose aspect ratio lands in another bucket than its target's
(it would be cropped to the target's shape), a control folder that does not exist. Warnings: a
control no target claims (it is not trained on), more references than some of the families asked
about take (a dataset linted before its run's family is known).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fluxtrain.datasets.lint import FindingKind, LintFinding, Severity
from fluxtrain.datasets.pairs import pair_controls
from fluxtrain.datasets.store import list_images

Size = tuple[int, int]
SHOWN_FILES = 5


def _finding(kind: FindingKind, severity: Severity, message: str, files: list[str]) -> LintFinding:
    """A finding of dataset lint's own kind (`datasets.lint.LintFinding`)."""
    return LintFinding(kind=kind, severity=severity, message=message, files=files)


def _size(path: Path) -> Size | None:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _named(files: list[str]) -> str:
    shown = ", ".join(files[:SHOWN_FILES])
    return shown + (f" and {len(files) - SHOWN_FILES} more" if len(files) > SHOWN_FILES else "")


def lint_pairs(
    *,
    image_dir: Path,
    control_dir: Path,
    bucket_of: Callable[[int, int], Size] | None,
    references: Mapping[str, int],
    where: str,
) -> list[LintFinding]:
    """The findings of one folder of targets and its controls.

    `bucket_of` is the dataset's bucketing when controls take their target's bucket; None when they
    keep their own aspect (`control_resolution`, `no_resize_control`), so no aspect is compared.
    `references`: the most references each family asked about takes, by its title."""
    if not control_dir.is_dir():
        return [
            _finding(
                "control_dir_missing",
                "error",
                f"{where}: control_directory {control_dir} is not a folder",
                [],
            )
        ]
    targets = list_images(image_dir) if image_dir.is_dir() else []
    pairing = pair_controls((t.stem for t in targets), list_images(control_dir))
    findings: list[LintFinding] = []
    missing = [t.name for t in targets if t.stem not in pairing.controls]
    if missing:
        findings.append(
            _finding(
                "control_missing",
                "error",
                f"{where}: {len(missing)} target(s) have no control image in {control_dir}: "
                f"{_named(missing)}",
                missing,
            )
        )
    if pairing.unpaired:
        names = [p.name for p in pairing.unpaired]
        findings.append(
            _finding(
                "control_unpaired",
                "warning",
                f"{where}: {len(names)} control image(s) match no target stem and are not trained on: "
                f"{_named(names)}",
                names,
            )
        )
    counts = {t.name: len(pairing.controls.get(t.stem, [])) for t in targets}
    findings += _reference_findings(counts, references, where)
    skewed = _skewed_pairs(targets, pairing.controls, bucket_of) if bucket_of is not None else []
    if skewed:
        findings.append(
            _finding(
                "control_aspect",
                "error",
                f"{where}: {len(skewed)} pair(s) disagree in aspect ratio beyond the bucket tolerance "
                f"(the control would be cropped): {_named(skewed)}",
                skewed,
            )
        )
    return findings


def _skewed_pairs(
    targets: list[Path], controls: dict[str, list[Path]], bucket_of: Callable[[int, int], Size]
) -> list[str]:
    """`target / control` for each pair whose two images land in different buckets."""
    skewed = []
    for target in targets:
        target_size = _size(target)
        for control in controls.get(target.stem, []):
            control_size = _size(control)
            if target_size and control_size and bucket_of(*target_size) != bucket_of(*control_size):
                skewed.append(f"{target.name} / {control.name}")
    return skewed


def _reference_findings(
    counts: dict[str, int], references: Mapping[str, int], where: str
) -> list[LintFinding]:
    """An error for the targets with more references than any family asked about takes, and for the
    targets only some take a warning per limit they pass (families with the same limit named
    together) naming the families that do take them."""
    most = max(references.values(), default=0)
    crowded = [name for name, count in counts.items() if count > most]
    findings = []
    if crowded:
        widest = [title for title, limit in references.items() if limit == most]
        who = f"{widest[0]} takes" if len(references) == 1 else f"any family takes ({', '.join(widest)})"
        findings.append(
            _finding(
                "too_many_references",
                "error",
                f"{where}: {len(crowded)} target(s) have more than {most} control image(s), the most "
                f"{who}: {_named(crowded)}",
                crowded,
            )
        )
    by_limit: dict[int, list[str]] = {}
    for title, limit in references.items():
        by_limit.setdefault(limit, []).append(title)
    for limit, titles in sorted(by_limit.items()):
        beyond = [name for name, count in counts.items() if limit < count <= most]
        if beyond:
            takers = ", ".join(t for t, n in references.items() if n >= max(counts[b] for b in beyond))
            who = f"{titles[0]} takes" if len(titles) == 1 else f"{', '.join(titles)} take"
            findings.append(
                _finding(
                    "too_many_references",
                    "warning",
                    f"{where}: {len(beyond)} target(s) have more than {limit} control image(s), the most "
                    f"{who}; only {takers} train(s) them: {_named(beyond)}",
                    beyond,
                )
            )
    return findings
