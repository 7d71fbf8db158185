"""The engine's private storage: where each attempt's artifacts live, and how a reference
kept in a stage output resolves. The layout is the engine's alone:
`runs/<run>/<stage>/attempt-<n>/<artifact>`."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from django.conf import settings
from django.db.models import Q

from pipeline.core.models import Run, Stage


def storage_root() -> Path:
    return Path(settings.PRIVATE_STORAGE_ROOT)


def _run_prefix(run_id: int) -> str:
    return f"runs/{run_id}"


def artifact_prefix(run_id: int, stage_name: str, attempt_number: int) -> str:
    return f"{_run_prefix(run_id)}/{stage_name}/attempt-{attempt_number}"


def attempt_dir(run_id: int, stage_name: str, attempt_number: int) -> Path:
    return storage_root() / artifact_prefix(run_id, stage_name, attempt_number)


def attempt_artifacts_discard(run_id: int, stage_name: str, attempt_number: int) -> None:
    """Remove what an attempt wrote. For a worker killed mid-write, the sweep does this: the
    worker never got to. A worker that was only frozen finds its folder gone or is fenced out."""
    shutil.rmtree(attempt_dir(run_id, stage_name, attempt_number), ignore_errors=True)


def artifact_path(ref: str) -> Path:
    """Resolve an artifact reference from a stage output, refusing to leave storage."""
    root = storage_root().resolve()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"artifact reference escapes private storage: {ref!r}")
    return path


def storage_relative(path: Path) -> str:
    """A path under private storage as shown to people: relative to the root, never the
    absolute path of a deployment."""
    return str(path.resolve().relative_to(storage_root().resolve()))


def stage_dir(run_id: int, stage_name: str) -> Path:
    """The folder of every attempt of one stage of a run."""
    return (storage_root() / _run_prefix(run_id) / stage_name).resolve()


def stage_dirs_delete(folders: Iterable[Path]) -> None:
    """Delete whole stage folders; a run's folder left empty goes too, one that still holds a
    kept stage stays."""
    for folder in folders:
        shutil.rmtree(folder)
        if not any(folder.parent.iterdir()):
            folder.parent.rmdir()


class StageDirs(NamedTuple):
    """The stage folders a subject's runs wrote or reuse, split by whether a run of another,
    live subject still needs one."""

    delete: set[Path]
    keep: set[Path]


def stage_dirs_of_subject(
    subject: str, *, subjects_live: Callable[[Iterable[str]], set[str]]
) -> StageDirs:
    """A subject's stage folders that exist, and which must stay: a run of a live subject
    (as `subjects_live` judges the others) wrote it or reuses its output."""
    run_ids = set(Run.objects.filter(subject=subject).values_list("id", flat=True))
    candidates: set[tuple[int, str]] = set()
    for run_id in run_ids:
        run_dir = storage_root() / _run_prefix(run_id)
        if run_dir.is_dir():
            candidates |= {(run_id, child.name) for child in run_dir.iterdir()}
    # A re-run's reused stage points at the stage that wrote the files, whichever run it is in.
    candidates |= set(
        Stage.objects.filter(run_id__in=run_ids, reused_from__isnull=False)
        .exclude(reused_from__run_id__in=run_ids)
        .values_list("reused_from__run_id", "reused_from__name")
    )
    source_runs = {run_id for run_id, _ in candidates}
    rows = list(
        Stage.objects.exclude(run__subject=subject)
        .filter(Q(run_id__in=source_runs) | Q(reused_from__run_id__in=source_runs))
        .values_list("run_id", "name", "reused_from__run_id", "reused_from__name", "run__subject")
    )
    live = subjects_live(row[4] for row in rows)
    needed: set[tuple[int, str]] = set()
    for run_id, name, source_run_id, source_name, other in rows:
        if other in live:
            needed.add((run_id, name))
            if source_run_id is not None:
                needed.add((source_run_id, source_name))
    delete = {stage_dir(*pair) for pair in candidates - needed}
    keep = {stage_dir(*pair) for pair in candidates & needed}
    return StageDirs(
        delete={path for path in delete if path.exists()},
        keep={path for path in keep if path.exists()},
    )
