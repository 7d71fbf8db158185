import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from visits.privacy.consent import SYNTHETIC_CONSENT
from visits.selectors import visits_of_clinician
from visits.services import visit_create, visit_start

DEMO_CLINICIAN = "demo"
DEMO_STAFF = "admin"


class Command(BaseCommand):
    help = (
        "Create (or reset) a demo clinician and a staff user, print their credentials, and "
        "queue the sample visit from fixtures/ for the worker cluster. Development only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--sample",
            type=Path,
            default=Path(settings.BASE_DIR) / "fixtures" / "visit_sample.ogg",
            help="Recording to queue as the demo clinician's first visit.",
        )

    def handle(self, *args: Any, sample: Path, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError(
                "demo_setup creates known accounts; it refuses to run with DEBUG off."
            )
        users = get_user_model()
        credentials = []
        for username, staff in ((DEMO_CLINICIAN, False), (DEMO_STAFF, True)):
            password = secrets.token_urlsafe(9)
            user, _ = users.objects.get_or_create(username=username)
            user.is_staff = user.is_superuser = staff
            user.set_password(password)
            user.save()
            credentials.append((username, password, "staff (admin)" if staff else "clinician"))
        clinician = users.objects.get(username=DEMO_CLINICIAN)
        if not visits_of_clinician(clinician).exists():
            visit = visit_create(
                clinician=clinician,
                recording=sample,
                label="Sample visit",
                consent=SYNTHETIC_CONSENT,
            )
            visit_start(visit=visit)
            self.stdout.write(f"Queued the sample visit #{visit.pk} for the worker cluster.")
        self.stdout.write(self.style.SUCCESS("Log in with:"))
        for username, password, role in credentials:
            self.stdout.write(f"  {role:<14} user {username:<6} password {password}")
