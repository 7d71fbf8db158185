import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from visits.models import Visit
from visits.selectors import visit_status_document


class Command(BaseCommand):
    help = "Show a visit's pipeline: each stage, each attempt, usage, transcript, summary, note."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("visit_id", type=int, metavar="VISIT_ID", help="The visit's id.")
        parser.add_argument(
            "--json", action="store_true", help="Print the status document as JSON."
        )

    def handle(self, *args: Any, visit_id: int, **options: Any) -> None:
        visit = Visit.objects.select_related("current_run").filter(pk=visit_id).first()
        if visit is None:
            raise CommandError(f"No visit with id {visit_id}.")
        write_status(self, visit, as_json=options["json"])


def write_status(command: BaseCommand, visit: Visit, *, as_json: bool) -> None:
    """Print a visit's status document, as JSON or as a short human summary."""
    document = visit_status_document(visit)
    if as_json:
        command.stdout.write(json.dumps(document, indent=2))
        return
    style = command.style.SUCCESS if document["status"] == "succeeded" else command.style.WARNING
    command.stdout.write(style(f"visit {document['visit']}: {document['status']}"))
    for stage in document["stages"]:
        line = f"  {stage['name']:<11} {stage['status']:<10} {len(stage['attempts'])} attempt(s)"
        if stage["error"]:
            line += f"  {stage['error']}"
        command.stdout.write(line)
    usage = document["usage"]
    command.stdout.write(
        f"  usage: {usage['input_tokens']} tokens in, {usage['output_tokens']} out, "
        f"${usage['cost_usd']:.4f}, {usage['audio_seconds']:.1f} s of audio"
    )
