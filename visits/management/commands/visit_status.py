from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from visits.management.output import status_write
from visits.models import Visit
from visits.privacy.audit import Action, audit_record, command_arguments, command_origin


class Command(BaseCommand):
    help = "Show a visit's pipeline: each stage, each attempt, usage, transcript, summary, note."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("visit_id", type=int, metavar="VISIT_ID", help="The visit's id.")
        parser.add_argument(
            "--json", action="store_true", help="Print the status document as JSON."
        )
        command_arguments(parser)

    def handle(self, *args: Any, visit_id: int, **options: Any) -> None:
        visit = Visit.objects.select_related("current_run").filter(pk=visit_id).first()
        if visit is None:
            raise CommandError(f"No visit with id {visit_id}.")
        with command_origin(options):
            audit_record(Action.VIEW_STATUS, visit=visit)
        status_write(self, visit, as_json=options["json"])
