from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from visits.management.output import refusals_as_command_errors, status_write
from visits.privacy.consent import ATTESTED_METHODS, ConsentGiven
from visits.services import service_clinician, visit_create, visit_start

CLI_CLINICIAN = "pipeline-cli"


class Command(BaseCommand):
    help = (
        "Create a visit from a recording and start its pipeline. Enqueues for the worker "
        "cluster and returns at once, or with --inline runs every stage here to a final state."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "path", type=Path, help="The recording (WAV, MP3, M4A, OGG, FLAC, WebM)."
        )
        parser.add_argument(
            "--clinician",
            metavar="USERNAME",
            help=f"Owner of the visit (default: the service account “{CLI_CLINICIAN}”).",
        )
        parser.add_argument(
            "--patient-ref",
            default="",
            metavar="ID",
            help="The patient's identifier in the EHR (an MRN or FHIR id), never a name.",
        )
        parser.add_argument(
            "--encounter-ref",
            default="",
            metavar="ID",
            help="The encounter's identifier in the EHR.",
        )
        parser.add_argument(
            "--consent",
            choices=[method.value for method in ATTESTED_METHODS],
            help="How the patient consented to the recording (verbal, attested by you; or "
            "written). Required unless CONSENT_COLLECTED_ELSEWHERE says the practice collects "
            "it outside this application.",
        )
        parser.add_argument(
            "--inline",
            action="store_true",
            help="Run the pipeline in this process, retries and backoff included; no cluster.",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print the visit's status document as JSON."
        )

    def handle(
        self, *args: Any, path: Path, clinician: str | None, inline: bool, **options: Any
    ) -> None:
        if not path.exists():
            raise CommandError(f"{path}: no such file.")
        if not path.is_file():
            raise CommandError(f"{path}: not a regular file.")
        try:
            path.open("rb").close()
        except OSError as exc:
            raise CommandError(f"{path}: cannot be read ({exc.strerror}).") from exc
        if not options["consent"] and not settings.CONSENT_COLLECTED_ELSEWHERE:
            raise CommandError(
                "Say how the patient consented to the recording: --consent verbal (attested by "
                "you) or --consent written. Nothing is processed without consent."
            )
        with refusals_as_command_errors():
            owner = service_clinician(clinician, service_account=CLI_CLINICIAN)
            consent = options["consent"]
            visit = visit_create(
                clinician=owner,
                recording=path,
                patient_ref=options["patient_ref"],
                encounter_ref=options["encounter_ref"],
                consent=ConsentGiven(method=consent, attested_by=owner) if consent else None,
            )
        visit_start(visit=visit, inline=inline)
        visit.refresh_from_db()
        status_write(self, visit, as_json=options["json"])
