import logging
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, close_old_connections, connections

from pipeline.core.recovery import sweep

logger = logging.getLogger(__name__)


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
            help="Keep sweeping at this interval until interrupted (default: sweep once). A "
            "database that goes away is waited for: the loop never exits on its own.",
        )

    def handle(self, *args: Any, every: float | None, **options: Any) -> None:
        if every is not None and every <= 0:
            raise CommandError("--every must be a positive number of seconds.")
        if every is None:
            try:
                result = sweep()
            except DatabaseError as exc:
                raise CommandError(f"The database could not be reached ({exc}).") from exc
            self.stdout.write(f"reaped {result.reaped}, enqueued {result.enqueued}")
            return
        unavailable_since: float | None = None
        while True:
            try:
                result = sweep()
            except DatabaseError as exc:
                # The sweep is what brings stages back after an outage: it must outlive one.
                # The broken connection is dropped; the next round opens a new one.
                if unavailable_since is None:
                    unavailable_since = time.monotonic()
                    logger.warning("sweep: the database is unavailable (%s); waiting for it", exc)
                connections.close_all()
            else:
                if unavailable_since is not None:
                    logger.warning(
                        "sweep: the database is back after %.0f s",
                        time.monotonic() - unavailable_since,
                    )
                    unavailable_since = None
                self.stdout.write(f"reaped {result.reaped}, enqueued {result.enqueued}")
            close_old_connections()
            time.sleep(every)
