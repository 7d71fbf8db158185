from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from pipeline import storage_relative
from visits.privacy.audit import command_arguments, command_origin
from visits.privacy.retention import visits_purge_due


class Command(BaseCommand):
    help = (
        "Delete the PHI of visits past retention: RETENTION_DAYS after the note was signed, "
        "RETENTION_UNSIGNED_DAYS after upload if it never was. The visit, its signed note, "
        "the ledger's figures and the audit trail stay."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only list the visits and files that would be purged; change nothing.",
        )
        command_arguments(parser)

    def handle(self, *args: Any, dry_run: bool, **options: Any) -> None:
        with command_origin(options) as origin:
            plans = visits_purge_due(reason=origin.reason, dry_run=dry_run)
        for plan in plans:
            verb = "would purge" if dry_run else "purged"
            self.stdout.write(f"visit {plan.visit_id}: {verb} {plan.summary()}")
            if dry_run:
                for path in plan.files:
                    self.stdout.write(f"  {storage_relative(path)}")
                for path in plan.kept:
                    self.stdout.write(f"  kept, another visit needs it: {storage_relative(path)}")
        done = "would be purged" if dry_run else "purged"
        self.stdout.write(
            self.style.SUCCESS(
                f"{len(plans)} visit(s) {done} (signed {settings.RETENTION_DAYS} days ago, or "
                f"unsigned and uploaded {settings.RETENTION_UNSIGNED_DAYS} days ago)."
            )
        )
