"""What the visit commands print, and how they turn the application's errors into theirs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError

from pipeline import PipelineError
from visits.models import Visit
from visits.selectors import visit_status_document


def status_write(command: BaseCommand, visit: Visit, *, as_json: bool) -> None:
    """Print a visit's status document, as JSON or as a short human summary."""
    document = visit_status_document(visit)
    if as_json:
        command.stdout.write(json.dumps(document.model_dump(mode="json"), indent=2))
        return
    style = command.style.SUCCESS if document.status == "succeeded" else command.style.WARNING
    first, *rest = document.summary_lines()
    command.stdout.write(style(first))
    for line in rest:
        command.stdout.write(line)


@contextmanager
def refusals_as_command_errors() -> Iterator[None]:
    """An error of ours (a refused recording or operation) ends the command with its message;
    anything else is a bug and keeps its traceback."""
    try:
        yield
    except PipelineError as exc:
        raise CommandError(str(exc)) from exc
