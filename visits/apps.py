from django.apps import AppConfig
from django.db.models.signals import post_migrate


class VisitsConfig(AppConfig):
    name = "visits"
    verbose_name = "Visits"

    def ready(self) -> None:
        import config.session_policy  # noqa: F401  (its sign-in receiver starts the clock)
        from pipeline import workflow_register

        # Imported for what they register: the audit's receivers of signing in and out, and
        # the system checks of the speech model.
        from visits import checks  # noqa: F401
        from visits.notes.delivery import NOTE_DELIVERY_WORKFLOW
        from visits.privacy import audit  # noqa: F401
        from visits.schedules import schedules_ensure
        from visits.stages import VISIT_WORKFLOW

        workflow_register(VISIT_WORKFLOW)
        workflow_register(NOTE_DELIVERY_WORKFLOW)
        post_migrate.connect(schedules_ensure, sender=self)
