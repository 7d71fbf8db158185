import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline.core.recovery import sweep


class Command(BaseCommand):
    help = (
        "Take back stages whose lease expired and enqueue stages whose retry is due. "
        "Runs once, or every N seconds with --every."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--every",
            type=float,
            metavar="SECONDS",
            help="Keep sweeping at this interval until interrupted (default: sweep once).",
        )

    def handle(self, *args: Any, every: float | None, **options: Any) -> None:
        if every is not None and every <= 0:
            raise CommandError("--every must be a positive number of seconds.")
        while True:
            result = sweep()
            self.stdout.write(f"reaped {result.reaped}, enqueued {result.enqueued}")
            if every is None:
                return
            time.sleep(every)
