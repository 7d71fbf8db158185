from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline import PipelineError
from visits.management.output import refusals_as_command_errors
from visits.models import Visit
from visits.notes.fhir import note_bundle_json
from visits.privacy.audit import Action, audit_record, command_arguments, command_origin
from visits.selectors import note_entry_pick


class Command(BaseCommand):
    help = "Print a visit's note as a FHIR R4 document Bundle (JSON), validated before printing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("visit_id", type=int, metavar="VISIT_ID", help="The visit's id.")
        # Django's own --version (the framework's) takes that name, hence --note-version.
        parser.add_argument(
            "--note-version",
            type=int,
            metavar="N",
            help="Which version of the note (1 is the model's first draft); default: the latest.",
        )
        command_arguments(parser)

    def handle(self, *args: Any, visit_id: int, note_version: int | None, **options: Any) -> None:
        visit = Visit.objects.select_related("clinician").filter(pk=visit_id).first()
        if visit is None:
            raise CommandError(f"No visit with id {visit_id}.")
        with command_origin(options), refusals_as_command_errors():
            try:
                entry = note_entry_pick(visit, note_version)
                bundle = note_bundle_json(entry)
            except PipelineError as exc:
                audit_record(
                    Action.EXPORT_FHIR, visit=visit, version=note_version, refused=str(exc)
                )
                raise
            audit_record(Action.EXPORT_FHIR, visit=visit, version=entry.version.number)
        self.stdout.write(bundle)
