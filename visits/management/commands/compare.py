from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from visits.management.output import refusals_as_command_errors
from visits.quality.comparison import comparison_csv, comparison_table, label_compare


class Command(BaseCommand):
    help = (
        "Compare each run of a labelled batch (reprocess --label L) with the run it was forked "
        "from: note lines added, removed and changed, unsupported statements, tokens and "
        "dollars of the stages run again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--label", required=True, metavar="L", help="The batch's label.")
        parser.add_argument("--csv", action="store_true", help="Print CSV instead of a table.")

    def handle(self, *args: Any, label: str, csv: bool, **options: Any) -> None:
        with refusals_as_command_errors():
            comparison = label_compare(label)
        if csv:
            self.stdout.write(comparison_csv(comparison), ending="")
            return
        for line in comparison_table(comparison):
            self.stdout.write(line.rstrip())
