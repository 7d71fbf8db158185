from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline.backends.temporal import client as temporal, worker


class Command(BaseCommand):
    help = (
        "Serve Temporal task queues (PIPELINE_BACKEND=temporal): by default the workflows and "
        "every stage that names no queue; with --queue Q, the stages of queue Q as well (or "
        "only, with --only), as transcription hosts do."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--queue",
            action="append",
            default=[],
            metavar="Q",
            help="A stage queue to serve (a stage's `queue`, e.g. the TRANSCRIBE_QUEUE); repeat "
            "for more.",
        )
        parser.add_argument(
            "--only",
            action="store_true",
            help="Serve only the --queue queues, not the workflows and default stages.",
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            default=int(settings.Q_CLUSTER.get("workers", 2)),
            help="Activities run at once on each queue served (default: Q_WORKERS).",
        )

    def handle(
        self, *args: Any, queue: list[str], only: bool, concurrency: int, **options: Any
    ) -> None:
        if settings.PIPELINE_BACKEND != "temporal":
            raise CommandError(
                "PIPELINE_BACKEND is not 'temporal': set it (and TEMPORAL_ADDRESS) on every "
                "process, or run `manage.py qcluster` for the built-in backend."
            )
        if only and not queue:
            raise CommandError("--only needs at least one --queue.")
        if concurrency < 1:
            raise CommandError("--concurrency must be at least 1.")
        queues = [temporal.task_queue(name) for name in queue]
        if not only:
            queues.insert(0, temporal.control_queue())
        self.stdout.write(
            f"serving {', '.join(queues)} on {settings.TEMPORAL_ADDRESS} "
            f"(namespace {settings.TEMPORAL_NAMESPACE}), {concurrency} at once"
        )
        try:
            worker.workers_run(queues, concurrency=concurrency)
        except KeyboardInterrupt:
            self.stdout.write("stopped")
