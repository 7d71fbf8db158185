from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from visits.management.output import refusals_as_command_errors
from visits.quality.evaluation import (
    EVALUATION_CLINICIAN,
    RecordingScore,
    evaluate,
    report_markdown,
    report_table,
)


class Command(BaseCommand):
    help = (
        "Run the real pipeline, in this process, on every recording of an evaluation set "
        "(pairs <slug>.ogg + <slug>.json; any accepted audio extension) and report per "
        "recording and overall: WER, key-term recall, items with valid evidence, unsupported "
        "items, unknown drugs, wrong numbers the note states (and apart, those in its "
        "quotations of what was heard), seconds per audio minute."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--set",
            type=Path,
            default=Path(settings.BASE_DIR) / "fixtures" / "eval",
            metavar="DIR",
            dest="directory",
            help="The evaluation set's directory (default: fixtures/eval).",
        )
        parser.add_argument(
            "--clinician",
            metavar="USERNAME",
            help=f"Owner of the visits (default: the account “{EVALUATION_CLINICIAN}”).",
        )
        parser.add_argument(
            "--vocabulary",
            action="store_true",
            help="Tell transcription the lexicon of each recording's specialty (as a clinician's "
            "vocabulary would); by default it is told nothing.",
        )
        shown = parser.add_mutually_exclusive_group()
        shown.add_argument("--json", action="store_true", help="Print the report as JSON.")
        shown.add_argument("--markdown", action="store_true", help="Print the table in Markdown.")

    def handle(
        self,
        *args: Any,
        directory: Path,
        clinician: str | None,
        vocabulary: bool,
        **options: Any,
    ) -> None:
        with refusals_as_command_errors():
            report = evaluate(
                directory, clinician=clinician, vocabulary=vocabulary, progress=self._progress
            )
        if options["json"]:
            self.stdout.write(report.model_dump_json(indent=2))
        elif options["markdown"]:
            self.stdout.write(report_markdown(report), ending="")
        else:
            for line in report_table(report):
                self.stdout.write(line)

    def _progress(self, done: int, total: int, score: RecordingScore) -> None:
        # On stderr: stdout is kept for the report.
        self.stderr.write(
            f"[{done}/{total}] {score.slug}: {score.status} in {score.wall_seconds:.1f} s"
            + (f" ({score.error})" if score.error else "")
        )
